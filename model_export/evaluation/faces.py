"""MTFL faces: the unsupervised-landmark protocol (linear regressor from the K landmarks to
the 5 annotated points)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jlad_client.coords import normalised_to_pixels, pixels_to_normalised
from jlad_client.viz import draw_points
from numpy.typing import NDArray
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_export.baselines import nearest_neighbour_mapping
from model_export.data import MTFL_MISALIGNED, TIGHT_SIZE, MTFLFaces, MTFLTightFaces
from model_export.evaluation.common import (
    RGB,
    Features,
    image_features,
    save_png,
    tensor_to_rgb,
    tile,
    upscale,
)
from model_export.geometry import sample_at
from model_export.metrics import fit_landmark_regressor, landmark_error, regress_landmarks
from model_export.model import JLAD

log = logging.getLogger("jlad.evaluate")


def grid_points(count: int, extent: float = 0.6) -> Tensor:
    """`count` normalised points (count, 2) on a regular grid over [-extent, extent]^2,
    row-major: where the nearest-neighbour baseline puts its landmarks on the reference."""
    rows = max(1, math.isqrt(count))
    cols = math.ceil(count / rows)
    ys = torch.linspace(-extent, extent, rows) if rows > 1 else torch.zeros(1)
    xs = torch.linspace(-extent, extent, cols) if cols > 1 else torch.zeros(1)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)[:count]


@torch.no_grad()
def detect_faces(
    model: JLAD,
    dataset: MTFLFaces,
    reference: Features,
    reference_points: Tensor,
    *,
    device: torch.device,
    batch_size: int,
    desc: str,
) -> dict[str, Any]:
    """Run every method over a face split.

    Returns `landmarks` per method (N, K, 2) normalised: `model` = the detector's points;
    `nearest_neighbour` = `reference_points` on the reference face carried to each face by
    nearest-neighbour matching of backbone features. Also `points` (N, 5, 2): the
    annotations in pixels of the resized image.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out: dict[str, list[Tensor]] = {m: [] for m in LANDMARK_METHODS}
    annotated: list[Tensor] = []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        images = batch["image"].to(device)
        feats = image_features(model, images)
        b = len(images)
        out["model"].append(model.detect_landmarks(images, feats["model"])["points"].cpu())
        ref_backbone = reference["backbone"].expand(b, -1, -1, -1)
        mapping = nearest_neighbour_mapping(ref_backbone, feats["backbone"])
        ref_points = reference_points[None].expand(b, -1, -1).to(device)
        out["nearest_neighbour"].append(sample_at(mapping, ref_points).cpu())
        annotated.append(batch["points"])
    return {
        "landmarks": {m: torch.cat(v).numpy().astype(np.float64) for m, v in out.items()},
        "points": torch.cat(annotated).numpy().astype(np.float64),
    }


FACES_MAX_TRAIN = 1000
"""Training faces the regressor is fitted on by default (evenly spaced through the split):
its 2K x 10 weights need far fewer, and the backbone pass over all ~6,900 usable training
faces, twice (as cropped and tight), would dominate the run on a CPU."""
LANDMARK_METHODS = ("model", "nearest_neighbour")
"""Methods that place landmarks; `mean_shape` (no landmarks) is reported beside them."""
SETS = ("as_cropped", "tight")
SET_KEYS = {"as_cropped": "", "tight": "tight_"}
"""Prefix of each set's figures in `methods` (e.g. `tight_landmark_error_percent`)."""


def evaluate_faces(
    model: JLAD,
    data: Path,
    out: Path,
    *,
    input_size: tuple[int, int],
    device: torch.device,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = FACES_MAX_TRAIN,
    max_val: int | None = None,
    batch_size: int = 64,
    figures: int = 16,
    exclude: Sequence[str] = MTFL_MISALIGNED,
    crop_seed: int = 0,
    docs_img: Path | None = None,
) -> dict[str, Any]:
    """The unsupervised-landmark protocol on two validation sets of the split that training
    uses (`data.mtfl_split(data, val_fraction, seed)`):

    - `as_cropped`: the MTFL crops resized to the model's input;
    - `tight`: each face re-cropped to 80 x 80 with an inter-ocular distance of about 24 px,
      shifted by up to 10 % and rotated by up to 15 degrees (`data.MTFLTightFaces`, the
      draws fixed by `crop_seed`), then resized to the model's input.

    Per set: a linear map without bias (K landmarks -> 5 points, normalised coordinates)
    fitted on the training faces prepared the same way, error on val in % of the
    inter-ocular distance, beside the mean-shape baseline (every val face predicted as the
    training faces' mean points) and the nearest-neighbour baseline. Faces whose path
    matches an `exclude` pattern (annotations that miss their image) are left out of both
    splits. PNG grids under `out/faces/<set>/` and, with `docs_img`, `faces_<set>.png`."""
    k = model.config.num_landmarks
    reference_points = grid_points(k)
    methods: dict[str, dict[str, float]] = {m: {} for m in (*LANDMARK_METHODS, "mean_shape")}
    sets: dict[str, Any] = {}
    for name in SETS:
        split: dict[str, Any] = {
            "val_fraction": val_fraction,
            "seed": seed,
            "exclude": exclude,
        }
        if name == "tight":
            train: MTFLFaces = MTFLTightFaces(
                data, input_size, "train", limit=max_train, crop_seed=crop_seed, **split
            )
            val: MTFLFaces = MTFLTightFaces(
                data, input_size, "val", limit=max_val, crop_seed=crop_seed, **split
            )
        else:
            train = MTFLFaces(data, input_size, "train", limit=max_train, **split)
            val = MTFLFaces(data, input_size, "val", limit=max_val, **split)
        reference = image_features(model, train[0]["image"][None].to(device))
        kwargs: dict[str, Any] = {"device": device, "batch_size": batch_size}
        on_train = detect_faces(
            model, train, reference, reference_points, desc=f"faces {name} train", **kwargs
        )
        on_val = detect_faces(
            model, val, reference, reference_points, desc=f"faces {name} val", **kwargs
        )
        train_truth = pixels_to_normalised(on_train["points"], input_size)
        predicted: dict[str, NDArray[np.float64]] = {}
        prefix = SET_KEYS[name]
        for method in LANDMARK_METHODS:
            weights = fit_landmark_regressor(on_train["landmarks"][method], train_truth)
            predicted[method] = normalised_to_pixels(
                regress_landmarks(weights, on_val["landmarks"][method]), input_size
            )
            on_train_predicted = normalised_to_pixels(
                regress_landmarks(weights, on_train["landmarks"][method]), input_size
            )
            methods[method][f"{prefix}landmark_error_percent"] = landmark_error(
                predicted[method], on_val["points"]
            )
            methods[method][f"{prefix}train_error_percent"] = landmark_error(
                on_train_predicted, on_train["points"]
            )
        mean_shape = on_train["points"].mean(axis=0)
        methods["mean_shape"][f"{prefix}landmark_error_percent"] = landmark_error(
            np.broadcast_to(mean_shape, on_val["points"].shape), on_val["points"]
        )
        methods["mean_shape"][f"{prefix}train_error_percent"] = landmark_error(
            np.broadcast_to(mean_shape, on_train["points"].shape), on_train["points"]
        )
        grid = _faces_figures(out / "faces" / name, val, on_val, predicted, input_size, figures)
        if docs_img is not None and grid is not None:
            save_png(docs_img / f"faces_{name}.png", grid)
        eyes = on_val["points"][:, 0] - on_val["points"][:, 1]
        sets[name] = {
            "num_train": len(train),
            "num_val": len(val),
            "excluded": {"train": train.excluded, "val": val.excluded},
            "val_inter_ocular_px": float(
                np.linalg.norm(eyes, axis=-1).mean() * TIGHT_SIZE / input_size[1]
            ),
            "methods": {
                m: {"landmark_error_percent": v[f"{prefix}landmark_error_percent"]}
                for m, v in methods.items()
            },
        }
        log.info(
            "faces %-10s %d train, %d val: %s",
            name,
            len(train),
            len(val),
            "  ".join(
                f"{m} {v[f'{prefix}landmark_error_percent']:.2f} %" for m, v in methods.items()
            ),
        )
    return {
        "methods": methods,
        "sets": sets,
        "num_train": sets["as_cropped"]["num_train"],
        "num_val": sets["as_cropped"]["num_val"],
        "excluded": {"patterns": list(exclude), **sets["as_cropped"]["excluded"]},
        "num_landmarks": k,
        "val_fraction": val_fraction,
        "seed": seed,
        "crop_seed": crop_seed,
        "protocol": "linear map without bias (2K -> 10, normalised coordinates, "
        "ridge 1e-6 relative) fitted on train; mean point error on val in % "
        "of inter-ocular distance (points 0 and 1); 'tight_*': faces re-cropped to 80x80 "
        "with inter-ocular distance 24 px, shift +-10 %, rotation +-15 deg, train and val "
        "cropped the same way; mean_shape: the training faces' mean points",
    }


def _faces_figures(
    folder: Path,
    faces: MTFLFaces,
    on_val: dict[str, Any],
    predicted: dict[str, NDArray[np.float64]],
    input_size: tuple[int, int],
    count: int,
) -> RGB | None:
    """landmarks.png: the model's K landmarks on `count` val faces spread through the split
    (one colour per index, so a landmark that keeps its colour on the same part is
    consistent); regressed.png: the 5 regressed points beside the annotated ones."""
    if count <= 0 or len(faces) == 0:
        return None
    chosen = np.unique(np.linspace(0, len(faces) - 1, count).round().astype(int))
    factor = max(1, 160 // max(input_size))
    columns = math.ceil(math.sqrt(len(chosen)))

    def drawn(image: RGB, points: NDArray[np.float64]) -> RGB:
        marked = draw_points(upscale(image, factor), (points + 0.5) * factor - 0.5, labels=False)
        return np.asarray(marked, np.uint8)

    images = {int(n): tensor_to_rgb(faces[int(n)]["image"]) for n in chosen}
    k_points = normalised_to_pixels(on_val["landmarks"]["model"], input_size)
    grid = tile([drawn(images[n], k_points[n]) for n in images], columns)
    save_png(folder / "landmarks.png", grid)
    pairs = [
        tile([drawn(img, predicted["model"][n]), drawn(img, on_val["points"][n])], 2, 1)
        for n, img in images.items()
    ]
    save_png(folder / "regressed.png", tile(pairs, columns))
    return grid
