"""What the benchmarks share: running the model and its baselines, averaging, figures.

Every benchmark reports the model beside baselines computed on the same images:
`nearest_neighbour` (argmax of cosine similarity between the model's own frozen backbone
features, no trained head) and `identity` (every position matched to the same normalised
position); the landmark benchmarks add `mean_shape` (the training annotations' mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jlad_client.viz import to_png
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from torch import Tensor

from model_export.baselines import identity_mapping, nearest_neighbour_mapping
from model_export.model import JLAD

METHODS = ("model", "nearest_neighbour", "identity")

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


def image_size(image: NDArray[Any]) -> tuple[int, int]:
    """(H, W) of an image array."""
    return int(image.shape[0]), int(image.shape[1])


def mean(values: Sequence[float]) -> float:
    """Mean of `values`; NaN when there is none."""
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
    """Write `image` as a PNG, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_png(image))
