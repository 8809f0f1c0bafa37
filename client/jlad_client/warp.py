"""Sampling images and masks through dense correspondence fields (numpy only).

A backward field `field` of shape (H, W, 2) gives, for every output pixel q, the pixel
coordinates (x, y) in the input to read (pixel centres at integers). Used to warp a source
image or mask onto a target, in the service, the evaluation and the client alike.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def identity_grid(height: int, width: int) -> NDArray[np.float32]:
    """(H, W, 2) array of each pixel's own (x, y)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return np.stack([xs, ys], axis=-1)


def sample_bilinear(
    image: NDArray[np.generic], coords: NDArray[np.floating], fill: float = 0.0
) -> NDArray[np.float32]:
    """Bilinearly sample `image` (H, W) or (H, W, C) at `coords` (..., 2) pixel (x, y).

    Positions outside the image get `fill`.
    """
    img = np.asarray(image, np.float32)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    height, width = img.shape[:2]
    x, y = coords[..., 0].astype(np.float32), coords[..., 1].astype(np.float32)
    inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    x = np.clip(x, 0, width - 1)
    y = np.clip(y, 0, height - 1)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    x1 = np.minimum(x0 + 1, width - 1)
    y1 = np.minimum(y0 + 1, height - 1)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    out = top * (1 - fy) + bottom * fy
    out[~inside] = fill
    result: NDArray[np.float32] = out[..., 0] if squeeze else out
    return result


def sample_nearest(
    labels: NDArray[np.generic], coords: NDArray[np.floating], fill: int = 0
) -> NDArray[np.generic]:
    """Nearest-neighbour sample of a label map (H, W) at `coords` (..., 2): labels are
    copied, never blended. Positions outside the map get `fill`."""
    lab = np.asarray(labels)
    height, width = lab.shape[:2]
    x = np.rint(coords[..., 0]).astype(np.int64)
    y = np.rint(coords[..., 1]).astype(np.int64)
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    out: NDArray[np.generic] = lab[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)].copy()
    out[~inside] = fill
    return out


def resize_field(field: NDArray[np.floating], out_size: tuple[int, int]) -> NDArray[np.float32]:
    """Bilinearly resample an (h, w, C) field given on a grid of cells that cover an image
    onto every pixel of an image of `out_size` = (H, W) that the same grid covers.

    Cell centres follow the align_corners=False convention, so a grid and the image it
    covers share edges.
    """
    h, w = field.shape[:2]
    out_h, out_w = out_size
    ys = (np.arange(out_h, dtype=np.float32) + 0.5) * h / out_h - 0.5
    xs = (np.arange(out_w, dtype=np.float32) + 0.5) * w / out_w - 0.5
    grid = np.stack(np.meshgrid(xs, ys), axis=-1)
    return sample_bilinear(np.asarray(field, np.float32), grid)
