"""PF-WILLOW: PCK of keypoints carried from source to target, per class, all ordered pairs."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jlad_client.coords import transfer_points
from jlad_client.viz import draw_matches, draw_points
from numpy.typing import NDArray
from tqdm import tqdm

from model_export.data import PFWillow, image_to_tensor, read_pf_keypoints, read_rgb
from model_export.evaluation.common import (
    METHODS,
    RGB,
    Features,
    captioned,
    image_features,
    image_size,
    mean,
    pair_mappings,
    save_png,
    tile,
)
from model_export.metrics import DEFAULT_ALPHAS, keypoint_bbox_size, pck
from model_export.model import JLAD

log = logging.getLogger("jlad.evaluate")


def class_mappings(model: JLAD, features: Features, source: int) -> dict[str, torch.Tensor]:
    """Every method's `mapping` from image `source` of a class to each of the class's other
    images, in one batch: (N - 1, 2, h, w) per method, targets in order, `source` skipped."""
    targets = [t for t in range(len(features["model"])) if t != source]
    source_features = {
        k: v[source : source + 1].expand(len(targets), -1, -1, -1) for k, v in features.items()
    }
    target_features = {k: v[targets] for k, v in features.items()}
    return pair_mappings(model, source_features, target_features)


def evaluate_pfwillow(
    model: JLAD,
    data: Path,
    out: Path,
    *,
    input_size: tuple[int, int],
    device: torch.device,
    figures: int = 1,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> dict[str, Any]:
    """PCK@alpha over all ordered pairs of each class, L = longer side of the target
    keypoints' bounding box; keypoints carried by bilinearly sampling each method's mapping
    (upsampled to the source image) at the source keypoints. `methods` is the mean over
    the classes (each class counts once), `all_pairs` the mean over every pair.

    Features are computed once per image; each source is aligned to all the other images
    of its class in one batch. `figures`: pairs drawn per class (the first ones)."""
    dataset = PFWillow(data)
    keys = [f"pck@{a:g}" for a in alphas]
    pairs: list[dict[str, Any]] = []
    progress = tqdm(total=len(dataset), desc="pf-willow pairs", unit="pair")
    for category, paths in zip(dataset.classes, dataset.images, strict=True):
        images = [read_rgb(p) for p in paths]
        points = [read_pf_keypoints(p.with_suffix(".mat")) for p in paths]
        batch = torch.stack([image_to_tensor(img, input_size) for img in images]).to(device)
        features = image_features(model, batch)
        drawn = 0
        for s, (src_img, src_pts) in enumerate(zip(images, points, strict=True)):
            mappings = {m: v.cpu().numpy() for m, v in class_mappings(model, features, s).items()}
            targets = [t for t in range(len(images)) if t != s]
            for n, t in enumerate(targets):
                tgt_img, tgt_pts = images[t], points[t]
                if src_pts.shape != tgt_pts.shape:
                    raise ValueError(f"{paths[s].stem} and {paths[t].stem}: keypoint counts differ")
                length = keypoint_bbox_size(tgt_pts)
                record: dict[str, Any] = {
                    "category": category,
                    "source": paths[s].stem,
                    "target": paths[t].stem,
                    "L": length,
                }
                predictions = {}
                for method, mapping in mappings.items():
                    predictions[method] = transfer_points(
                        mapping[n], src_pts, image_size(src_img), image_size(tgt_img)
                    )
                    record[method] = {
                        f"pck@{a:g}": v
                        for a, v in pck(predictions[method], tgt_pts, length, alphas).items()
                    }
                pairs.append(record)
                progress.update()
                if drawn < figures:
                    drawn += 1
                    save_png(
                        out
                        / "pfwillow"
                        / f"matches_{category}_{paths[s].stem}_{paths[t].stem}.png",
                        _pair_figure(src_img, tgt_img, src_pts, tgt_pts, predictions, record),
                    )
    progress.close()

    per_class: dict[str, dict[str, dict[str, float]]] = {}
    for category in dataset.classes:
        chosen = [p for p in pairs if p["category"] == category]
        per_class[category] = {
            m: {k: mean([p[m][k] for p in chosen]) for k in keys} for m in METHODS
        }
        log.info(
            "pfwillow %-14s %s",
            category,
            "  ".join(
                f"{m} " + "/".join(f"{per_class[category][m][k]:.3f}" for k in keys)
                for m in METHODS
            ),
        )
    summary = {m: {k: mean([per_class[c][m][k] for c in per_class]) for k in keys} for m in METHODS}
    all_pairs = {m: {k: mean([p[m][k] for p in pairs]) for k in keys} for m in METHODS}
    return {
        "methods": summary,
        "all_pairs": all_pairs,
        "per_class": per_class,
        "num_pairs": len(pairs),
        "classes": dataset.classes,
        "pairs": pairs,
        "protocol": "PCK@alpha, L = longer side of the target keypoints' bounding box, "
        "all ordered pairs per class; 'methods' = mean over classes",
    }


def _pair_figure(
    src_img: RGB,
    tgt_img: RGB,
    src_pts: NDArray[np.float64],
    tgt_pts: NDArray[np.float64],
    predictions: dict[str, NDArray[np.float64]],
    record: dict[str, Any],
) -> RGB:
    """Rows: the model's and the nearest-neighbour baseline's matches (the line ends at the
    prediction; the filled dot of the same colour is the true target keypoint)."""
    rows = []
    for method in ("model", "nearest_neighbour"):
        marked = draw_points(tgt_img, tgt_pts, labels=False)
        rows.append(
            captioned(
                draw_matches(src_img, marked, src_pts, predictions[method]),
                f"{record['category']} {method}: "
                f"PCK@0.1 = {record[method].get('pck@0.1', math.nan):.2f}",
            )
        )
    return tile(rows, 1)
