"""PF-WILLOW: PCK of keypoints carried from source to target, per class, all ordered pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jlad_client.coords import transfer_points
from jlad_client.viz import draw_matches, draw_points
from tqdm import tqdm

from model_export.data import PFWillow, image_to_tensor
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


def evaluate_pfwillow(
    model: JLAD,
    data: Path,
    out: Path,
    *,
    input_size: tuple[int, int],
    device: torch.device,
    figures: int = 4,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> dict[str, Any]:
    """PCK@alpha over all ordered pairs of each class, L = longer side of the target
    keypoints' bounding box; keypoints carried by bilinearly sampling each method's mapping
    (upsampled to the source image) at the source keypoints."""
    dataset = PFWillow(data)
    cache: dict[str, Features] = {}

    def features_of(name: str, image: RGB) -> Features:
        if name not in cache:
            batch = image_to_tensor(image, input_size).unsqueeze(0).to(device)
            cache[name] = image_features(model, batch)
        return cache[name]

    pairs: list[dict[str, Any]] = []
    for index in tqdm(range(len(dataset)), desc="pf-willow pairs", unit="pair"):
        item = dataset[index]
        src_img, tgt_img = item["source_image"], item["target_image"]
        src_pts, tgt_pts = item["source_points"], item["target_points"]
        mappings = pair_mappings(
            model,
            features_of(f"{item['category']}/{item['source_name']}", src_img),
            features_of(f"{item['category']}/{item['target_name']}", tgt_img),
        )
        length = keypoint_bbox_size(tgt_pts)
        record: dict[str, Any] = {
            "category": item["category"],
            "source": item["source_name"],
            "target": item["target_name"],
            "L": length,
        }
        predictions = {}
        for method, mapping in mappings.items():
            predictions[method] = transfer_points(
                mapping[0].cpu().numpy(), src_pts, image_size(src_img), image_size(tgt_img)
            )
            record[method] = {
                f"pck@{a:g}": v
                for a, v in pck(predictions[method], tgt_pts, length, alphas).items()
            }
        pairs.append(record)
        if index < figures:
            rows = []
            for method in ("model", "nearest_neighbour"):
                marked = draw_points(tgt_img, tgt_pts, labels=False)  # truth: filled dots
                rows.append(
                    captioned(
                        draw_matches(src_img, marked, src_pts, predictions[method]),
                        f"{method}: PCK@0.1 = {record[method].get('pck@0.1', math.nan):.2f}",
                    )
                )
            save_png(
                out / "pfwillow" / f"matches_{index:03d}_{item['source_name']}_"
                f"{item['target_name']}.png",
                tile(rows, 1),
            )

    keys = [f"pck@{a:g}" for a in alphas]
    per_class: dict[str, dict[str, dict[str, float]]] = {}
    for category in dataset.classes:
        chosen = [p for p in pairs if p["category"] == category]
        per_class[category] = {
            m: {k: mean([p[m][k] for p in chosen]) for k in keys} for m in METHODS
        }
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
