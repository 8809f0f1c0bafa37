"""Training CLI: pre-train each side on synthetic pairs, alternate, then joint training.

    python -m model_export.train --config configs/objects.yaml \
        --data ../shared/data/caltech101 --out checkpoints/objects
    python -m model_export.train --config configs/faces.yaml \
        --data ../shared/data/mtfl-train --out checkpoints/faces --resume

Stages (MODEL.md): `align` (W_F adapter + W_A + W_C on synthetic pairs, supervised by the
known warp plus eq. 2-3), `landmarks` (W_F adapter + W_D: eq. 6 plus eq. 7 with the known
warp), `alternate` (one step of each), `joint` (real pairs, eq. 8, alternating which side
learns with lambdas {1, 10, 10} / {10, 1, 100}; the other side is the teacher, run without
gradient).

CPU choice: the backbone is frozen (or, with `train_upper_backbone`, its blocks up to the
first hypercolumn tap are), so the frozen part's output for every training image (or view)
is computed once and cached; synthetic warps are then applied to those maps (views: cached
per view; `warp_feature_pair` for the cheapest mode).
Writes checkpoints (safetensors) every `checkpoint_every` iterations and at the end,
`train_state.pt` for --resume, `history.json` and a loss-curve PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from model_export import losses
from model_export.checkpoint import load_model, save_checkpoint
from model_export.data import MTFLFaces, list_images, load_image, split_indices
from model_export.model import JLAD, ModelConfig
from model_export.warps import (
    SyntheticPair,
    WarpConfig,
    make_synthetic_pair,
    random_views,
    view_pair_mapping,
    warp_feature_pair,
)

log = logging.getLogger("jlad.train")

STAGE_KINDS = ("align", "landmarks", "alternate", "joint")
RESETTABLE = ("detector", "aligner")  # the heads a stage's `reset` can re-initialise


# --- data ------------------------------------------------------------------------------------


@dataclass
class TrainingImages:
    """Training images resized to the model input, with a group id (class) each."""

    images: Tensor  # (N, 3, H, W) in [0, 1]
    groups: Tensor  # (N,) int64
    paths: list[str] = field(default_factory=list)


def class_folder_images(
    root: Path, size: tuple[int, int], per_class: int, val_fraction: float, seed: int
) -> TrainingImages:
    """Up to `per_class` training-split images of every class folder under `root` (the
    validation split of `model_export.data.split_indices` is left out)."""
    images, groups, paths = [], [], []
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    for group, folder in enumerate(tqdm(folders, desc="load classes", unit="class")):
        files = list_images(folder)
        train, _ = split_indices(len(files), val_fraction, seed)
        for index in train[:per_class]:
            tensor, _ = load_image(files[index], size)
            images.append(tensor)
            groups.append(group)
            paths.append(str(files[index]))
    if len(images) < 2:
        raise ValueError(f"{root}: need class folders with images, found {len(images)}")
    return TrainingImages(torch.stack(images), torch.tensor(groups), paths)


def mtfl_images(
    root: Path, size: tuple[int, int], limit: int, val_fraction: float, seed: int
) -> TrainingImages:
    """MTFL training-split faces (one group: any two faces form a pair)."""
    faces = MTFLFaces(root, size, split="train", val_fraction=val_fraction, seed=seed, limit=limit)
    images = [faces[i]["image"] for i in tqdm(range(len(faces)), desc="load faces")]
    return TrainingImages(
        torch.stack(images),
        torch.zeros(len(images), dtype=torch.long),
        [r.path for r in faces.records],
    )


def folder_images(root: Path, size: tuple[int, int], limit: int) -> TrainingImages:
    """Every image under `root` (recursively), one group: synthetic pre-training on any
    folder of images."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    images = [load_image(p, size)[0] for p in tqdm(files[:limit], desc="load images")]
    return TrainingImages(
        torch.stack(images),
        torch.zeros(len(images), dtype=torch.long),
        [str(p) for p in files[:limit]],
    )


@torch.no_grad()
def cache_backbone_features(model: JLAD, images: Tensor, batch: int = 16) -> Tensor:
    """The frozen part's output for every image (`JLAD.cacheable_features`: backbone
    features (N, C0, h, w), or the first tap's), kept as float16 to halve the memory."""
    out = []
    for start in tqdm(range(0, len(images), batch), desc="cache backbone features", unit="batch"):
        out.append(model.cacheable_features(images[start : start + batch]).half())
    return torch.cat(out)


@dataclass
class ViewBank:
    """Frozen-part features (`JLAD.cacheable_features`) of `V` random affine views of
    every training image.

    features (N, V, C0, h, w) float16, view 0 the image itself; affines (N, V, 2, 3) map view
    pixels to image points. Any two views of one image form a synthetic pair with an exact
    mapping, so the backbone runs once per view rather than twice per training step.
    """

    features: Tensor
    affines: Tensor

    def pair(self, index: Tensor, gen: torch.Generator) -> SyntheticPair:
        """Synthetic pairs (two different random views) of the images `index` (B,)."""
        views = self.features.shape[1]
        first = torch.randint(views, index.shape, generator=gen)
        second = (first + torch.randint(1, views, index.shape, generator=gen)) % views
        grid_size = (int(self.features.shape[-2]), int(self.features.shape[-1]))
        mapping, valid = view_pair_mapping(
            self.affines[index, first], self.affines[index, second], grid_size
        )
        source = self.features[index, first].float()
        target = self.features[index, second].float()
        return SyntheticPair(source, target, mapping.permute(0, 2, 3, 1), mapping, valid)


VIEWS_OF = ("image", "landmark_window")
"""What a view bank's views are drawn from (config key `views_of`): the training image, or
the crop the model's second landmark pass sees (`landmark_window_crops`)."""


@torch.no_grad()
def landmark_window_crops(model: JLAD, images: Tensor, batch: int = 16) -> Tensor:
    """Each image's crop as the served second landmark pass sees it (`JLAD.landmark_window`
    around the first pass's points, with the model's `landmark_zoom`), (N, 3, H, W).

    Views drawn from these train W_D at the scale and framing it is served at: the object
    filling the frame, centred, whatever the upload's framing."""
    if not model.config.landmark_zoom:
        raise ValueError("views_of: landmark_window needs model.landmark_zoom > 0")
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(images), batch), desc="landmark windows", unit="batch"):
        out.append(model.last_landmark_input(images[start : start + batch]))
    model.train(was_training)
    return torch.cat(out)


def build_view_bank(
    model: JLAD,
    config: dict[str, Any],
    images: Tensor,
    views: int,
    warp: WarpConfig,
    path: Path,
    key: dict[str, Any],
) -> ViewBank:
    """The run's `ViewBank` (views of the images, or of their landmark windows as `views_of`
    says; warps drawn from seed + 1), saved to `path` for `--resume` and `views_cache`."""
    bank_gen = torch.Generator().manual_seed(int(config.get("seed", 0)) + 1)
    if config.get("views_of", "image") == "landmark_window":
        images = landmark_window_crops(model, images)
    bank = cache_view_features(model, images, views, warp, bank_gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"features": bank.features, "affines": bank.affines, "key": json.dumps(key)}, path)
    return bank


@torch.no_grad()
def cache_view_features(
    model: JLAD, images: Tensor, views: int, warp: WarpConfig, gen: torch.Generator, batch: int = 8
) -> ViewBank:
    """Build the `ViewBank` of `images` (N, 3, H, W): `views` views each (view 0 unwarped)."""
    features: Tensor | None = None
    affines = torch.empty(len(images), views, 2, 3)
    for start in tqdm(range(0, len(images), batch), desc="cache view features", unit="batch"):
        chunk, chunk_affines = random_views(images[start : start + batch], views, warp, gen)
        out = model.cacheable_features(chunk.flatten(0, 1)).half()
        if features is None:
            features = torch.empty(len(images), views, *out.shape[1:], dtype=torch.float16)
        features[start : start + len(chunk)] = out.unflatten(0, (len(chunk), views))
        affines[start : start + len(chunk)] = chunk_affines
    assert features is not None
    return ViewBank(features, affines)


def sample_pairs(groups: Tensor, batch: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """`batch` random ordered pairs of different images from the same group."""
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups.tolist()):
        by_group.setdefault(g, []).append(i)
    eligible = [members for members in by_group.values() if len(members) >= 2]
    a, b = [], []
    for _ in range(batch):
        members = rng.choice(eligible)
        i, j = rng.sample(members, 2)
        a.append(i)
        b.append(j)
    return a, b


# --- steps -------------------------------------------------------------------------------------


def synthetic_feature_pair(
    model: JLAD,
    index: Tensor,
    cached: Tensor,
    images: Tensor | None,
    warp: WarpConfig,
    gen: torch.Generator,
) -> SyntheticPair:
    """A synthetic pair as frozen-backbone features with its true mapping.

    With `images`, the images are warped and the backbone runs on both (the method as
    specified); without, the cached feature maps are warped (the cheap CPU approximation).
    """
    if images is None:
        return warp_feature_pair(cached[index].float(), warp, gen)
    pair = make_synthetic_pair(images[index], model.grid_size, warp, gen)
    with torch.no_grad():
        source = model.cacheable_features(pair.source)
        target = model.cacheable_features(pair.target)
    return SyntheticPair(source, target, pair.field, pair.mapping, pair.valid)


@dataclass(frozen=True)
class Ablation:
    """Config key `ablation` (README's ablation table); the defaults are the method.

    train_alignment: False -> W_A and W_C never learn (align steps skipped); the landmark
        side still trains, with the untrained aligner as its teacher, and its eq. 2-3 term
        (lambda_A = 1) still moves the adapter.
    train_landmarks: False -> W_D never learns; the alignment side trains without eq. 7
        (lambda_J = 0: there is no landmark teacher worth following).
    sigma_weighting: False -> eq. 3 weights every position by 1 (s = 0) and eq. 7 uses
        c_k = 1: the uncertainty head gets no training signal.
    """

    train_alignment: bool = True
    train_landmarks: bool = True
    sigma_weighting: bool = True

    def sides(self, kind: str, iteration: int) -> str | None:
        """Which side a step of a `kind` stage trains (None: skip the step)."""
        wanted = {"align": self.train_alignment, "landmarks": self.train_landmarks}
        if kind in wanted:
            return kind if wanted[kind] else None
        if self.train_alignment and self.train_landmarks:
            return "align" if iteration % 2 == 0 else "landmarks"
        if self.train_alignment:
            return "align"
        return "landmarks" if self.train_landmarks else None

    def log_sigma(self, log_sigma: Tensor) -> Tensor:
        return log_sigma if self.sigma_weighting else torch.zeros_like(log_sigma).detach()

    def confidence(self, confidence: Tensor) -> Tensor | None:
        return confidence if self.sigma_weighting else None

    def lambdas(self, side: str) -> losses.Lambdas:
        lam = losses.ALIGNMENT_SIDE if side == "align" else losses.LANDMARK_SIDE
        if side == "align" and not self.train_landmarks:
            return losses.Lambdas(lam.landmark, lam.alignment, 0.0)
        return lam


METHOD = Ablation()


def align_step_synthetic(
    model: JLAD, pair: SyntheticPair, ablation: Ablation = METHOD, update_features: bool = True
) -> dict[str, Tensor]:
    """Pre-training of {W_F adapter, W_A, W_C}: known warp + eq. 2-3. With
    `update_features=False` only W_A and W_C learn (the adapter is left to the real pairs)."""
    with torch.set_grad_enabled(update_features and torch.is_grad_enabled()):
        fs = model.features_from_cache(pair.source)
        ft = model.features_from_cache(pair.target)
    out = model.align(fs, ft)
    log_sigma = ablation.log_sigma(out["log_sigma"])
    supervised = losses.flow_supervision_loss(out["mapping"], pair.mapping, pair.valid, log_sigma)
    alignment = losses.alignment_loss(fs, ft, out["mapping"], log_sigma)
    with torch.no_grad():
        epe = losses.flow_supervision_loss(out["mapping"], pair.mapping, pair.valid)
    return {"total": supervised + alignment, "flow_epe_cells": epe, "alignment": alignment.detach()}


@dataclass(frozen=True)
class LandmarkTerms:
    """How eq. 6 weighs its separation term (config key `landmark_loss`)."""

    separation_weight: float = 1.0
    margin: float = 0.05
    # Whether the landmark terms (eq. 6, and eq. 7 with lambda_J = 100) of landmark-side steps
    # reach the shared adapter (the paper updates {W_F, W_D}). Off by default: on CPU-sized
    # runs they reshaped the features until matching collapsed (PF-WILLOW PCK@0.1 0.44 ->
    # 0.15). The eq. 2-3 term of those steps (lambda_A = 1) still trains the adapter.
    update_features: bool = False
    # eq. 5's form: `squared` (the hinge on squared distances) or `distance` (see
    # losses.separation_loss: parts collapsed landmarks again).
    separation: str = "squared"
    # Eq. 4's weight. It is in cells^2 while eq. 7 is in normalised units^2 (one cell =
    # 2 / grid), so at weight 1 (x lambda_D = 10) a cell^2 of heatmap spread costs ten times
    # a cell^2 of equivariance error under lambda_J = 100 on a 20-cell grid: sharp maps win
    # over maps that follow the warp.
    concentration_weight: float = 1.0

    def features(self, features: Tensor) -> Tensor:
        return features if self.update_features else features.detach()

    def __call__(self, out: dict[str, Tensor]) -> Tensor:
        return losses.landmark_loss(
            out["heatmaps"],
            out["points"],
            self.margin,
            self.separation_weight,
            self.separation,
            self.concentration_weight,
        )


def landmark_step_synthetic(
    model: JLAD, pair: SyntheticPair, terms: LandmarkTerms = LandmarkTerms()
) -> dict[str, Tensor]:
    """Pre-training of {W_F adapter, W_D}: eq. 6 on both images, eq. 7 with the known
    warp (equivariance: landmarks must move with the image)."""
    ls = model.landmarks(terms.features(model.features_from_cache(pair.source)))
    lt = model.landmarks(terms.features(model.features_from_cache(pair.target)))
    landmark = terms(ls) + terms(lt)
    # c_k = whether the source landmark's true match lies inside the target: a landmark on a
    # part the other view cut off has nowhere to go. Not `pair.valid`, which also drops cells
    # showing no image (a view's empty border): weighting by it let landmarks park on those
    # borders, exempt from eq. 7, at fixed image positions.
    inside_target = (pair.mapping.abs() < 1).all(dim=1, keepdim=True).to(pair.mapping.dtype)
    joint = losses.joint_loss(ls["points"], lt["points"], pair.mapping, inside_target)
    lam = losses.LANDMARK_SIDE
    return {
        "total": lam.landmark * landmark + lam.joint * joint,
        "landmark": landmark.detach(),
        "joint": joint.detach(),
    }


def joint_step(
    model: JLAD,
    a: Tensor,
    b: Tensor,
    side: str,
    terms: LandmarkTerms = LandmarkTerms(),
    ablation: Ablation = METHOD,
) -> dict[str, Tensor]:
    """Eq. 8 on real pairs. side='align' updates {W_F, W_A, W_C} with W_D as teacher;
    side='landmarks' updates W_D (and W_F when `terms.update_features`) with W_A, W_C as
    teacher."""
    fa, fb = model.features_from_cache(a.float()), model.features_from_cache(b.float())
    lam = ablation.lambdas(side)
    if side == "align":
        with torch.no_grad():
            la, lb = model.landmarks(fa), model.landmarks(fb)
        ab, ba = model.align(fa, fb), model.align(fb, fa)
    else:
        la, lb = model.landmarks(terms.features(fa)), model.landmarks(terms.features(fb))
        with torch.no_grad():
            ab, ba = model.align(fa.detach(), fb.detach()), model.align(fb.detach(), fa.detach())
    landmark = terms(la) + terms(lb)
    s_ab, s_ba = ablation.log_sigma(ab["log_sigma"]), ablation.log_sigma(ba["log_sigma"])
    # c_k of eq. 7 comes from sigma (W_C), not from the served forward-backward confidence.
    c_ab = ablation.confidence(torch.sigmoid(-ab["log_sigma"]))
    c_ba = ablation.confidence(torch.sigmoid(-ba["log_sigma"]))
    alignment = losses.alignment_loss(fa, fb, ab["mapping"], s_ab) + losses.alignment_loss(
        fb, fa, ba["mapping"], s_ba
    )
    joint = losses.joint_loss(la["points"], lb["points"], ab["mapping"], c_ab) + losses.joint_loss(
        lb["points"], la["points"], ba["mapping"], c_ba
    )
    return {
        "total": losses.total_loss(landmark, alignment, joint, lam),
        "landmark": landmark.detach(),
        "alignment": alignment.detach(),
        "joint": joint.detach(),
    }


def check_config(config: dict[str, Any]) -> None:
    """Refuse a training config with a mistake that would otherwise surface only when its
    stage starts, possibly an hour in: unknown stage kinds, resets, schedules, landmark-loss
    keys, warp keys or model options, or a `from_stage` that names no stage."""
    ModelConfig.from_dict(config["model"])
    WarpConfig(**config.get("warp", {}))
    stages = config["stages"]
    stage_index_named(stages, config.get("from_stage"))
    if config.get("views_of", "image") not in VIEWS_OF:
        raise ValueError(f"views_of must be one of {VIEWS_OF}, got {config.get('views_of')!r}")
    terms = LandmarkTerms(**config.get("landmark_loss", {}))
    for stage in stages:
        if stage["kind"] not in STAGE_KINDS:
            raise ValueError(f"stage kind {stage['kind']!r} not in {STAGE_KINDS}")
        unknown = set(stage.get("reset") or ()) - set(RESETTABLE)
        if unknown:
            raise ValueError(f"cannot reset {sorted(unknown)}: only {RESETTABLE}")
        scheduled_lr_factor(stage.get("lr_schedule"), 0, int(stage["iterations"]))
        replace(terms, **stage.get("landmark_loss", {}))


def stage_index_named(stages: list[dict[str, Any]], name: str | None) -> int:
    """Index of the stage called `name` (0 when None): where `from_stage` starts a run."""
    if name is None:
        return 0
    names = [str(stage["name"]) for stage in stages]
    if name not in names:
        raise ValueError(f"no stage named {name!r}: the config has {names}")
    return names.index(name)


def earlier_history(config: dict[str, Any], first_stage: int) -> list[dict[str, Any]]:
    """With `from_stage`: the `init_from` checkpoint's history of the stages skipped, so that
    history.json and the loss curves still show the whole recipe."""
    if not first_stage:
        return []
    path = Path(str(config["init_from"])) / "history.json"
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text()) if int(r["stage"]) < first_stage]


def init_weights(model: JLAD, checkpoint: Path, skip: tuple[str, ...] = ()) -> None:
    """Load the trainable weights of the checkpoint directory `checkpoint` into `model`. Every
    weight must fit, except those of the modules in `skip` (e.g. a detector the first stage
    resets anyway, so its architecture may change); options that hold no weights (e.g.
    `consensus_rounds`) may differ."""
    trained, _ = load_model(checkpoint)
    prefixes = tuple(f"{m}." for m in skip)
    weights = {k: v for k, v in trained.state_dict().items() if not k.startswith(prefixes)}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith(prefixes)]
        if missing or unexpected:
            raise RuntimeError(f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    except RuntimeError as err:
        raise ValueError(f"{checkpoint}: architecture differs from the config's: {err}") from err
    log.info("initialised from %s", checkpoint)


def reset_modules(model: JLAD, names: list[str], seed: int) -> None:
    """Re-initialise the heads `names` (`detector` = W_D, `aligner` = W_A + W_C) exactly as
    the model's constructor does (the adapter and the frozen backbone cannot be reset)."""
    for name in names:
        if name not in RESETTABLE:
            raise ValueError(f"cannot reset {name!r}: only 'detector' and 'aligner'")
    torch.manual_seed(seed)
    fresh = JLAD(model.config, pretrained=False)
    for name in names:
        getattr(model, name).load_state_dict(getattr(fresh, name).state_dict())
        log.info("re-initialised %s", name)


def make_optimizer(model: JLAD, config: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam over the trainable parameters: `lr`, and `backbone_lr` (default: `lr`) for
    trained backbone blocks, which start from ImageNet weights rather than from scratch.

    `train_only` (config key, e.g. [detector]): only these modules learn; the rest keep the
    weights they started with (a W_D refit on real pairs that must leave the served
    correspondence exactly as it was)."""
    lr = float(config.get("lr", 5e-4))
    only = tuple(f"{m}." for m in config.get("train_only") or ())
    heads, backbone = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and (not only or name.startswith(only)):
            (backbone if name.startswith("backbone.") else heads).append(parameter)
    groups: list[dict[str, Any]] = [{"params": heads, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": float(config.get("backbone_lr", lr))})
    return torch.optim.Adam(groups)


def scheduled_lr_factor(schedule: str | None, iteration: int, total: int) -> float:
    """The factor on each parameter group's base learning rate at `iteration` of a stage of
    `total` iterations: 1 throughout (`None` or `constant`), or `cosine`, half a cosine from
    1 down to 0 over the stage, so that the weights a stage ends with are not one noisy
    full-rate step away from where the loss settled."""
    if schedule in (None, "constant"):
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
    raise ValueError(f"lr_schedule must be constant or cosine, got {schedule!r}")


# --- loop ----------------------------------------------------------------------------------------


def view_bank_key(
    config: dict[str, Any], warp: WarpConfig, views: int, images: int | None
) -> dict[str, Any]:
    """What a view bank's features depend on: the data, the seed (the views' warps), the
    warp ranges, the view count and the frozen part of the model."""
    model = ModelConfig.from_dict(config["model"]).to_dict()
    frozen = ("backbone", "hypercolumn", "taps", "input_size", "train_upper_backbone")
    return {
        "data": config.get("data"),
        "images": images,
        "seed": int(config.get("seed", 0)),
        "warp": asdict(warp),
        "views": views,
        "views_of": config.get("views_of", "image"),
        "model": {k: model[k] for k in frozen},
    }


def load_view_bank(path: Path, key: dict[str, Any] | None) -> ViewBank:
    """A cached view bank; with `key`, only one made for the same data, warps and frozen
    model (another run's `views_cache.pt`, config key `views_cache`, CLI `--views-cache`)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None and saved.get("key") != json.dumps(key):
        raise ValueError(
            f"{path} was made for other data, warps or backbone (stored key "
            f"{saved.get('key')}, this run {json.dumps(key)}): leave out views_cache"
        )
    log.info("reusing cached view features %s from %s", tuple(saved["features"].shape), path)
    return ViewBank(saved["features"], saved["affines"])


@dataclass
class TrainState:
    stage: int = 0
    iteration: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def run_training(
    config: dict[str, Any],
    data: TrainingImages | None,
    out: Path,
    resume: bool = False,
    cached: Tensor | None = None,
    checkpoint_every: int = 50,
) -> JLAD:
    """Train a model as `config` says on `data` (or precomputed `cached` backbone features
    with `data.groups`), writing checkpoints to `out`. Returns the trained model."""
    check_config(config)
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    model = JLAD(ModelConfig.from_dict(config["model"]))
    first_stage = stage_index_named(config["stages"], config.get("from_stage"))
    if first_stage and not config.get("init_from"):
        raise ValueError("from_stage needs init_from: the earlier stages' weights")
    if config.get("init_from") and not (resume and (out / "train_state.pt").exists()):
        # Start from a trained checkpoint's weights (its architecture must match): e.g. refit
        # W_D alone (a stage with `reset: [detector]`) on a model whose other parts stay.
        first_reset = tuple(config["stages"][first_stage].get("reset") or ())
        init_weights(model, Path(config["init_from"]), skip=first_reset)
    optimizer = make_optimizer(model, config)
    state = TrainState(stage=first_stage, history=earlier_history(config, first_stage))
    state_path = out / "train_state.pt"
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        missing, _ = model.load_state_dict(saved["model"], strict=False)
        stored = model.trainable_state()  # trained backbone blocks included
        missing = [k for k in missing if k in stored]
        if missing:
            # The config added parameters since the run stopped: they start fresh, and so
            # does Adam's state (its per-parameter moments no longer line up).
            log.warning("resuming without optimizer state: new parameters %s", missing[:4])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**saved["state"])
        rng.setstate(saved["rng"])
        gen.set_state(saved["gen"])
        log.info("resumed at stage %d iteration %d", state.stage, state.iteration)
    warp = WarpConfig(**config.get("warp", {}))
    # `synthetic_space`: `views` (cached features of random affine views: no backbone pass
    # per step), `images` (warp the images and rerun the backbone every step, as specified)
    # or `features` (warp cached feature maps: cheapest, least faithful).
    space = config.get("synthetic_space", "features")
    if space not in ("features", "images", "views"):
        raise ValueError(f"synthetic_space must be features, images or views, got {space!r}")
    bank: ViewBank | None = None
    if space == "views":
        bank_path = out / "views_cache.pt"
        views = int(config.get("views_per_image", 4))
        key = view_bank_key(config, warp, views, None if data is None else len(data.images))
        shared = config.get("views_cache")
        if shared:  # another run's bank, read in place (a few GB: never copied)
            bank = load_view_bank(Path(shared), key)
        elif resume and bank_path.exists():
            bank = load_view_bank(bank_path, None)
        else:
            assert data is not None
            bank = build_view_bank(model, config, data.images, views, warp, bank_path, key)
        cached = bank.features[:, 0]
    cache_path = out / "features_cache.pt"
    if cached is None and resume and cache_path.exists():
        cached = torch.load(cache_path, map_location="cpu", weights_only=True)
        log.info("reusing cached backbone features %s", tuple(cached.shape))
    if cached is None:
        assert data is not None
        cached = cache_backbone_features(model, data.images)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(cached, cache_path)
    assert data is not None
    groups = data.groups
    terms = LandmarkTerms(**config.get("landmark_loss", {}))
    ablation = Ablation(**config.get("ablation", {}))
    # Whether synthetic pairs may move the adapter. Warps of one image teach instance-level
    # matching; on PF-WILLOW that pulled the features away from semantic matching (NN on the
    # adapted features PCK@0.1 0.44 -> 0.43 with, 0.53 without synthetic updates), so the
    # objects config leaves the adapter to the real same-class pairs.
    synthetic_features = bool(config.get("synthetic_updates_features", True))
    warp_images = data.images if space == "images" else None
    batch = int(config.get("batch_size", 8))
    stages = config["stages"]
    model.train()
    started = time.time()
    for stage_index in range(state.stage, len(stages)):
        stage = stages[stage_index]
        kind = stage["kind"]
        total_its = int(stage["iterations"])
        # Per-stage options: `landmark_loss` overrides the run's eq. 6 settings for this
        # stage; `reset` re-initialises the named heads (e.g. [detector]) when the stage
        # starts, so a stage can retrain one side from scratch on what the others learned;
        # `lr_schedule` (see scheduled_lr_factor) shapes the learning rate within the stage.
        stage_terms = replace(terms, **stage.get("landmark_loss", {}))
        if state.iteration == 0 and stage.get("reset"):
            reset_modules(model, list(stage["reset"]), seed + stage_index)
            optimizer = make_optimizer(model, config)
        bar = tqdm(
            range(state.iteration, total_its),
            desc=stage["name"],
            unit="it",
            initial=state.iteration,
            total=total_its,
        )
        schedule = stage.get("lr_schedule")
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        for it in bar:
            factor = scheduled_lr_factor(schedule, it, total_its)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            step_kind = ablation.sides(kind, it)
            if step_kind is None:
                state.iteration = it + 1
                continue
            if stage.get("data", "synthetic") == "synthetic":
                idx = torch.randint(len(cached), (batch,), generator=gen)
                if bank is not None:
                    pair = bank.pair(idx, gen)
                else:
                    pair = synthetic_feature_pair(model, idx, cached, warp_images, warp, gen)
                if step_kind == "align":
                    metrics = align_step_synthetic(model, pair, ablation, synthetic_features)
                else:
                    metrics = landmark_step_synthetic(model, pair, stage_terms)
            else:
                a, b = sample_pairs(groups, batch, rng)
                metrics = joint_step(model, cached[a], cached[b], step_kind, stage_terms, ablation)
            optimizer.zero_grad(set_to_none=True)
            metrics["total"].backward()
            optimizer.step()
            record = {
                "stage": stage_index,
                "iteration": it,
                "kind": step_kind,
                **{k: float(v.detach()) for k, v in metrics.items()},
            }
            state.history.append(record)  # type: ignore[arg-type]
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if isinstance(v, float)})
            state.iteration = it + 1
            if state.iteration % checkpoint_every == 0:
                _save(model, optimizer, state, rng, gen, config, out)
        state.stage, state.iteration = stage_index + 1, 0
        log.info("stage %s done after %.0f s", stage["name"], time.time() - started)
    model.eval()
    _save(model, optimizer, state, rng, gen, config, out)
    plot_history(state.history, out / "loss_curves.png")
    return model


def _save(
    model: JLAD,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    rng: random.Random,
    gen: torch.Generator,
    config: dict[str, Any],
    out: Path,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, {k: v for k, v in config.items() if k != "model"})
    torch.save(
        {
            "model": model.trainable_state(),
            "optimizer": optimizer.state_dict(),
            "state": state.__dict__,
            "rng": rng.getstate(),
            "gen": gen.get_state(),
        },
        out / "train_state.pt",
    )
    (out / "history.json").write_text(json.dumps(state.history))


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Loss curves (moving average over 20 iterations), one panel per loss term."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(
        {
            k
            for r in history
            for k, v in r.items()
            if isinstance(v, float) and k not in ("stage", "iteration")
        }
    )
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = np.array([r[key] for r in history if key in r])
        steps = np.arange(len(values))
        if len(values) >= 20:
            values = np.convolve(values, np.ones(20) / 20, mode="valid")
            steps = steps[19:]
        ax.plot(steps, values)
        ax.set_title(key)
        ax.set_xlabel("step (within the steps that log it)")
        ax.set_yscale("symlog", linthresh=1e-2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_training_images(config: dict[str, Any], data_root: Path) -> TrainingImages:
    size = tuple(config["model"]["input_size"])
    seed = int(config.get("seed", 0))
    val = float(config.get("val_fraction", 0.1))
    kind = config.get("dataset", "folder")
    if kind == "class_folders":
        return class_folder_images(
            data_root,
            size,
            int(config.get("images_per_class", 12)),  # type: ignore[arg-type]
            val,
            seed,
        )
    if kind == "mtfl":
        return mtfl_images(data_root, size, int(config.get("max_images", 3000)), val, seed)  # type: ignore[arg-type]
    return folder_images(data_root, size, int(config.get("max_images", 2000)))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML training config")
    parser.add_argument("--data", type=Path, required=True, help="data set root")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--resume", action="store_true", help="continue from train_state.pt")
    parser.add_argument(
        "--init", type=Path, help="start from this checkpoint's weights (config key init_from)"
    )
    parser.add_argument(
        "--views-cache",
        type=Path,
        help="reuse another run's views_cache.pt made from the same data, seed, warps and "
        "backbone (config key views_cache; refused when any differs)",
    )
    parser.add_argument(
        "--from-stage",
        help="skip the stages before this one (config key from_stage; needs --init: a "
        "checkpoint of the earlier stages), e.g. to redo a config's last stage",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    config = yaml.safe_load(args.config.read_text())
    config["data"] = str(args.data)
    if args.init is not None:
        config["init_from"] = str(args.init)
    if args.views_cache is not None:
        config["views_cache"] = str(args.views_cache)
    if args.from_stage is not None:
        config["from_stage"] = args.from_stage
    data = load_training_images(config, args.data)
    log.info("training on %d images in %d groups", len(data.images), len(set(data.groups.tolist())))
    run_training(config, data, args.out, resume=args.resume)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
