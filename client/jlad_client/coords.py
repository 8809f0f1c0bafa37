"""Coordinates of the models' outputs in image pixels (numpy only, pure functions).

Conventions (docs/CONTRACT.md): pixel (x, y) with pixel centres at integers, sizes as
`(H, W)`, normalised (x, y) in [-1, 1] with the align_corners=False convention
`x_pix = (x_norm + 1) * W / 2 - 0.5`; the cell (i, j) of an h x w grid is centred on the
normalised position of pixel (j, i) of an h x w image. A `mapping` (2, h, w) gives, for every
cell of the source grid, the normalised (x, y) of its match in the target. The service, the
evaluation and the client all convert through these functions, so that a figure measured
offline is the figure the service produces.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from jlad_client.warp import identity_grid, resize_field, sample_bilinear

Size = tuple[int, int]


def normalised_to_pixels(points: ArrayLike, size: Size) -> NDArray[np.float64]:
    """Normalised (x, y) (..., 2) -> pixel (x, y) in an image of `size` = (H, W)."""
    pts = np.asarray(points, np.float64)
    height, width = size
    return np.stack(
        [(pts[..., 0] + 1) * width / 2 - 0.5, (pts[..., 1] + 1) * height / 2 - 0.5], axis=-1
    )


def pixels_to_normalised(points: ArrayLike, size: Size) -> NDArray[np.float64]:
    """Pixel (x, y) (..., 2) in an image of `size` = (H, W) -> normalised (x, y)."""
    pts = np.asarray(points, np.float64)
    height, width = size
    return np.stack(
        [(2 * pts[..., 0] + 1) / width - 1, (2 * pts[..., 1] + 1) / height - 1], axis=-1
    )


def rescale_pixels(points: ArrayLike, from_size: Size, to_size: Size) -> NDArray[np.float64]:
    """Pixel (x, y) (..., 2) of an image of `from_size` -> the same place in the image
    resized to `to_size` (both (H, W)); pixel centres stay the reference, not corners."""
    return normalised_to_pixels(pixels_to_normalised(points, from_size), to_size)


def displacement_field(mapping: ArrayLike) -> NDArray[np.float32]:
    """(h, w, 2) normalised displacement of each cell's match from the cell's own centre."""
    field = np.asarray(mapping, np.float32)
    if field.ndim != 3 or field.shape[0] != 2:
        raise ValueError(f"mapping must have shape (2, h, w), got {field.shape}")
    h, w = field.shape[1:]
    # The cell centres of an h x w grid are the normalised positions of an h x w image.
    centres = pixels_to_normalised(identity_grid(h, w), (h, w))
    return (field.transpose(1, 2, 0) - centres).astype(np.float32)


def mapping_to_target_pixels(
    mapping: ArrayLike, src_size: Size, tgt_size: Size
) -> NDArray[np.float32]:
    """Match positions (Hs, Ws, 2), in target pixels, of every source pixel.

    `mapping` (2, h, w): for each source cell the normalised (x, y) of its match in the
    target (the model's `align` output for one pair), bilinearly upsampled from the cell
    grid to the source image (`src_size` = (Hs, Ws)) and expressed in pixels of the target
    image (`tgt_size` = (Ht, Wt)).

    The upsampling interpolates the *displacement* from each cell centre (then adds every
    pixel's own normalised position). Inside the grid this equals interpolating the mapping
    itself; in the outer half cell, where `resize_field` repeats the edge value, it repeats
    the edge displacement instead of the edge position, so the identity and translations
    stay exact up to the image border.
    """
    displacement = resize_field(displacement_field(mapping), src_size)
    own = pixels_to_normalised(identity_grid(*src_size), src_size)
    return normalised_to_pixels(own + displacement, tgt_size).astype(np.float32)


def mapping_to_pixel_flow(
    mapping: ArrayLike, src_size: Size, tgt_size: Size
) -> NDArray[np.float32]:
    """Pixel flow (Hs, Ws, 2): for a source pixel p, `p + flow[p]` is its match in target
    pixels (docs/CONTRACT.md: `flow(p) = to_pixels_target(mapping(p)) - p`).

    `mapping` is (2, h, w) normalised, upsampled as in `mapping_to_target_pixels`.
    """
    flow = mapping_to_target_pixels(mapping, src_size, tgt_size) - identity_grid(*src_size)
    return np.asarray(flow, np.float32)


def transfer_points(
    mapping: ArrayLike, points: ArrayLike, src_size: Size, tgt_size: Size
) -> NDArray[np.float64]:
    """Carry source pixel points (N, 2) to target pixels (N, 2) through `mapping` (2, h, w).

    The same as reading `mapping_to_target_pixels` at each point (bilinearly, at sub-pixel
    positions too), without building the dense field.
    """
    field = displacement_field(mapping)
    # Cell coordinates of each source pixel: the inverse of resize_field's pixel -> cell map.
    cells = rescale_pixels(points, src_size, field.shape[:2])
    moved = pixels_to_normalised(points, src_size) + sample_bilinear(field, cells)
    return normalised_to_pixels(moved, tgt_size)
