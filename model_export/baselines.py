"""Baselines reported beside the trained model, in the model's own `mapping` format.

Both return `mapping` (B, 2, h, w): for each source cell, the normalised (x, y) of its
match in the target (docs/CONTRACT.md), so that every metric treats them exactly like
`model.align(...)["mapping"]`.
"""

from __future__ import annotations

from torch import Tensor

from model_export.geometry import cell_centres
from model_export.similarity import cosine_cross_similarity


def nearest_neighbour_mapping(source: Tensor, target: Tensor) -> Tensor:
    """Match each source cell to the target cell of highest cosine similarity.

    source (B, C, h, w), target (B, C, ht, wt): per-cell L2-normalised features (e.g.
    `model.backbone_features`, no trained head involved). Returns (B, 2, h, w): the
    normalised centre of the best target cell for every source cell.
    """
    b, _, h, w = source.shape
    ht, wt = target.shape[-2:]
    best = cosine_cross_similarity(source, target).argmax(dim=1)  # (B, h, w) target index
    centres = cell_centres(ht, wt, like=source).reshape(ht * wt, 2)
    return centres[best.reshape(-1)].reshape(b, h, w, 2).permute(0, 3, 1, 2).contiguous()


def identity_mapping(batch: int, h: int, w: int, *, like: Tensor | None = None) -> Tensor:
    """The identity correspondence (B, 2, h, w): every source cell matched to the same
    normalised position in the target (zero flow when both images have the same size)."""
    centres = cell_centres(h, w, like=like).permute(2, 0, 1)
    return centres.unsqueeze(0).expand(batch, 2, h, w).contiguous()
