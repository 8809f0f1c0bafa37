"""MTFL faces: the unsupervised-landmark protocol (linear regressor from the K landmarks to
the 5 annotated points)."""

from __future__ import annotations

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
from model_export.data import MTFL_MISALIGNED, MTFLFaces
from model_export.evaluation.common import (
    METHODS,
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
    nearest-neighbour matching of backbone features; `identity` = `reference_points`
    unchanged. Also `points` (N, 5, 2): the annotations in pixels of the resized image.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out: dict[str, list[Tensor]] = {m: [] for m in METHODS}
    annotated: list[Tensor] = []
    for batch in tqdm(loader, desc=desc, unit="batch"):
        images = batch["image"].to(device)
        feats = image_features(model, images)
        b = len(images)
        out["model"].append(model.landmarks(feats["model"])["points"].cpu())
        ref_backbone = reference["backbone"].expand(b, -1, -1, -1)
        mapping = nearest_neighbour_mapping(ref_backbone, feats["backbone"])
        ref_points = reference_points[None].expand(b, -1, -1).to(device)
        out["nearest_neighbour"].append(sample_at(mapping, ref_points).cpu())
        out["identity"].append(ref_points.cpu())
        annotated.append(batch["points"])
    return {
        "landmarks": {m: torch.cat(v).numpy().astype(np.float64) for m, v in out.items()},
        "points": torch.cat(annotated).numpy().astype(np.float64),
    }


def evaluate_faces(
    model: JLAD,
    data: Path,
    out: Path,
    *,
    input_size: tuple[int, int],
    device: torch.device,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_val: int | None = None,
    batch_size: int = 64,
    figures: int = 16,
    exclude: Sequence[str] = MTFL_MISALIGNED,
) -> dict[str, Any]:
    """The unsupervised-landmark protocol: landmarks on the train and val splits of
    `data.mtfl_split`, a linear map without bias (K landmarks -> 5 points, normalised
    coordinates) fitted on train, error on val in % of inter-ocular distance. Faces whose
    path matches an `exclude` pattern (annotations that miss their image) are left out of
    both splits."""
    train = MTFLFaces(data, input_size, "train", val_fraction, seed, max_train, exclude)
    val = MTFLFaces(data, input_size, "val", val_fraction, seed, max_val, exclude)
    k = model.config.num_landmarks
    reference = image_features(model, train[0]["image"][None].to(device))
    reference_points = grid_points(k)
    kwargs: dict[str, Any] = {"device": device, "batch_size": batch_size}
    on_train = detect_faces(model, train, reference, reference_points, desc="faces train", **kwargs)
    on_val = detect_faces(model, val, reference, reference_points, desc="faces val", **kwargs)
    train_truth = pixels_to_normalised(on_train["points"], input_size)
    summary: dict[str, dict[str, float]] = {}
    predicted: dict[str, NDArray[np.float64]] = {}
    for method in METHODS:
        weights = fit_landmark_regressor(on_train["landmarks"][method], train_truth)
        predicted[method] = normalised_to_pixels(
            regress_landmarks(weights, on_val["landmarks"][method]), input_size
        )
        summary[method] = {
            "landmark_error_percent": landmark_error(predicted[method], on_val["points"]),
            "train_error_percent": landmark_error(
                normalised_to_pixels(
                    regress_landmarks(weights, on_train["landmarks"][method]), input_size
                ),
                on_train["points"],
            ),
        }
    _faces_figures(out / "faces", val, on_val, predicted, input_size, figures)
    return {
        "methods": summary,
        "num_train": len(train),
        "num_val": len(val),
        "excluded": {"patterns": list(exclude), "train": train.excluded, "val": val.excluded},
        "num_landmarks": k,
        "val_fraction": val_fraction,
        "seed": seed,
        "protocol": "linear map without bias (2K -> 10, normalised coordinates, "
        "ridge 1e-6 relative) fitted on train; mean point error on val in % "
        "of inter-ocular distance (points 0 and 1)",
    }


def _faces_figures(
    folder: Path,
    faces: MTFLFaces,
    on_val: dict[str, Any],
    predicted: dict[str, NDArray[np.float64]],
    input_size: tuple[int, int],
    count: int,
) -> None:
    """landmarks.png: the model's K landmarks on `count` val faces spread through the split
    (one colour per index, so a landmark that keeps its colour on the same part is
    consistent); regressed.png: the 5 regressed points beside the annotated ones."""
    if count <= 0 or len(faces) == 0:
        return
    chosen = np.unique(np.linspace(0, len(faces) - 1, count).round().astype(int))
    factor = max(1, 160 // max(input_size))
    columns = math.ceil(math.sqrt(len(chosen)))

    def drawn(image: RGB, points: NDArray[np.float64]) -> RGB:
        marked = draw_points(upscale(image, factor), (points + 0.5) * factor - 0.5, labels=False)
        return np.asarray(marked, np.uint8)

    images = {int(n): tensor_to_rgb(faces[int(n)]["image"]) for n in chosen}
    k_points = normalised_to_pixels(on_val["landmarks"]["model"], input_size)
    save_png(
        folder / "landmarks.png", tile([drawn(images[n], k_points[n]) for n in images], columns)
    )
    pairs = [
        tile([drawn(img, predicted["model"][n]), drawn(img, on_val["points"][n])], 2, 1)
        for n, img in images.items()
    ]
    save_png(folder / "regressed.png", tile(pairs, columns))
