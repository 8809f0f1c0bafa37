"""Eq. 1: similarity volumes from L2-normalised features.

Both volumes use cosine similarity of per-cell L2-normalised feature vectors, then the
normalisation of eq. 1 (choice, as in NC-Net): negative similarities are clipped to zero
(ReLU) and each position's similarity vector is L2-normalised, so that the volume describes
*relative* matching strength rather than absolute feature scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l2_normalise(features: Tensor, eps: float = 1e-6) -> Tensor:
    """Normalise each cell's channel vector of (B, C, h, w) to unit length."""
    return features / (features.norm(dim=1, keepdim=True) + eps)


def _normalise_volume(volume: Tensor, eps: float = 1e-6) -> Tensor:
    volume = F.relu(volume)
    return volume / (volume.norm(dim=1, keepdim=True) + eps)


def cosine_cross_similarity(source: Tensor, target: Tensor) -> Tensor:
    """Raw cosine similarities of every source cell to every target cell.

    source, target: (B, C, h, w), already L2-normalised per cell.
    Returns (B, h*w [target cell, row-major], h, w [source cell]).
    """
    b, c, h, w = source.shape
    ht, wt = target.shape[-2:]
    sim = torch.bmm(target.reshape(b, c, ht * wt).transpose(1, 2), source.reshape(b, c, h * w))
    return sim.reshape(b, ht * wt, h, w)


def cross_similarity(source: Tensor, target: Tensor) -> Tensor:
    """Eq. 1 cross-similarity volume (B, h*w, h, w): for each source cell (spatial axes), its
    normalised similarities to all target cells (channels, row-major)."""
    return _normalise_volume(cosine_cross_similarity(source, target))


def self_similarity(features: Tensor, radius: int = 3) -> Tensor:
    """Eq. 1 self-similarity volume (B, (2r+1)^2, h, w).

    Channel (dy + r) * (2r+1) + (dx + r) holds each cell's similarity to the cell (dy, dx)
    away; neighbours beyond the border count as zero similarity. Written as shifted products
    rather than unfold so it exports to ONNX as plain slices.
    """
    size = 2 * radius + 1
    h, w = features.shape[-2:]
    padded = F.pad(features, (radius, radius, radius, radius))
    sims = []
    for dy in range(size):
        for dx in range(size):
            shifted = padded[:, :, dy : dy + h, dx : dx + w]
            sims.append((features * shifted).sum(dim=1))
    return _normalise_volume(torch.stack(sims, dim=1))
