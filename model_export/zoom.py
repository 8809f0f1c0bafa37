"""Coarse-to-fine landmarks: a second W_D pass on a crop around the first pass's points.

Why: W_D places each landmark on the feature grid (stride 8). On a loose crop, where the
object fills a third of the picture (the MTFL faces as cropped), its parts span only a few
cells, and the landmarks inherit that coarseness. The first pass finds where the object is;
the second sees the object magnified, with more cells across each part. Inference only:
it holds no weights (training is unchanged), and the exported landmark graph runs both
passes, so the service and the evaluations compute the same thing.

Coordinates are the model's normalised (x, y) in [-1, 1] (pixel centres, as
`geometry.cell_centres`). A window is a square in those coordinates: `centre` (B, 2) and
`half` (B,) half-side, so the crop covers [centre - half, centre + half] on both axes (for a
non-square frame it keeps the frame's aspect ratio).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from model_export.geometry import cell_centres

ZOOM_MIN_HALF = 0.25
"""Smallest window half-side: at most 4x magnification (beyond it the crop is mostly
interpolated pixels of the first pass's input)."""
ZOOM_MAX_HALF = 1.0
"""Largest window half-side: the whole frame, never a zoom out."""


def zoom_window(points: Tensor, factor: float) -> tuple[Tensor, Tensor]:
    """The window around landmarks (B, K, 2): centred on their bounding box, half-side =
    `factor` x half the box's longer side, clamped to [ZOOM_MIN_HALF, ZOOM_MAX_HALF].

    Returns centre (B, 2) and half (B,)."""
    low = points.amin(dim=1)
    high = points.amax(dim=1)
    centre = (low + high) / 2
    half = ((high - low).amax(dim=-1) / 2 * factor).clamp(ZOOM_MIN_HALF, ZOOM_MAX_HALF)
    return centre, half


def crop_window(images: Tensor, centre: Tensor, half: Tensor) -> Tensor:
    """The window of each image (B, C, H, W), resampled bilinearly to H x W (the border's
    pixels repeated where the window leaves the frame)."""
    h, w = images.shape[-2:]
    frame = cell_centres(int(h), int(w), like=images)  # (H, W, 2)
    grid = centre[:, None, None, :] + half[:, None, None, None] * frame[None]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def points_to_frame(points: Tensor, centre: Tensor, half: Tensor) -> Tensor:
    """Points (B, K, 2) in window coordinates -> frame coordinates."""
    return centre[:, None, :] + half[:, None, None] * points


def heatmaps_to_frame(
    heatmaps: Tensor, centre: Tensor, half: Tensor, grid_size: tuple[int, int]
) -> Tensor:
    """Window heatmaps (B, K, h, w) -> the frame's grid of `grid_size` cells: each frame
    cell reads the window's map at its own position (zero outside the window), and each
    map is rescaled to sum to one again (all zero if the window's mass fell between
    cells)."""
    gh, gw = grid_size
    frame = cell_centres(gh, gw, like=heatmaps)
    grid = (frame[None] - centre[:, None, None, :]) / half[:, None, None, None]
    moved = F.grid_sample(
        heatmaps, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    mass = moved.sum(dim=(-2, -1), keepdim=True)
    return moved / mass.clamp_min(1e-12)
