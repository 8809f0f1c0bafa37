"""A real learning check: a short synthetic training run must cut the flow end-point error
on held-out synthetic pairs (other images, other warps) clearly below the identity flow's
and below the untrained model's. Also: checkpoints round-trip, resume continues."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from model_export.checkpoint import load_model
from model_export.geometry import cell_centres
from model_export.model import JLAD, ModelConfig
from model_export.train import Ablation, TrainingImages, run_training
from model_export.warps import WarpConfig, apply_affine, invert_affine, make_synthetic_pair

torch.set_num_threads(2)
SIZE = 64
TRAIN_PICTURES = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "motorcycle_left",
]
HELD_OUT_PICTURES = ["cat", "retina", "colorwheel"]
# The landmark check's held-out set: more pictures than the three above, whose warp-following
# figure swung from 0.59 to 0.96 of standing still with the seed at 64 px.
LANDMARK_HELD_OUT = [*HELD_OUT_PICTURES, "camera", "coins", "clock", "moon", "cell"]
LANDMARK_SIZE = 128
# Warps large enough (about a cell) that the identity flow is clearly wrong.
WARP = {"scale": 0.15, "rotation": 0.2, "translation": 0.3, "tps_jitter": 0.08}


def _pictures(names: list[str], size: int = SIZE) -> torch.Tensor:
    out = []
    for name in names:
        pic = (
            getattr(skdata, name)() if name != "motorcycle_left" else skdata.stereo_motorcycle()[0]
        )
        pic = np.atleast_3d(pic)[..., :3]
        if pic.shape[2] == 1:
            pic = np.repeat(pic, 3, axis=2)
        t = torch.from_numpy(np.ascontiguousarray(pic)).permute(2, 0, 1)[None].float() / 255
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True))
    return torch.cat(out)


def _config(iterations: int) -> dict[str, object]:
    return {
        "seed": 0,
        "synthetic_space": "images",
        "batch_size": 8,
        "lr": 1e-3,
        "model": {
            "input_size": [SIZE, SIZE],
            "feature_dim": 32,
            "head_width": 32,
            "num_landmarks": 4,
        },
        "warp": WARP,
        "stages": [
            {"name": "align", "kind": "align", "data": "synthetic", "iterations": iterations}
        ],
    }


def _held_out_epe(model: JLAD, pairs: list) -> tuple[float, float]:
    """Mean end-point error in cells over valid cells: (model, identity flow)."""
    h, w = model.grid_size
    scale = torch.tensor([w / 2, h / 2]).view(1, 2, 1, 1)
    identity = cell_centres(h, w).permute(2, 0, 1)[None]
    errs, ident = [], []
    with torch.no_grad():
        for pair in pairs:
            out = model.align(model.features(pair.source), model.features(pair.target))
            valid = pair.valid.bool().expand(-1, 2, -1, -1)[:, :1]
            e = ((out["mapping"] - pair.mapping) * scale).norm(dim=1, keepdim=True)
            i = ((identity - pair.mapping) * scale).norm(dim=1, keepdim=True)
            errs.append(e[valid].mean())
            ident.append(i[valid].mean())
    return float(torch.stack(errs).mean()), float(torch.stack(ident).mean())


@pytest.fixture(scope="module")
def held_out_pairs() -> list:
    images = _pictures(HELD_OUT_PICTURES)
    gen = torch.Generator().manual_seed(123)
    cfg = WarpConfig(**WARP)
    return [make_synthetic_pair(images, (SIZE // 8, SIZE // 8), cfg, gen) for _ in range(4)]


def test_short_synthetic_training_learns_to_align(tmp_path: Path, held_out_pairs: list) -> None:
    images = _pictures(TRAIN_PICTURES)
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    config = _config(iterations=200)
    torch.manual_seed(0)
    untrained = JLAD(ModelConfig.from_dict(config["model"])).eval()  # type: ignore[arg-type]
    before, identity = _held_out_epe(untrained, held_out_pairs)
    model = run_training(config, data, tmp_path / "ckpt")
    after, _ = _held_out_epe(model, held_out_pairs)
    print(
        f"held-out EPE (cells): identity {identity:.3f}, untrained {before:.3f}, "
        f"trained {after:.3f}"
    )
    assert after < 0.6 * identity
    assert after < 0.85 * before
    # the run wrote what a user looks at
    assert (tmp_path / "ckpt" / "loss_curves.png").stat().st_size > 1000
    history = json.loads((tmp_path / "ckpt" / "history.json").read_text())
    assert len(history) == 200

    # the checkpoint reloads to the same model
    loaded, cfg = load_model(tmp_path / "ckpt")
    assert cfg["input_size"] == [SIZE, SIZE]
    with torch.no_grad():
        x = images[:2]
        torch.testing.assert_close(loaded.features(x), model.features(x))


def test_resume_continues_where_it_stopped(tmp_path: Path) -> None:
    images = _pictures(TRAIN_PICTURES[:3])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    out = tmp_path / "ckpt"
    run_training(_config(iterations=6), data, out)
    config = _config(iterations=6)
    config["stages"] = [
        *config["stages"],  # type: ignore[list-item]
        {"name": "more", "kind": "landmarks", "data": "synthetic", "iterations": 4},
    ]
    run_training(config, data, out, resume=True)
    history = json.loads((out / "history.json").read_text())
    assert [r["stage"] for r in history] == [0] * 6 + [1] * 4


def test_ablation_sides_follow_the_table() -> None:
    method, align_only = Ablation(), Ablation(train_landmarks=False)
    landmarks_only = Ablation(train_alignment=False)
    assert [method.sides("joint", i) for i in range(4)] == ["align", "landmarks"] * 2
    assert [align_only.sides(k, 1) for k in ("align", "landmarks", "joint")] == [
        "align",
        None,
        "align",
    ]
    assert [landmarks_only.sides(k, 0) for k in ("align", "landmarks", "alternate")] == [
        None,
        "landmarks",
        "landmarks",
    ]
    assert align_only.lambdas("align").joint == 0.0
    assert method.lambdas("align").joint > 0


def _parameters_moved(model: JLAD, prefix: str, seed: int = 0) -> bool:
    torch.manual_seed(seed)
    fresh = JLAD(model.config).trainable_state()
    trained = model.trainable_state()
    return any(not torch.equal(fresh[k], trained[k]) for k in fresh if k.startswith(prefix))


@pytest.mark.parametrize(
    ("ablation", "frozen", "learning"),
    [
        ({"train_alignment": False}, "aligner.", "detector."),
        ({"train_landmarks": False}, "detector.", "aligner."),
        ({"sigma_weighting": False}, "aligner.uncertainty.", "aligner.enc1."),
    ],
)
def test_ablations_leave_the_switched_off_part_untouched(
    tmp_path: Path, ablation: dict[str, bool], frozen: str, learning: str
) -> None:
    images = _pictures(TRAIN_PICTURES[:3])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    config = _config(iterations=3)
    config["ablation"] = ablation
    config["stages"] = [
        {"name": "a", "kind": "alternate", "data": "synthetic", "iterations": 4},
        {"name": "j", "kind": "joint", "data": "pairs", "iterations": 4},
    ]
    model = run_training(config, data, tmp_path / "ckpt")
    assert not _parameters_moved(model, frozen)
    assert _parameters_moved(model, learning)


def test_ablation_variants_scale_the_schedule_and_set_the_switches() -> None:
    from model_export.ablate import VARIANTS, markdown_table, variant_config

    base = {"stages": [{"name": "a", "iterations": 40}, {"name": "j", "iterations": 200}]}
    scaled = variant_config(base, VARIANTS["alignment alone"], 0.25)
    assert [s["iterations"] for s in scaled["stages"]] == [10, 50]
    assert scaled["ablation"] == {"train_landmarks": False}
    untrained = variant_config(base, VARIANTS["untrained"], 0.25)
    assert [s["iterations"] for s in untrained["stages"]] == [0, 0]
    assert base["stages"][0]["iterations"] == 40  # the base config is not modified
    table = markdown_table({"joint (the method)": {"pfwillow": 0.6543}}, ["pfwillow"])
    assert table.splitlines()[2] == "| joint (the method) | 0.654 |"


def _landmark_config(iterations: int, size: int = SIZE) -> dict[str, object]:
    return {
        "seed": 0,
        "synthetic_space": "views",
        "views_per_image": 4,
        "batch_size": 8,
        "lr": 2e-3,
        "model": {
            "input_size": [size, size],
            "feature_dim": 32,
            "head_width": 32,
            "num_landmarks": 4,
            "landmark_reduce": True,
            "adapter_refine": False,
        },
        "landmark_loss": {"separation_weight": 20.0, "margin": 0.1, "update_features": True},
        "warp": {"scale": 0.3, "rotation": 0.3, "translation": 0.25, "tps_jitter": 0.0},
        "stages": [
            {"name": "lm", "kind": "landmarks", "data": "synthetic", "iterations": iterations}
        ],
    }


def _landmark_behaviour(model: JLAD, images: torch.Tensor) -> tuple[float, float, float]:
    """(spread, equivariance error, error if the points stood still) on `images` and a known
    shift-and-zoom of them; distances in normalised units."""
    affine = torch.tensor([[[0.8, 0.0, 0.15], [0.0, 0.8, -0.1]]]).expand(len(images), 2, 3)
    size = images.shape[-1]
    grid = cell_centres(size, size).expand(len(images), size, size, 2)
    moved = F.grid_sample(images, apply_affine(affine, grid), align_corners=False)
    with torch.no_grad():
        p = model.landmarks(model.features(images))["points"]
        q = model.landmarks(model.features(moved))["points"]
    spread = float((p[:, :, None] - p[:, None]).norm(dim=-1).mean() * p.shape[1] / (p.shape[1] - 1))
    expected = apply_affine(invert_affine(affine), p)  # where the points should be in `moved`
    inside = (expected.abs() < 0.9).all(-1)
    error = float((q - expected).norm(dim=-1)[inside].mean())
    still = float((p - expected).norm(dim=-1)[inside].mean())
    return spread, error, still


def test_landmark_training_spreads_points_that_follow_a_known_warp(tmp_path: Path) -> None:
    """The landmark learning check: eq. 4-7 on cached affine views must give K points that
    spread over the image (no collapse onto one spot) and move with a known warp of held-out
    pictures (not a fixed pattern)."""
    images = _pictures(TRAIN_PICTURES, LANDMARK_SIZE)
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    config = _landmark_config(iterations=150, size=LANDMARK_SIZE)
    torch.manual_seed(0)
    untrained = JLAD(ModelConfig.from_dict(config["model"])).eval()  # type: ignore[arg-type]
    held_out = _pictures(LANDMARK_HELD_OUT, LANDMARK_SIZE)
    spread0, error0, _ = _landmark_behaviour(untrained, held_out)
    model = run_training(config, data, tmp_path / "ckpt").eval()
    spread, error, still = _landmark_behaviour(model, held_out)
    print(
        f"spread {spread0:.3f} -> {spread:.3f}; warp-following error {error0:.3f} -> "
        f"{error:.3f} (standing still: {still:.3f})"
    )
    assert spread > 0.4  # normalised units: a fifth of the image side
    assert spread > 2 * spread0
    # A fixed pattern scores error ~ still (ratio 1). 150 steps on a 16 x 16 grid follow
    # 17-22 % of the warp (ratio 0.78-0.83 over seeds 0-2, 0.81-0.90 after 300 steps over
    # seeds 0-3); at 64 px on three held-out pictures the ratio swung 0.59-0.96 with the
    # seed. (The untrained model's points sit together in the middle: their error, 0.225
    # here, measures the warp's shift of the centre, not a baseline worth beating.)
    assert error < 0.9 * still


def test_a_stage_can_reset_a_head_and_override_the_landmark_loss(tmp_path: Path) -> None:
    """`reset: [detector]` re-initialises W_D when the stage starts (the aligner keeps what it
    learned); `landmark_loss` overrides eq. 6 for that stage only."""
    import copy

    from model_export.train import reset_modules

    images = _pictures(TRAIN_PICTURES[:3])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    config = _config(iterations=3)
    config["stages"] = [
        *config["stages"],  # type: ignore[list-item]
        {"name": "lm", "kind": "landmarks", "data": "synthetic", "iterations": 3},
    ]
    out = tmp_path / "ckpt"
    trained = run_training(config, data, out)
    expected = copy.deepcopy(trained)
    reset_modules(expected, ["detector"], seed=0 + 2)  # the run's seed + the stage's index
    config["stages"] = [
        *config["stages"],
        {
            "name": "refit",
            "kind": "landmarks",
            "data": "synthetic",
            "iterations": 0,
            "reset": ["detector"],
            "landmark_loss": {"separation": "distance"},
        },
    ]
    refit = run_training(config, data, out, resume=True)
    before, after = trained.trainable_state(), refit.trainable_state()
    reset = expected.trainable_state()
    detector = [k for k in after if k.startswith("detector.")]
    assert all(torch.equal(after[k], reset[k]) for k in detector)
    assert any(not torch.equal(after[k], before[k]) for k in detector)
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("detector."))
    with pytest.raises(ValueError, match="only 'detector' and 'aligner'"):
        reset_modules(refit, ["adapter"], 0)


def test_training_can_start_from_a_trained_checkpoint(tmp_path: Path) -> None:
    """`init_from` (CLI `--init`): the run starts from that checkpoint's weights (a stage of
    0 iterations leaves them exactly), and refuses a checkpoint of another architecture."""
    images = _pictures(TRAIN_PICTURES[:3])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    trained = run_training(_config(iterations=3), data, tmp_path / "first")
    config = _config(iterations=0)
    config["init_from"] = str(tmp_path / "first")
    started = run_training(config, data, tmp_path / "second")
    first, second = trained.trainable_state(), started.trainable_state()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    fresh = run_training(_config(iterations=0), data, tmp_path / "fresh").trainable_state()
    assert any(not torch.equal(first[k], fresh[k]) for k in first)  # 3 steps moved something
    other = _config(iterations=0)
    other["model"] = {**other["model"], "num_landmarks": 5}  # type: ignore[dict-item]
    other["init_from"] = str(tmp_path / "first")
    with pytest.raises(ValueError, match="architecture"):
        run_training(other, data, tmp_path / "third")


def test_from_stage_redoes_only_the_named_stage_on_a_checkpoint(tmp_path: Path) -> None:
    """`from_stage` (CLI `--from-stage`): the stages before it are skipped, the run starts from
    `init_from`'s weights and history of the skipped stages, and a detector that stage resets
    may change its architecture (its old weights are not loaded). Without `init_from` it is
    refused; so is an unknown name."""
    images = _pictures(TRAIN_PICTURES[:3])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    first = _config(iterations=3)
    trained = run_training(first, data, tmp_path / "first").trainable_state()
    config = _config(iterations=50)  # the align stage would run 50 steps if it were not skipped
    config["model"] = {**config["model"], "num_landmarks": 6}  # type: ignore[dict-item]
    config["stages"] = [
        *config["stages"],  # type: ignore[list-item]
        {
            "name": "lm",
            "kind": "landmarks",
            "data": "synthetic",
            "iterations": 2,
            "reset": ["detector"],
        },
    ]
    config["init_from"] = str(tmp_path / "first")
    config["from_stage"] = "lm"
    redone = run_training(config, data, tmp_path / "redo")
    after = redone.trainable_state()
    history = json.loads((tmp_path / "redo" / "history.json").read_text())
    # The skipped stage's history comes from the checkpoint (3 steps), then the 2 new ones.
    assert [entry["stage"] for entry in history] == [0, 0, 0, 1, 1]
    assert redone.detector.head.out_channels == 6
    # Landmark-side steps leave the aligner alone: it is exactly the checkpoint's.
    aligner = [k for k in after if k.startswith("aligner.")]
    assert aligner and all(torch.equal(after[k], trained[k]) for k in aligner)
    with pytest.raises(ValueError, match="needs init_from"):
        run_training({**config, "init_from": None}, data, tmp_path / "bare")
    with pytest.raises(ValueError, match="no stage named"):
        run_training({**config, "from_stage": "nope"}, data, tmp_path / "unknown")


def test_landmark_training_updates_the_upper_backbone_blocks_only(tmp_path: Path) -> None:
    """`train_upper_backbone`: landmark steps on cached first-tap views move the blocks after
    the first tap (at `backbone_lr`) and leave the lower blocks and every BatchNorm statistic
    as they were; the checkpoint carries the moved blocks."""
    images = _pictures(TRAIN_PICTURES[:4])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    config = _landmark_config(iterations=4)
    config["model"] = {**config["model"], "train_upper_backbone": True}  # type: ignore[dict-item]
    config["backbone_lr"] = 1e-4
    torch.manual_seed(0)
    before = JLAD(ModelConfig.from_dict(config["model"])).backbone.state_dict()  # type: ignore[arg-type]
    model = run_training(config, data, tmp_path / "ckpt")
    after = model.backbone.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    upper = model.backbone.upper_parameter_prefixes()
    assert moved and all(k.startswith(upper) and "running" not in k for k in moved)
    assert any(k.startswith("_blocks.14.") for k in moved)  # gradient reaches the last block
    bank = torch.load(tmp_path / "ckpt" / "views_cache.pt", weights_only=True)
    assert bank["features"].shape[2] == 40  # the first tap's channels are what is cached
    loaded, _ = load_model(tmp_path / "ckpt")
    assert all(torch.equal(loaded.backbone.state_dict()[k], after[k]) for k in after)


def test_train_only_leaves_every_other_module_exactly_as_it_started(tmp_path: Path) -> None:
    """`train_only: [detector]` on real-pair steps of the landmark side: W_D moves; the
    adapter (which eq. 2-3 would otherwise move) and W_A / W_C keep their weights."""
    images = _pictures(TRAIN_PICTURES[:4])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    first = run_training(_config(iterations=2), data, tmp_path / "first")
    config = _config(iterations=0)
    config.update(
        init_from=str(tmp_path / "first"),
        train_only=["detector"],
        ablation={"train_alignment": False},
        landmark_loss={"update_features": False},
        stages=[{"name": "lm", "kind": "joint", "data": "pairs", "iterations": 3}],
    )
    before = first.trainable_state()
    after = run_training(config, data, tmp_path / "second").trainable_state()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("detector.") for k in moved)
    assert any(k.startswith("adapter.") for k in before)


def test_a_run_reuses_another_runs_view_bank_only_when_it_was_made_alike(tmp_path: Path) -> None:
    """`views_cache` (CLI `--views-cache`): a second run reads the first run's view bank in
    place (same data, seed, warps, backbone: identical training), and refuses a bank made
    with other warps."""
    images = _pictures(TRAIN_PICTURES[:3])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    first = run_training(_landmark_config(iterations=3), data, tmp_path / "first")
    config = _landmark_config(iterations=3)
    config["views_cache"] = str(tmp_path / "first" / "views_cache.pt")
    second = run_training(config, data, tmp_path / "second")
    assert not (tmp_path / "second" / "views_cache.pt").exists()  # read in place
    a, b = first.trainable_state(), second.trainable_state()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same bank, same seed: same steps
    other = _landmark_config(iterations=1)
    other["warp"] = {**other["warp"], "scale": 0.5}  # type: ignore[dict-item]
    other["views_cache"] = config["views_cache"]
    with pytest.raises(ValueError, match="other data, warps or backbone"):
        run_training(other, data, tmp_path / "third")


def test_views_of_landmark_window_draws_the_bank_from_the_second_passs_crops(
    tmp_path: Path,
) -> None:
    """`views_of: landmark_window`: view 0 of each image in the bank is the crop the served
    second landmark pass sees (`JLAD.landmark_window` around the first pass's points, as
    `detect_landmarks` crops it), not the image; without a `landmark_zoom` it is refused."""
    from model_export.train import landmark_window_crops

    images = _pictures(TRAIN_PICTURES[:3])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    config = _landmark_config(iterations=1)
    config["model"] = {**config["model"], "landmark_zoom": 1.3}  # type: ignore[dict-item]
    config["views_of"] = "landmark_window"
    out = tmp_path / "zoomed"
    run_training(config, data, out)
    bank = torch.load(out / "views_cache.pt", weights_only=True)
    assert json.loads(bank["key"])["views_of"] == "landmark_window"
    torch.manual_seed(0)  # the run's start: its seed, no weights loaded
    initial = JLAD(ModelConfig.from_dict(config["model"])).eval()
    with torch.no_grad():
        points = initial.landmarks(initial.features(images))["points"]
        crops, _, half = initial.landmark_window(images, points)
        expected = initial.cacheable_features(crops).half()
    assert bool((half < 1).all())  # a real zoom: the crops are not the images
    torch.testing.assert_close(landmark_window_crops(initial, images), crops)
    torch.testing.assert_close(bank["features"][:, 0], expected, atol=2e-3, rtol=0)
    assert not torch.allclose(
        bank["features"][:, 0].float(), initial.cacheable_features(images), atol=2e-2
    )
    config["model"] = {**config["model"], "landmark_zoom": 0.0}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="landmark_zoom"):
        run_training(config, data, tmp_path / "unzoomed")


def test_scheduled_lr_factor_known_values() -> None:
    """Constant is 1 everywhere; cosine starts at 1, is 1/2 halfway and reaches 0 at the end."""
    from model_export.train import scheduled_lr_factor

    assert [scheduled_lr_factor(None, i, 10) for i in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert scheduled_lr_factor("constant", 7, 10) == 1.0
    assert scheduled_lr_factor("cosine", 0, 10) == pytest.approx(1.0)
    assert scheduled_lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert scheduled_lr_factor("cosine", 10, 10) == pytest.approx(0.0, abs=1e-12)
    falling = [scheduled_lr_factor("cosine", i, 10) for i in range(11)]
    assert all(a > b for a, b in itertools.pairwise(falling))
    with pytest.raises(ValueError, match="lr_schedule"):
        scheduled_lr_factor("linear", 0, 10)


def test_a_cosine_stage_ends_at_a_small_learning_rate_and_the_next_starts_at_full(
    tmp_path: Path,
) -> None:
    """`lr_schedule: cosine` on a stage: its last step runs at (1 + cos(pi (N-1)/N)) / 2 of
    `lr`; a following stage without a schedule runs at the full `lr` again."""
    images = _pictures(TRAIN_PICTURES[:3])
    data = TrainingImages(images, torch.zeros(len(images), dtype=torch.long))
    config = _config(iterations=4)
    config["stages"][0]["lr_schedule"] = "cosine"  # type: ignore[index]
    out = tmp_path / "ckpt"
    run_training(config, data, out)
    saved = torch.load(out / "train_state.pt", weights_only=False)["optimizer"]
    expected = 1e-3 * (1 + np.cos(np.pi * 3 / 4)) / 2
    assert [g["lr"] for g in saved["param_groups"]] == pytest.approx([expected])
    config["stages"] = [
        *config["stages"],  # type: ignore[list-item]
        {"name": "more", "kind": "align", "data": "synthetic", "iterations": 1},
    ]
    run_training(config, data, out, resume=True)
    saved = torch.load(out / "train_state.pt", weights_only=False)["optimizer"]
    assert [g["lr"] for g in saved["param_groups"]] == pytest.approx([1e-3])


CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_committed_training_config_passes_the_config_check(path: Path) -> None:
    """The recipes in configs/ (the released ones and the recorded experiments) still say only
    what `train` understands, so that each can be rerun as its header says."""
    import yaml

    from model_export.train import check_config

    check_config(yaml.safe_load(path.read_text()))


def test_the_config_check_refuses_a_stage_mistake_before_training() -> None:
    from model_export.train import check_config

    config = _config(iterations=1)
    check_config(config)
    for key, value, message in [
        ("kind", "landmark", "stage kind"),
        ("reset", ["adapter"], "cannot reset"),
        ("lr_schedule", "step", "lr_schedule"),
    ]:
        broken = {**config, "stages": [{**config["stages"][0], key: value}]}  # type: ignore[index]
        with pytest.raises(ValueError, match=message):
            check_config(broken)
    with pytest.raises(ValueError, match="no stage named"):
        check_config({**config, "from_stage": "nope"})
    with pytest.raises(ValueError, match="views_of"):
        check_config({**config, "views_of": "crops"})
