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

EPS = 1e-6
"""Added to every norm and maximum these normalisations divide by (eq. 1, the consensus)."""


def channel_norm(x: Tensor) -> Tensor:
    """L2 norm over dim 1 of (B, C, ...), kept as a size-1 axis: `x.norm(dim=1, keepdim=True)`.

    Written as the root of a sum of squares because ONNX Runtime's CPU ReduceL2 over a
    non-last axis took 13.9 ms on a 4 x 1024 x 32 x 32 volume where Mul + ReduceSum + Sqrt
    take 1.0 ms. The floor (1e-24 before the root, far below any eps it is added to) keeps
    the gradient finite where x is all zero, as `norm`'s is. `pow` rather than `x * x`: in
    an int8 graph every input edge of a dequantized tensor gets its own DequantizeLinear, and
    Pow has one (the backbone's last normalisation: 2.5 ms per batch of 8 in three copies).
    """
    return x.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-24).sqrt()


MAX_SPLIT = 8
"""`max_over_channels` reduces groups of this many channel blocks first (see there)."""


def max_over_channels(x: Tensor) -> Tensor:
    """Maximum over dim 1 of (B, C, ...), kept as a size-1 axis: `x.amax(dim=1, keepdim=True)`.

    Taken in two steps, first over MAX_SPLIT blocks of C / MAX_SPLIT channels, then over what
    is left, when C divides: the same floats (a maximum is exact in any order), but ONNX
    Runtime's CPU ReduceMax over the middle axis of a (B, 1024, 32, 32) volume took 1.6-2.2 ms
    where the two steps take 0.33-0.36 ms (batch 1 and 4, 2-core EPYC; a split of 2, 4, 16 or
    32 blocks: 0.75, 0.58, 0.44, 0.49 ms), and the align graph takes five such maxima.
    """
    c = x.shape[1]
    if c % MAX_SPLIT or c == MAX_SPLIT:
        return x.amax(dim=1, keepdim=True)
    # -1 for the batch, as in _box_filter_4d: the exported graph keeps a dynamic batch
    blocks = x.reshape(-1, MAX_SPLIT, c // MAX_SPLIT, *x.shape[2:])
    return blocks.amax(dim=1).amax(dim=1, keepdim=True)


def l2_normalise(features: Tensor, eps: float = EPS) -> Tensor:
    """Normalise each cell's channel vector of (B, C, h, w) to unit length."""
    return features / (channel_norm(features) + eps)


def normalise_volume(volume: Tensor, eps: float = EPS) -> Tensor:
    """Eq. 1 normalisation of a similarity volume: clip negatives, unit length per position."""
    volume = F.relu(volume)
    return volume / (channel_norm(volume) + eps)


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
    return normalise_volume(cosine_cross_similarity(source, target))


def _box_filter_4d(volume: Tensor, grid_size: tuple[int, int], kernel: int) -> Tensor:
    """Average each 4D correlation entry over its kernel x kernel neighbourhoods in both
    the source and the target grid (B, ht*wt, h, w) -> same shape."""
    _, n, h, w = volume.shape
    ht, wt = grid_size
    pad = kernel // 2
    # Python-int shapes with -1 for the batch: the exported graph keeps a dynamic batch. Two
    # 3D poolings, each over one grid's two axes (kernel 1 on the third), need no transpose
    # of the volume in between (the 2D form's two permutes were 9 % of the align graph).
    out = F.avg_pool3d(
        volume.reshape(-1, 1, n, h, w),
        (1, kernel, kernel),
        1,
        (0, pad, pad),
        count_include_pad=False,
    )
    out = F.avg_pool3d(
        out.reshape(-1, 1, ht, wt, h * w),
        (kernel, kernel, 1),
        1,
        (pad, pad, 0),
        count_include_pad=False,
    )
    return out.reshape(-1, n, h, w)


def neighbourhood_consensus(
    similarity: Tensor,
    grid_size: tuple[int, int],
    kernel: int = 3,
    eps: float = EPS,
    rounds: int = 1,
) -> Tensor:
    """Filter a raw cross-similarity (B, ht*wt, h, w) into matching scores in [0, 1].

    Choice (after NC-Net, Rocco et al. 2018): negative similarities are clipped, each entry
    is averaged with its neighbours in both images (a fixed 4D box filter standing in for
    NC-Net's learned 4D convolutions: a match is trusted when nearby cells match nearby
    cells) and then scaled by how close it is to the best score of its source cell and of
    its target cell (soft mutual nearest neighbours). Each source cell's scores are finally
    divided by their maximum, so the best match scores 1.

    `rounds` > 1 repeats filter and mutual step (as NC-Net stacks its 4D layers): each round
    widens the neighbourhood that must agree by one cell while the mutual step keeps the
    scores peaked. One 5 x 5 filter instead (the same reach, no mutual step between) scored
    worse than one 3 x 3 round on PF-WILLOW (docs/BENCH.md and README give the figures).
    """
    volume, best = consensus_volume(similarity, grid_size, kernel, eps, rounds)
    return volume / (best + eps)


def consensus_volume(
    similarity: Tensor,
    grid_size: tuple[int, int],
    kernel: int = 3,
    eps: float = EPS,
    rounds: int = 1,
) -> tuple[Tensor, Tensor]:
    """`neighbourhood_consensus` before its last division: the filtered volume (B, ht*wt,
    h, w) and each source cell's maximum over it (B, 1, h, w); the scores are
    volume / (best + eps). The align head folds that division into what it does next
    rather than pay a pass over the volume for it."""
    volume = F.relu(similarity)
    for _ in range(rounds):
        volume = _box_filter_4d(volume, grid_size, kernel)
        best_for_source = max_over_channels(volume)
        best_for_target = volume.amax(dim=(2, 3), keepdim=True)
        volume = mutual_step(volume, best_for_source, best_for_target, eps)
    return volume, max_over_channels(volume)


def mutual_step(
    volume: Tensor, best_for_source: Tensor, best_for_target: Tensor, eps: float
) -> Tensor:
    """volume * (volume / (best_for_source + eps)) * (volume / (best_for_target + eps)).

    Written as volume^3 times the two per-cell reciprocals: three passes over the volume
    instead of four (two divisions of the whole volume and two products), and the align
    graph is bound by such passes (4 x 16 MB volumes): 15.2 -> 10.2 ms per 4 pairs over
    three rounds in ONNX Runtime (2-core Xeon). Same values to 2e-6 relative.
    """
    return volume.pow(3) * (1.0 / (best_for_source + eps)) * (1.0 / (best_for_target + eps))


def self_similarity(cells: Tensor, radius: int = 3) -> Tensor:
    """Eq. 1 self-similarity volume (B, (2r+1)^2, h, w) of channels-last features
    `cells` (B, h, w, C).

    Channel (dy + r) * (2r+1) + (dx + r) holds each cell's similarity to the cell (dy, dx)
    away; neighbours beyond the border count as zero similarity.

    Computed as one batched matrix product per image row: the w + 2r zero-padded cells of
    rows y + dy (all 2r+1 of them, gathered at once) times row y's w cells, whose diagonal
    band holds the wanted dot products. That does (w + 2r) / (2r + 1) times the
    multiply-adds of (2r+1)^2 shifted products, but at matrix-product speed and without
    their (2r+1)^2 copies of the features; channels-last because that is the layout the
    products need (no transposes of the padded rows). ONNX Runtime, 8 x 32 x 32 x 64 cells
    (the objects W_D head's projection): 26.8 ms as shifted products, 5.8 ms as
    channels-first row products, 3.7-4.0 ms as these.
    """
    size = 2 * radius + 1
    b, h, w, _ = cells.shape
    padded = F.pad(cells, (0, 0, radius, radius, radius, radius))  # (B, h + 2r, w + 2r, C)
    rows = torch.arange(h, device=cells.device)[:, None] + torch.arange(size, device=cells.device)
    bands = padded[:, rows]  # (B, h, 2r+1 [dy], w + 2r, C)
    products = torch.matmul(bands, cells.unsqueeze(2).transpose(-1, -2))  # (B, h, dy, w+2r, w)
    # the pair (x + dx, x) sits at (x + dx) * w + x of each flattened (w + 2r) x w block
    dx = torch.arange(size, device=cells.device)[:, None]
    band = (dx * w + torch.arange(w, device=cells.device) * (w + 1)).reshape(-1)
    sims = products.reshape(b, h, size, -1).index_select(3, band)
    sims = sims.reshape(b, h, size, size, w).permute(0, 2, 3, 1, 4)  # (B, dy, dx, h, w)
    return normalise_volume(sims.reshape(b, size * size, h, w))
