"""Pictures of results, shared by training, evaluation, the service and the CLI.

Everything here is numpy + Pillow: uint8 RGB arrays in, uint8 RGB arrays (or PNG bytes) out.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

RGB = NDArray[np.uint8]


def _colour_wheel() -> NDArray[np.float64]:
    """The Middlebury colour wheel (Baker et al. 2011): 55 hues, RY-YG-GC-CB-BM-MR."""
    segments = [
        (15, (255, 0, 0), (255, 255, 0)),
        (6, (255, 255, 0), (0, 255, 0)),
        (4, (0, 255, 0), (0, 255, 255)),
        (11, (0, 255, 255), (0, 0, 255)),
        (13, (0, 0, 255), (255, 0, 255)),
        (6, (255, 0, 255), (255, 0, 0)),
    ]
    rows = []
    for n, start, end in segments:
        t = np.arange(n)[:, None] / n
        rows.append((1 - t) * np.array(start) + t * np.array(end))
    return np.concatenate(rows) / 255.0


_WHEEL = _colour_wheel()


def flow_to_rgb(flow: NDArray[np.floating], max_norm: float | None = None) -> RGB:
    """Colour-code an (H, W, 2) flow: hue is the direction, saturation the magnitude.

    `max_norm` sets the magnitude drawn fully saturated (default: the largest finite one).
    Unknown (non-finite) vectors are drawn black.
    """
    flow = np.asarray(flow, np.float64)
    valid = np.isfinite(flow).all(axis=-1)
    u = np.where(valid, flow[..., 0], 0.0)
    v = np.where(valid, flow[..., 1], 0.0)
    norm = np.hypot(u, v)
    scale = max_norm if max_norm is not None else (float(norm.max()) if norm.size else 0.0)
    scale = max(scale, 1e-9)
    u, v, norm = u / scale, v / scale, np.minimum(norm / scale, 1.0)
    angle = np.arctan2(-v, -u) / np.pi  # in [-1, 1]
    pos = (angle + 1) / 2 * (len(_WHEEL) - 1)
    i0 = np.floor(pos).astype(int)
    i1 = (i0 + 1) % len(_WHEEL)
    frac = (pos - i0)[..., None]
    colour = (1 - frac) * _WHEEL[i0] + frac * _WHEEL[i1]
    colour = 1 - norm[..., None] * (1 - colour)
    colour[~valid] = 0
    rgb: RGB = (colour * 255).round().astype(np.uint8)
    return rgb


def heat_rgb(values: NDArray[np.floating], vmin: float = 0.0, vmax: float = 1.0) -> RGB:
    """Map a (H, W) array to a dark-blue -> yellow heat map (viridis-like, no matplotlib)."""
    anchors = np.array(
        [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64
    )
    t = np.clip((np.asarray(values, np.float64) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    t = np.nan_to_num(t)
    pos = t * (len(anchors) - 1)
    i0 = np.minimum(np.floor(pos).astype(int), len(anchors) - 2)
    frac = (pos - i0)[..., None]
    rgb: RGB = ((1 - frac) * anchors[i0] + frac * anchors[i0 + 1]).round().astype(np.uint8)
    return rgb


def palette(n: int) -> list[tuple[int, int, int]]:
    """`n` distinct, stable colours: colour i always belongs to landmark index i."""
    golden = 0.618033988749895
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * golden) % 1.0, 0.85, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw_points(
    image: RGB,
    points: NDArray[np.floating] | Sequence[Sequence[float]],
    radius: float | None = None,
    labels: bool = True,
) -> RGB:
    """Draw points (N, 2) in pixel coordinates on an RGB image, one colour per index."""
    canvas = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    draw = ImageDraw.Draw(canvas)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    r = radius if radius is not None else max(2.0, min(canvas.size) / 60)
    for i, (colour, (x, y)) in enumerate(zip(palette(len(pts)), pts, strict=True)):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(0, 0, 0))
        if labels:
            draw.text((x + r + 1, y - r - 1), str(i), fill=colour)
    return np.asarray(canvas)


def side_by_side(left: RGB, right: RGB, gap: int = 8) -> tuple[RGB, int]:
    """Put two images next to each other (top-aligned); returns the canvas and x offset."""
    height = max(left.shape[0], right.shape[0])
    width = left.shape[1] + gap + right.shape[1]
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left[..., :3]
    canvas[: right.shape[0], left.shape[1] + gap :] = right[..., :3]
    return canvas, left.shape[1] + gap


def draw_matches(
    source: RGB,
    target: RGB,
    source_points: NDArray[np.floating],
    target_points: NDArray[np.floating],
    confidence: NDArray[np.floating] | None = None,
) -> RGB:
    """Draw lines between matched points of two images placed side by side."""
    canvas, offset = side_by_side(source, target)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    src = np.asarray(source_points, np.float64).reshape(-1, 2)
    tgt = np.asarray(target_points, np.float64).reshape(-1, 2)
    colours = palette(len(src))
    for i, ((x0, y0), (x1, y1)) in enumerate(zip(src, tgt, strict=True)):
        width = 1 if confidence is None else 1 + int(2 * float(confidence[i]))
        draw.line([x0, y0, x1 + offset, y1], fill=colours[i], width=width)
        draw.ellipse([x0 - 2, y0 - 2, x0 + 2, y0 + 2], fill=colours[i])
        draw.ellipse([x1 + offset - 2, y1 - 2, x1 + offset + 2, y1 + 2], fill=colours[i])
    return np.asarray(img)


def blend(image: RGB, overlay: RGB, alpha: float = 0.5) -> RGB:
    """Alpha-blend two RGB images of the same size."""
    out = (1 - alpha) * image[..., :3].astype(np.float64) + alpha * overlay[..., :3]
    return out.round().astype(np.uint8)


def to_png(image: NDArray[np.uint8]) -> bytes:
    """Encode a uint8 (H, W), (H, W, 3) or (H, W, 4) array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
