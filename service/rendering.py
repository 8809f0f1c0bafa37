"""PNG views of results, drawn with the shared helpers of `jlad_client.viz` and `.warp`."""

from __future__ import annotations

import numpy as np
from jlad_client.viz import (
    blend,
    draw_matches,
    draw_points,
    flow_to_rgb,
    heat_rgb,
    side_by_side,
    to_png,
)
from jlad_client.warp import resize_field, sample_bilinear
from numpy.typing import NDArray

RGB8 = NDArray[np.uint8]
F32 = NDArray[np.float32]


def flow_png(flow: F32) -> bytes:
    """(rows, cols, 2) flow as the Middlebury colour wheel."""
    return to_png(flow_to_rgb(flow))


def confidence_png(confidence: F32) -> bytes:
    """(rows, cols) confidence in [0, 1] as a heat map (dark = unreliable)."""
    return to_png(heat_rgb(confidence, 0.0, 1.0))


def warped_png(source: RGB8, backward_positions: F32) -> bytes:
    """The source image warped onto the target: `backward_positions` (Ht, Wt, 2) gives each
    target pixel's source (x, y); pixels that come from outside the source are black."""
    warped = sample_bilinear(source, backward_positions, fill=0.0)
    return to_png(np.clip(np.rint(warped), 0, 255).astype(np.uint8))


def matches_png(
    source: RGB8, target: RGB8, source_points: F32, target_points: F32, confidence: F32
) -> bytes:
    """Source and target side by side, a line per match (thicker = more confident)."""
    return to_png(draw_matches(source, target, source_points, target_points, confidence))


def landmarks_png(images: list[RGB8], points: list[F32]) -> bytes:
    """Landmarks drawn on each image (colour = landmark index), images side by side."""
    drawn = [draw_points(image, pts) for image, pts in zip(images, points, strict=True)]
    canvas = drawn[0]
    for image in drawn[1:]:
        canvas, _ = side_by_side(canvas, image)
    return to_png(canvas)


def heatmaps_png(image: RGB8, heatmaps: F32) -> bytes:
    """All landmark heat maps (K, h, w), summed and upsampled, blended over the image."""
    total = heatmaps.sum(axis=0)
    total = total / max(float(total.max()), 1e-12)
    height, width = image.shape[:2]
    upsampled = resize_field(total[..., None], (height, width))[..., 0]
    return to_png(blend(image, heat_rgb(upsampled), 0.6))


def lattice_points(width: int, height: int, per_side: int = 6) -> F32:
    """(per_side**2, 2) evenly spaced pixel positions inside a `width` x `height` image, the
    default query points of the matches view."""
    xs = (np.arange(per_side, dtype=np.float32) + 0.5) * width / per_side - 0.5
    ys = (np.arange(per_side, dtype=np.float32) + 0.5) * height / per_side - 0.5
    grid = np.stack(np.meshgrid(xs, ys), axis=-1)
    return np.ascontiguousarray(grid.reshape(-1, 2))
