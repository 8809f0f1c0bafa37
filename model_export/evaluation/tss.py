"""TSS: dense flow accuracy, mask-transfer IoU and how well the confidence tells right from
wrong matches."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jlad_client.coords import mapping_to_target_pixels
from jlad_client.viz import blend, flow_to_rgb
from jlad_client.warp import identity_grid, resize_field, sample_bilinear, sample_nearest
from numpy.typing import NDArray
from tqdm import tqdm

from model_export.data import TSSPairs, image_to_tensor
from model_export.evaluation.common import (
    METHODS,
    RGB,
    captioned,
    image_features,
    image_size,
    mean,
    pair_mappings,
    save_png,
    tile,
)
from model_export.metrics import correct_flow_pixels, flow_accuracy, mask_iou, roc_auc
from model_export.model import JLAD

log = logging.getLogger("jlad.evaluate")


def _unflip_columns(
    positions: NDArray[np.float32], source_width: int, *, grid_is_source: bool
) -> NDArray[np.float32]:
    """Undo a horizontal flip of the source image in a field of positions.

    grid_is_source: the field is indexed by (flipped) source pixels, so its columns are
    reversed; otherwise it holds (flipped) source positions, whose x is mirrored.
    """
    if grid_is_source:
        return np.ascontiguousarray(positions[:, ::-1])
    out = positions.copy()
    out[..., 0] = source_width - 1 - out[..., 0]
    return out


def evaluate_tss(
    model: JLAD,
    data: Path,
    out: Path,
    *,
    input_size: tuple[int, int],
    device: torch.device,
    figures: int = 6,
    threshold_px: float = 5.0,
    scale_to: float = 100.0,
) -> dict[str, Any]:
    """Flow accuracy (image 1 -> 2 over mask 1, end-point error under `threshold_px` with
    the longer image side scaled to `scale_to`) and mask-transfer IoU (mask 1 carried onto
    image 2 through the backward correspondence 2 -> 1, compared with mask 2). Pairs marked
    in `flip_gt.txt` are matched with image 1 mirrored, and the result mirrored back."""
    dataset = TSSPairs(data)
    pairs: list[dict[str, Any]] = []
    confidences: list[NDArray[np.float32]] = []
    correct: list[NDArray[np.bool_]] = []
    for index in tqdm(range(len(dataset)), desc="tss pairs", unit="pair"):
        item = dataset[index]
        image1 = item["image1"][:, ::-1] if item["flip"] else item["image1"]
        size1, size2 = image_size(item["image1"]), image_size(item["image2"])
        f1 = image_features(model, image_to_tensor(image1, input_size)[None].to(device))
        f2 = image_features(model, image_to_tensor(item["image2"], input_size)[None].to(device))
        with torch.no_grad():
            aligned = model.align(f1["model"], f2["model"])
        forward, backward = pair_mappings(model, f1, f2, aligned), pair_mappings(model, f2, f1)
        confidence = aligned["confidence"][0, 0].cpu().numpy()
        if item["flip"]:
            confidence = confidence[:, ::-1]
        record: dict[str, Any] = {"name": item["name"], "flip": item["flip"]}
        views: dict[str, tuple[NDArray[np.float32], RGB, NDArray[np.bool_]]] = {}
        for method in METHODS:
            matches = mapping_to_target_pixels(forward[method][0].cpu().numpy(), size1, size2)
            sources = mapping_to_target_pixels(backward[method][0].cpu().numpy(), size2, size1)
            if item["flip"]:
                matches = _unflip_columns(matches, size1[1], grid_is_source=True)
                sources = _unflip_columns(sources, size1[1], grid_is_source=False)
            flow = matches - identity_grid(*size1)
            if method == "model":
                evaluated, right = correct_flow_pixels(
                    flow, item["flow1"], item["mask1"], threshold_px, scale_to
                )
                dense = resize_field(np.ascontiguousarray(confidence)[..., None], size1)
                confidences.append(dense[..., 0][evaluated])
                correct.append(right)
            carried = sample_nearest(item["mask1"], sources).astype(bool)
            record[method] = {
                "flow_accuracy": flow_accuracy(
                    flow, item["flow1"], item["mask1"], threshold_px, scale_to
                ),
                "mask_iou": mask_iou(carried, item["mask2"]),
            }
            warped = sample_bilinear(item["image1"], sources).round().astype(np.uint8)
            views[method] = (flow, warped, carried)
        pairs.append(record)
        if index < figures:
            save_png(
                out / "tss" / f"{index:02d}_{item['name'].replace('/', '_')}.png",
                _tss_figure(item, record, views),
            )

    report = confidence_report(np.concatenate(confidences), np.concatenate(correct))
    log.info(
        "tss confidence: ROC AUC %.3f, flow accuracy per quartile %s",
        report["roc_auc"],
        " ".join(f"{a:.3f}" for a in report["accuracy_per_quartile"]),
    )
    keys = ("flow_accuracy", "mask_iou")
    summary = {m: {k: mean([p[m][k] for p in pairs]) for k in keys} for m in METHODS}
    subsets = sorted({p["name"].split("/")[0] for p in pairs})
    per_subset = {
        s: {
            m: {k: mean([p[m][k] for p in pairs if p["name"].split("/")[0] == s]) for k in keys}
            for m in METHODS
        }
        for s in subsets
    }
    return {
        "methods": summary,
        "per_subset": per_subset,
        "confidence": report,
        "num_pairs": len(pairs),
        "pairs": pairs,
        "protocol": f"flow accuracy: share of mask1 pixels with known flow whose EPE < "
        f"{threshold_px:g} px at longer side {scale_to:g} px; mask IoU: mask1 "
        "carried to image2 (nearest) vs mask2; flip_gt pairs: image1 mirrored",
    }


def confidence_report(confidence: NDArray[Any], correct: NDArray[np.bool_]) -> dict[str, Any]:
    """How well the model's confidence tells its correct matches from its wrong ones, over
    every evaluated pixel of every pair: ROC AUC and flow accuracy per confidence quartile."""
    edges = np.quantile(confidence, [0.0, 0.25, 0.5, 0.75, 1.0])
    quartile = np.clip(np.searchsorted(edges[1:-1], confidence, side="right"), 0, 3)
    return {
        "roc_auc": roc_auc(confidence, correct),
        "quartile_edges": [float(e) for e in edges],
        "accuracy_per_quartile": [float(np.mean(correct[quartile == q])) for q in range(4)],
        "pixels": int(confidence.size),
    }


def _tss_figure(
    item: dict[str, Any],
    record: dict[str, Any],
    views: dict[str, tuple[NDArray[np.float32], RGB, NDArray[np.bool_]]],
) -> RGB:
    """Rows: the pair and its true flow; then per method its flow (colour wheel, same
    scale as the truth), image 1 warped onto image 2, and the carried mask over image 2."""
    true = np.where(item["mask1"][..., None], item["flow1"], np.nan)
    scale = float(np.nanmax(np.linalg.norm(true, axis=-1))) if item["mask1"].any() else None
    cells = [
        captioned(item["image1"], "image 1"),
        captioned(item["image2"], "image 2"),
        captioned(flow_to_rgb(true, max_norm=scale), "true flow 1->2 (mask 1)"),
    ]
    red = np.zeros_like(item["image2"])
    red[..., 0] = 255
    for method, (flow, warped, carried) in views.items():
        overlay = np.where(carried[..., None], blend(item["image2"], red, 0.5), item["image2"])
        cells += [
            captioned(
                flow_to_rgb(np.where(item["mask1"][..., None], flow, np.nan), max_norm=scale),
                f"{method}: acc {record[method]['flow_accuracy']:.2f}",
            ),
            captioned(warped, f"{method}: image 1 warped to 2"),
            captioned(
                overlay.astype(np.uint8), f"{method}: mask IoU {record[method]['mask_iou']:.2f}"
            ),
        ]
    return tile(cells, 3)
