"""From the models' normalised cell-grid outputs to pixel quantities of the original images.

The conversions themselves are `jlad_client.coords` (shared with the evaluation, so the
service produces exactly what was measured offline); this module adapts them to the
service's `(width, height)` image sizes and its `resolution` option.
"""

from __future__ import annotations

import numpy as np
from jlad_client.coords import (
    mapping_to_target_pixels,
    normalised_to_pixels,
    rescale_pixels,
    transfer_points,
)
from jlad_client.warp import identity_grid, resize_field, sample_bilinear
from numpy.typing import NDArray

F32 = NDArray[np.float32]
WH = tuple[int, int]


def _hw(wh: WH) -> tuple[int, int]:
    return wh[1], wh[0]


def grid_cell_centres(grid_h: int, grid_w: int, width: int, height: int) -> F32:
    """(h, w, 2) pixel (x, y) in a `width` x `height` image of each grid cell's centre."""
    centres = rescale_pixels(identity_grid(grid_h, grid_w), (grid_h, grid_w), (height, width))
    return centres.astype(np.float32)


def match_positions(mapping: F32, from_wh: WH, to_wh: WH) -> F32:
    """Where every pixel of the "from" image (`from_wh`) lands in the "to" image: (H, W, 2)
    pixel positions, from the cell-grid `mapping` (2, h, w)."""
    return mapping_to_target_pixels(mapping, _hw(from_wh), _hw(to_wh))


def dense_flow(mapping: F32, resolution: str, from_wh: WH, to_wh: WH) -> F32:
    """Flow in pixels from `mapping` (2, h, w), sampled at the grid or at every pixel.

    `resolution`: "grid" -> (h, w, 2) at cell centres; "pixels" -> (H, W, 2) at every pixel
    of the "from" image (`from_wh` = (W, H)).
    """
    if resolution == "grid":
        grid_h, grid_w = mapping.shape[1:]
        positions = normalised_to_pixels(mapping.transpose(1, 2, 0), _hw(to_wh))
        return (positions - grid_cell_centres(grid_h, grid_w, *from_wh)).astype(np.float32)
    return match_positions(mapping, from_wh, to_wh) - identity_grid(*_hw(from_wh))


def dense_confidence(confidence: F32, resolution: str, from_wh: WH) -> F32:
    """Confidence (h, w) on the grid, or bilinearly upsampled to every "from" pixel."""
    if resolution == "grid":
        return np.asarray(confidence, np.float32)
    return resize_field(confidence[..., None], _hw(from_wh))[..., 0]


def match_points(
    mapping: F32, confidence: F32, points: F32, from_wh: WH, to_wh: WH
) -> tuple[F32, F32]:
    """Matches of query points: (N, 2) pixel (x, y) in the "from" image -> (N, 2) pixel
    positions in the "to" image (the dense field read bilinearly at each point) and (N,)
    confidences."""
    grid_hw = (int(confidence.shape[0]), int(confidence.shape[1]))
    matched = transfer_points(mapping, points, _hw(from_wh), _hw(to_wh))
    cells = rescale_pixels(points, _hw(from_wh), grid_hw)
    conf = sample_bilinear(confidence, cells)
    return matched.astype(np.float32), np.asarray(conf, np.float32)


def landmarks_to_pixels(points: F32, width: int, height: int) -> F32:
    """(K, 2) normalised landmark positions -> pixel (x, y) in the original image."""
    return normalised_to_pixels(points, (height, width)).astype(np.float32)
