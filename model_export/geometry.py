"""Coordinate grids and sampling in the normalised convention of docs/CONTRACT.md.

Normalised (x, y) in [-1, 1] with align_corners=False: a grid of h x w cells has cell (i, j)
centred on ((2j + 1) / w - 1, (2i + 1) / h - 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cell_centres(h: int, w: int, *, like: Tensor | None = None) -> Tensor:
    """(h, w, 2) normalised (x, y) of each cell centre of an h x w grid."""
    kw = {"device": like.device, "dtype": like.dtype} if like is not None else {}
    ys = (torch.arange(h, **kw) * 2 + 1) / h - 1  # type: ignore[arg-type]
    xs = (torch.arange(w, **kw) * 2 + 1) / w - 1  # type: ignore[arg-type]
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def sample_at(field: Tensor, points: Tensor) -> Tensor:
    """Bilinearly sample `field` (B, C, h, w) at normalised `points` (B, N, 2) -> (B, N, C).

    Border values are repeated outside the grid so that a landmark near the edge still reads
    the nearest valid value.
    """
    out = F.grid_sample(
        field, points.unsqueeze(1), mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.squeeze(2).transpose(1, 2)


def warp_by_mapping(field: Tensor, mapping: Tensor, padding: str = "zeros") -> Tensor:
    """Read `field` (B, C, h', w') at `mapping` (B, 2, h, w) (normalised (x, y)) -> (B, C, h, w).

    Positions outside are zero (`padding="zeros"`) or the nearest border value ("border").
    """
    return F.grid_sample(
        field,
        mapping.permute(0, 2, 3, 1),
        mode="bilinear",
        padding_mode=padding,
        align_corners=False,
    )
