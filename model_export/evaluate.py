"""Evaluation CLI: PCK on PF-WILLOW, flow accuracy and mask IoU on TSS, landmark error on MTFL.

    python -m model_export.evaluate pfwillow --checkpoint checkpoints/objects \\
        --data ../shared/data/pf-willow-sample --out runs/eval/objects
    python -m model_export.evaluate tss --checkpoint checkpoints/objects \\
        --data ../shared/data/tss-sample --out runs/eval/objects
    python -m model_export.evaluate faces --checkpoint checkpoints/faces \\
        --data ../shared/data/mtfl-train --out runs/eval/faces
    python -m model_export.evaluate all --checkpoints checkpoints --data ../shared/data \\
        --out runs/eval

Every task reports the model beside two baselines computed on the same images:
`nearest_neighbour` (argmax of cosine similarity between the model's own frozen backbone
features, no trained head) and `identity` (every position matched to the same normalised
position). Each run writes `<out>/<task>.json` (figures) and PNGs under `<out>/<task>/`.
Protocols: docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jlad_client.coords import (
    mapping_to_target_pixels,
    normalised_to_pixels,
    pixels_to_normalised,
    transfer_points,
)
from jlad_client.viz import blend, draw_matches, draw_points, flow_to_rgb, to_png
from jlad_client.warp import identity_grid, resize_field, sample_bilinear, sample_nearest
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_export.baselines import identity_mapping, nearest_neighbour_mapping
from model_export.checkpoint import load_model
from model_export.data import MTFL_MISALIGNED, MTFLFaces, PFWillow, TSSPairs, image_to_tensor
from model_export.geometry import sample_at
from model_export.metrics import (
    DEFAULT_ALPHAS,
    correct_flow_pixels,
    fit_landmark_regressor,
    flow_accuracy,
    keypoint_bbox_size,
    landmark_error,
    mask_iou,
    pck,
    regress_landmarks,
    roc_auc,
)
from model_export.model import JLAD

log = logging.getLogger("jlad.evaluate")

METHODS = ("model", "nearest_neighbour", "identity")
TASKS = ("pfwillow", "tss", "faces")
DEFAULT_DATA_DIRS = {"pfwillow": "pf-willow-sample", "tss": "tss-sample", "faces": "mtfl-train"}
DEFAULT_MODELS = {"pfwillow": "objects", "tss": "objects", "faces": "faces"}

Features = dict[str, Tensor]
RGB = NDArray[np.uint8]


# --- running the model and the baselines ---------------------------------------------------


@torch.no_grad()
def image_features(model: JLAD, images: Tensor) -> Features:
    """Both feature kinds of (B, 3, H, W) images: `model` (adapted, what the heads see) and
    `backbone` (the frozen backbone's, for the nearest-neighbour baseline)."""
    backbone = model.backbone_features(images)
    return {"model": model.adapt(backbone), "backbone": backbone}


@torch.no_grad()
def pair_mappings(
    model: JLAD,
    source: Features,
    target: Features,
    alignment: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """`mapping` (B, 2, h, w) of every method for source -> target (docs/CONTRACT.md).
    `alignment`: the model's `align` output for this pair when the caller already has it."""
    b, _, h, w = source["model"].shape
    if alignment is None:
        alignment = model.align(source["model"], target["model"])
    return {
        "model": alignment["mapping"],
        "nearest_neighbour": nearest_neighbour_mapping(source["backbone"], target["backbone"]),
        "identity": identity_mapping(b, h, w, like=source["model"]),
    }


def _size(image: NDArray[Any]) -> tuple[int, int]:
    return int(image.shape[0]), int(image.shape[1])


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# --- pictures ------------------------------------------------------------------------------


def captioned(image: RGB, text: str) -> RGB:
    """The image with a white strip above it holding `text`."""
    strip = 14
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + strip), (255, 255, 255))
    canvas.paste(Image.fromarray(np.ascontiguousarray(image[..., :3])), (0, strip))
    ImageDraw.Draw(canvas).text((2, 1), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def tile(images: Sequence[RGB], columns: int, gap: int = 4) -> RGB:
    """Lay images out on a white grid, `columns` per row, each cell the largest size."""
    if not images:
        raise ValueError("nothing to tile")
    cell_h = max(img.shape[0] for img in images)
    cell_w = max(img.shape[1] for img in images)
    rows = math.ceil(len(images) / columns)
    canvas = np.full(
        (rows * cell_h + (rows - 1) * gap, columns * cell_w + (columns - 1) * gap, 3), 255, np.uint8
    )
    for n, img in enumerate(images):
        y, x = (n // columns) * (cell_h + gap), (n % columns) * (cell_w + gap)
        canvas[y : y + img.shape[0], x : x + img.shape[1]] = img[..., :3]
    return canvas


def upscale(image: RGB, factor: int) -> RGB:
    """Nearest-neighbour enlargement, so small faces show their landmarks legibly."""
    return np.ascontiguousarray(image.repeat(factor, axis=0).repeat(factor, axis=1))


def tensor_to_rgb(image: Tensor) -> RGB:
    """(3, H, W) float in [0, 1] -> uint8 (H, W, 3)."""
    array = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return (array * 255).round().astype(np.uint8)


def save_png(path: Path, image: RGB) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_png(image))


# --- PF-WILLOW -----------------------------------------------------------------------------


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
                mapping[0].cpu().numpy(), src_pts, _size(src_img), _size(tgt_img)
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
            m: {k: _mean([p[m][k] for p in chosen]) for k in keys} for m in METHODS
        }
    summary = {
        m: {k: _mean([per_class[c][m][k] for c in per_class]) for k in keys} for m in METHODS
    }
    all_pairs = {m: {k: _mean([p[m][k] for p in pairs]) for k in keys} for m in METHODS}
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


# --- TSS -----------------------------------------------------------------------------------


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
        size1, size2 = _size(item["image1"]), _size(item["image2"])
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
    summary = {m: {k: _mean([p[m][k] for p in pairs]) for k in keys} for m in METHODS}
    subsets = sorted({p["name"].split("/")[0] for p in pairs})
    per_subset = {
        s: {
            m: {k: _mean([p[m][k] for p in pairs if p["name"].split("/")[0] == s]) for k in keys}
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


# --- MTFL landmarks ------------------------------------------------------------------------


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


# --- command line --------------------------------------------------------------------------

Runner = Callable[..., dict[str, Any]]
RUNNERS: dict[str, Runner] = {
    "pfwillow": evaluate_pfwillow,
    "tss": evaluate_tss,
    "faces": evaluate_faces,
}


def run_task(
    task: str,
    checkpoint: Path,
    data: Path,
    out: Path,
    *,
    device: torch.device,
    options: dict[str, Any] | None = None,
    update_checkpoint_metrics: bool = False,
) -> dict[str, Any]:
    """Evaluate one checkpoint on one task; writes `<out>/<task>.json` and returns it."""
    model, config = load_model(checkpoint)
    model.to(device)
    input_size = (int(config["input_size"][0]), int(config["input_size"][1]))
    log.info("%s: checkpoint %s, data %s, input %dx%d", task, checkpoint, data, *input_size)
    start = time.perf_counter()
    result = RUNNERS[task](
        model, data, out, input_size=input_size, device=device, **(options or {})
    )
    report = {
        "task": task,
        "checkpoint": str(checkpoint),
        "data": str(data),
        "input_size": list(input_size),
        "seconds": round(time.perf_counter() - start, 2),
        **result,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{task}.json").write_text(json.dumps(report, indent=2))
    for method, figures in report["methods"].items():
        log.info("%s %-18s %s", task, method, "  ".join(f"{k}={v:.4f}" for k, v in figures.items()))
    if update_checkpoint_metrics:
        path = checkpoint / "metrics.json"
        existing = json.loads(path.read_text()) if path.exists() else {}
        existing[task] = {"data": data.name, "methods": report["methods"]}
        path.write_text(json.dumps(existing, indent=2, sort_keys=True))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_export.evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("task", choices=[*TASKS, "all"])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint folder (single task; default checkpoints/<model>)",
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=Path("checkpoints"),
        help="folder of checkpoints (task 'all': objects/ and faces/ in it)",
    )
    parser.add_argument("--objects-model", default="objects")
    parser.add_argument("--faces-model", default="faces")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the data set folder; for 'all' the folder holding "
        "pf-willow-sample/, tss-sample/ and mtfl-train/",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--figures",
        type=int,
        default=None,
        help="how many pairs (or faces) to draw (default per task)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.1, help="faces: held-out share")
    parser.add_argument("--seed", type=int, default=0, help="faces: split seed")
    parser.add_argument("--max-train", type=int, default=None, help="faces: cap the train split")
    parser.add_argument("--max-val", type=int, default=None, help="faces: cap the val split")
    parser.add_argument("--batch-size", type=int, default=64, help="faces: batch size")
    parser.add_argument(
        "--faces-exclude",
        nargs="*",
        default=list(MTFL_MISALIGNED),
        metavar="GLOB",
        help="faces: image paths to leave out (default: the MTFL crops whose annotations miss "
        "their faces, %(default)s); give the flag alone to keep every face",
    )
    parser.add_argument(
        "--update-checkpoint-metrics",
        action="store_true",
        help="also merge the figures into <checkpoint>/metrics.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {"pfwillow": args.objects_model, "tss": args.objects_model, "faces": args.faces_model}
    tasks = list(TASKS) if args.task == "all" else [args.task]
    reports: dict[str, dict[str, Any]] = {}
    for task in tasks:
        options: dict[str, Any] = {}
        if args.figures is not None:
            options["figures"] = args.figures
        if task == "faces":
            options.update(
                val_fraction=args.val_fraction,
                seed=args.seed,
                max_train=args.max_train,
                max_val=args.max_val,
                batch_size=args.batch_size,
                exclude=args.faces_exclude,
            )
        if args.task == "all":
            checkpoint = args.checkpoints / models[task]
            data = args.data / DEFAULT_DATA_DIRS[task]
            out = args.out / models[task]
        else:
            checkpoint = args.checkpoint or args.checkpoints / models[task]
            data, out = args.data, args.out
        reports[task] = run_task(
            task,
            checkpoint,
            data,
            out,
            device=device,
            options=options,
            update_checkpoint_metrics=args.update_checkpoint_metrics,
        )
    if args.task == "all":
        summary = {
            task: {"checkpoint": r["checkpoint"], "methods": r["methods"]}
            for task, r in reports.items()
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return reports


if __name__ == "__main__":
    main()
