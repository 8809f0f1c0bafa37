"""From the models' normalised cell-grid outputs to pixel quantities of the original images.

Conventions (docs/CONTRACT.md): pixel centres at integers; normalised coordinates with
align_corners=False, `x_pix = (x_norm + 1) * W / 2 - 0.5`; the cell (i, j) of an h x w grid
is centred on normalised `((2j + 1) / w - 1, (2i + 1) / h - 1)`.
"""

from __future__ import annotations

import numpy as np
from jlad_client.warp import identity_grid, resize_field, sample_bilinear
from numpy.typing import NDArray

F32 = NDArray[np.float32]


def normalised_to_pixels(coords: NDArray[np.floating], width: int, height: int) -> F32:
    """(..., 2) normalised (x, y) -> pixel (x, y) in an image of `width` x `height`."""
    c = np.asarray(coords, np.float32)
    scale = np.array([width / 2, height / 2], np.float32)
    out: F32 = (c + 1) * scale - 0.5
    return out


def pixels_to_grid(
    points: NDArray[np.floating], width: int, height: int, grid_w: int, grid_h: int
) -> F32:
    """(..., 2) pixel (x, y) of a `width` x `height` image -> fractional cell (x, y) on the
    `grid_w` x `grid_h` grid that covers it (cell centres at integers)."""
    p = np.asarray(points, np.float32)
    ratio = np.array([grid_w / width, grid_h / height], np.float32)
    out: F32 = (p + 0.5) * ratio - 0.5
    return out


def grid_cell_centres(grid_h: int, grid_w: int, width: int, height: int) -> F32:
    """(h, w, 2) pixel (x, y) in a `width` x `height` image of each grid cell's centre."""
    return pixels_from_grid(identity_grid(grid_h, grid_w), width, height, grid_w, grid_h)


def pixels_from_grid(
    cells: NDArray[np.floating], width: int, height: int, grid_w: int, grid_h: int
) -> F32:
    """Inverse of `pixels_to_grid`."""
    c = np.asarray(cells, np.float32)
    ratio = np.array([width / grid_w, height / grid_h], np.float32)
    out: F32 = (c + 0.5) * ratio - 0.5
    return out


def mapping_to_positions(
    mapping: F32, out_hw: tuple[int, int] | None, to_wh: tuple[int, int]
) -> F32:
    """Absolute pixel positions in the "to" image of each sampled "from" position.

    `mapping`: (2, h, w) normalised (x, y) in the "to" image per cell of the "from" grid.
    `out_hw`: None keeps the cell grid (h, w); (H, W) upsamples bilinearly to every pixel of
    the "from" image. `to_wh`: (width, height) of the "to" image. Returns (rows, cols, 2).
    """
    field = np.ascontiguousarray(mapping.transpose(1, 2, 0), np.float32)
    if out_hw is not None:
        field = resize_field(field, out_hw)
    return normalised_to_pixels(field, *to_wh)


def positions_to_flow(positions: F32, from_positions: F32) -> F32:
    """Displacements (rows, cols, 2): where each sampled position goes, minus where it is."""
    out: F32 = positions - from_positions
    return out


def dense_flow(
    mapping: F32, resolution: str, from_wh: tuple[int, int], to_wh: tuple[int, int]
) -> F32:
    """Flow in pixels from `mapping` (2, h, w), sampled at the grid or at every pixel.

    `resolution`: "grid" -> (h, w, 2) at cell centres; "pixels" -> (H, W, 2) at every pixel
    of the "from" image (`from_wh` = (W, H)).
    """
    grid_h, grid_w = mapping.shape[1:]
    if resolution == "grid":
        positions = mapping_to_positions(mapping, None, to_wh)
        return positions_to_flow(positions, grid_cell_centres(grid_h, grid_w, *from_wh))
    width, height = from_wh
    positions = mapping_to_positions(mapping, (height, width), to_wh)
    return positions_to_flow(positions, identity_grid(height, width))


def dense_confidence(confidence: F32, resolution: str, from_wh: tuple[int, int]) -> F32:
    """Confidence (h, w) on the grid, or bilinearly upsampled to every "from" pixel."""
    if resolution == "grid":
        return np.asarray(confidence, np.float32)
    width, height = from_wh
    return resize_field(confidence[..., None], (height, width))[..., 0]


def match_points(
    mapping: F32, confidence: F32, points: F32, from_wh: tuple[int, int], to_wh: tuple[int, int]
) -> tuple[F32, F32]:
    """Matches of query points: bilinear samples of the cell-grid mapping at each point.

    `points`: (N, 2) pixel (x, y) in the "from" image. Returns (N, 2) pixel positions in the
    "to" image and (N,) confidences.
    """
    grid_h, grid_w = mapping.shape[1:]
    cells = pixels_to_grid(points, *from_wh, grid_w, grid_h)
    norm = sample_bilinear(mapping.transpose(1, 2, 0), cells)
    conf = sample_bilinear(confidence, cells)
    return normalised_to_pixels(norm, *to_wh), np.asarray(conf, np.float32)


def landmarks_to_pixels(points: F32, width: int, height: int) -> F32:
    """(K, 2) normalised landmark positions -> pixel (x, y) in the original image."""
    return normalised_to_pixels(points, width, height)
