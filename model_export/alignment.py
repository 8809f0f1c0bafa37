"""The semantic alignment network: W_A (transformation field tau) and W_C (uncertainty).

Cross-similarity (eq. 1) -> neighbourhood consensus (optional, `similarity.
neighbourhood_consensus`) -> a base field by soft-argmax over the target cells -> an
encoder-decoder W_A that predicts a residual correction -> tau as a `mapping`: for each
source cell, the normalised (x, y) of its match in the target. W_C predicts s = log(sigma)
per source cell from the decoder's features and how peaked the matching distribution is;
s weighs the losses (eq. 3, eq. 7 with c = sigmoid(-s)).

Choice: the `confidence` served with each match is its forward-backward consistency,
exp(-e^2 / 2) with e the distance in cells between a source cell and where its match maps
back (the reverse field is the soft-argmax of the same similarity volume over the source
cells, so it costs no second correlation). On the TSS sample it separates correct from wrong
matches with ROC AUC 0.89 with one consensus round, 0.76 with four and 0.67 with the served
three rounds and the motion prior (`evaluate tss` reports it: the fewer wrong matches are
left, the harder those few are to tell apart), where sigmoid(-s) of the CPU-trained W_C scored
0.51-0.52 in a development check (s stays near its mean everywhere); and it means the same
thing for every model: 0.5 is a match that comes back within 1.2 cells.

Choice (`motion_prior_kernel`, holds no weights): a match is more likely where its
neighbours' matches say it goes. After the plain soft-argmax, each source cell's expected
target is its centre plus the mean displacement of the matches in a kernel x kernel window
around it, weighted by their round-trip consistency (`neighbourhood_motion`); the base field
is then the soft-argmax of softmax(beta * scores) times a Gaussian of `motion_prior_sigma`
cells around that expectation (`prior_soft_argmax_mapping`). It overrides isolated matches
that jumped to a look-alike part (a motorbike's other wheel) while a window smaller than the
object keeps an object that moves unlike its background (a video) free. Committed `objects`
weights, 4 consensus rounds, kernel 9, sigma 0.75: PF-WILLOW PCK@0.1 0.745 -> 0.769 (motorbike
0.537 -> 0.566), TSS mask IoU 0.878 -> 0.887; served with 3 rounds: 0.772 (motorbike 0.568),
0.890, DAVIS anchor J 0.594. One global affine fit instead of the window scored the same on
PF-WILLOW but cost DAVIS anchor J 0.575 -> 0.557 (it follows the background).

Choice: starting from the soft-argmax field means an untrained W_A already matches like
nearest neighbours; training moves the features (adapter) and the residual.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.geometry import cell_centres, warp_by_mapping
from model_export.similarity import (
    EPS,
    channel_norm,
    consensus_volume,
    cosine_cross_similarity,
    max_over_channels,
)


def softmax_expectation(
    logits: Tensor, centres: Tensor, top: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean target-cell centre under softmax over axis 1 of `logits` (B, ht*wt, h, w), with
    centres (ht, wt, 2): mapping (B, 2, h, w) and the softmax's peak probability (B, 1, h, w).

    The probabilities are never formed as a volume: exp(logits - max) goes through
    `position_moments` unnormalised (its third moment is the sum) and the (B, 2, h, w) result
    is divided by that sum; the peak is 1 / sum (the maximum's term is exp(0)). ONNX
    Runtime's CPU Softmax on a non-last axis transposes around a generic kernel (13 ms per
    4 x 1024 x 32 x 32 volume, profiled), and every volume-sized pass saved (the division, a
    second max for the peak, the sum) is ~0.4-4 ms of a ~50-100 ms align graph. `top`
    (B, 1, h, w), when the caller knows it, is the logits' maximum over axis 1 (the same
    floats), saving the max.
    """
    e = torch.exp(logits - (max_over_channels(logits) if top is None else top))
    moments = position_moments(e, centres)
    total = moments[:, 2:3]
    return moments[:, :2] / total, 1.0 / total


def soft_argmax_mapping(
    similarity: Tensor, beta: Tensor | float, grid_size: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """Expected target position of each source cell under softmax(beta * similarity).

    similarity (B, ht*wt, h, w) -> mapping (B, 2, h, w), peak probability (B, 1, h, w).
    The target grid has the source grid's shape (one input size per model).
    """
    if grid_size is None:
        _, n, h, w = similarity.shape
        ht, wt = _target_grid(int(n), int(h), int(w))
    else:  # Python ints: constant grids in the exported graph (see landmarks._grid_size)
        ht, wt = grid_size
    return softmax_expectation(similarity * beta, cell_centres(ht, wt, like=similarity))


def position_moments(weights: Tensor, centres: Tensor) -> Tensor:
    """Weighted sums over the target cells of each source cell's weights (B, ht*wt, h, w),
    centres (ht, wt, 2) -> (B, 3, h, w): sum of w * x, sum of w * y and sum of w, i.e.
    `einsum("bnhw,nc->bchw", weights, [centres | 1])`.

    One (3, N) x (N, h*w) product per image: ONNX Runtime's CPU Einsum took 8.6 ms for the
    first two rows on a 4 x 1024 x 32 x 32 volume (it transposes the volume first), MatMul
    0.9 ms; the row of ones makes the sum part of the same product (0.84 ms where MatMul +
    ReduceSum took 1.19).
    """
    b, n, h, w = weights.shape
    # from `centres` alone (no traced shape): the exported graph holds the (3, N) matrix as
    # one constant, which int8 quantization must see as fixed (`quantize.similarity_products`)
    ones = torch.ones_like(centres[..., :1])
    rows = torch.cat([centres, ones], dim=-1).reshape(-1, 3).transpose(0, 1)
    return torch.matmul(rows, weights.reshape(b, n, h * w)).reshape(b, 3, h, w)


def reverse_mapping(scores: Tensor, beta: Tensor | float, grid_size: tuple[int, int]) -> Tensor:
    """For each target cell, the expected source position under the soft-argmax over the
    source cells of the same similarity volume: scores (B, ht*wt, h, w) -> (B, 2, ht, wt).

    The softmax runs over the volume's last two axes as they lie, as one Softmax over the
    flattened last axis, rather than over axis 1 of the transposed volume: the 1024 x 1024
    transpose and the strided max cost ~7 ms per 4 pairs. ONNX Runtime's CPU Softmax over a
    contiguous last axis is one fused kernel (0.68 ms per 4 pairs, profiled), where max, Sub
    and Exp with the sum as a third column of the product took ~1.8 ms.
    """
    return reverse_expectation(scores * beta, grid_size)


def reverse_expectation(logits: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """`reverse_mapping` of logits = beta * scores, (B, ht*wt, h, w) -> (B, 2, ht, wt)."""
    h, w = grid_size
    b, n = logits.shape[:2]
    probabilities = torch.softmax(logits.reshape(b, n, h * w), dim=-1)
    centres = cell_centres(h, w, like=logits).reshape(h * w, 2)
    expected = torch.matmul(probabilities, centres)  # (B, ht*wt, 2)
    return expected.transpose(1, 2).reshape(b, 2, h, w)


def round_trip_consistency(reverse: Tensor, mapping: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """exp(-e^2 / 2) per source cell, (B, 1, h, w): e = distance in cells between the cell and
    where its match (`mapping`, (B, 2, h, w)) lands under `reverse` (from `reverse_mapping`)."""
    h, w = grid_size
    back = warp_by_mapping(reverse, mapping, padding="border")
    centres = cell_centres(h, w, like=mapping).permute(2, 0, 1).unsqueeze(0)
    cells = mapping.new_tensor([w / 2, h / 2]).view(1, 2, 1, 1)
    error2 = ((back - centres) * cells).pow(2).sum(dim=1, keepdim=True)
    return torch.exp(-0.5 * error2)


def forward_backward_consistency(
    scores: Tensor, mapping: Tensor, beta: Tensor | float, grid_size: tuple[int, int]
) -> Tensor:
    """exp(-e^2 / 2) per source cell, (B, 1, h, w): e = distance in cells between the cell
    and where its match (`mapping`, (B, 2, h, w)) maps back under the reverse soft-argmax
    field of `scores` (B, ht*wt, h, w), the similarity volume `mapping` was derived from."""
    return round_trip_consistency(reverse_mapping(scores, beta, grid_size), mapping, grid_size)


def neighbourhood_motion(mapping: Tensor, weight: Tensor, kernel: int) -> Tensor:
    """Where each source cell's neighbours say it should go: the cell's centre plus the
    `weight`-weighted mean displacement (match minus cell) over the kernel x kernel window
    around it. mapping (B, 2, h, w), weight (B, 1, h, w) >= 0 -> (B, 2, h, w).

    Windows beyond the grid's border count only the cells inside (the box filter's divisor
    cancels in the ratio); a window with no weight at all keeps the cell's own match.
    """
    h, w = mapping.shape[-2:]
    centres = cell_centres(int(h), int(w), like=mapping).permute(2, 0, 1).unsqueeze(0)
    pad = kernel // 2
    moved = F.avg_pool2d((mapping - centres) * weight, kernel, 1, pad)
    total = F.avg_pool2d(weight, kernel, 1, pad)
    mean_move = torch.where(total > 1e-6, moved / total.clamp_min(1e-6), mapping - centres)
    return centres + mean_move


def prior_soft_argmax_mapping(
    similarity: Tensor,
    beta: Tensor | float,
    expected: Tensor,
    sigma_cells: float,
    grid_size: tuple[int, int],
) -> Tensor:
    """Soft-argmax of the matching posterior softmax(beta * similarity + log prior), the
    prior an isotropic Gaussian of `sigma_cells` cells around `expected` (B, 2, h, w):
    similarity (B, ht*wt, h, w) -> mapping (B, 2, h, w).

    The Gaussian is separable, so its log is added as a row term (B, ht, 1, h, w) and a
    column term (B, 1, wt, h, w) instead of one more volume-sized tensor.
    """
    return prior_expectation(similarity * beta, expected, sigma_cells, grid_size)


def prior_expectation(
    logits: Tensor, expected: Tensor, sigma_cells: float, grid_size: tuple[int, int]
) -> Tensor:
    """`prior_soft_argmax_mapping` of logits = beta * similarity."""
    ht, wt = grid_size
    b, _, h, w = logits.shape
    centres = cell_centres(ht, wt, like=logits)
    xs = centres[0, :, 0].view(1, wt, 1, 1)
    ys = centres[:, 0, 1].view(1, ht, 1, 1)
    scale_x = (wt / 2) ** 2 / (2 * sigma_cells**2)
    scale_y = (ht / 2) ** 2 / (2 * sigma_cells**2)
    log_px = -scale_x * (xs - expected[:, 0:1]).pow(2)  # (B, wt, h, w)
    log_py = -scale_y * (ys - expected[:, 1:2]).pow(2)  # (B, ht, h, w)
    posterior = logits.reshape(b, ht, wt, h, w) + log_py.unsqueeze(2)
    posterior = posterior + log_px.unsqueeze(1)
    mapping, _ = softmax_expectation(posterior.reshape(b, ht * wt, h, w), centres)
    return mapping


def _target_grid(n: int, h: int, w: int) -> tuple[int, int]:
    # Source and target grids have the same shape in every model (one input size per
    # export); checking keeps a mismatch from silently scrambling coordinates.
    if n != h * w:
        raise ValueError(f"target grid of {n} cells does not match source grid {h}x{w}")
    return h, w


def upsample2(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 upsampling of (B, C, h, w) -> (B, C, 2h, 2w).

    Written as two stack + reshape steps (each column, then each row, twice) rather than
    F.interpolate: the exporter turns interpolate's output size into float casts of traced
    shapes, which the fp16 converter mistypes. Not as one 6D expand + reshape: ONNX
    Runtime's CPU Expand is a generic broadcast, 3.0 ms for a (4, 128, 16, 16) map where
    the two Concats take 0.43 ms (Resize 0.36 ms); the same values.
    """
    b, c, h, w = x.shape
    columns = torch.stack([x, x], dim=-1).reshape(b, c, h, 2 * w)
    return torch.stack([columns, columns], dim=3).reshape(b, c, 2 * h, 2 * w)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))


class SemanticAligner(nn.Module):
    """W_A + W_C: (source, target) features (B, C, h, w) -> mapping (B, 2, h, w),
    log_sigma (B, 1, h, w) from W_C, confidence (B, 1, h, w) = forward-backward consistency.
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        width: int = 128,
        beta: float = 100.0,
        max_residual: float = 0.25,
        consensus: bool = True,
        consensus_rounds: int = 1,
        motion_prior_kernel: int = 0,
        motion_prior_sigma: float = 0.75,
    ) -> None:
        super().__init__()
        if motion_prior_kernel and (motion_prior_kernel % 2 == 0 or motion_prior_sigma <= 0):
            raise ValueError(
                f"motion prior needs an odd kernel and sigma > 0, got "
                f"{motion_prior_kernel} and {motion_prior_sigma}"
            )
        self.motion_prior_kernel = motion_prior_kernel
        self.motion_prior_sigma = motion_prior_sigma
        h, w = grid_size
        self.grid_size = (int(h), int(w))
        self.consensus = consensus
        self.consensus_rounds = consensus_rounds
        if h % 4 or w % 4:
            raise ValueError(f"feature grid {h}x{w} must be divisible by 4")
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)))
        self.max_residual = max_residual
        # 1x1 first: the volume has h*w channels, and a 3x3 on it would dominate the cost.
        self.enc1 = nn.Sequential(
            nn.Conv2d(h * w, width, 1), nn.ReLU(inplace=True), _conv(width, width)
        )
        self.enc2 = _conv(width, width, 2)
        self.enc3 = _conv(width, width, 2)
        self.dec2 = _conv(2 * width, width)
        self.dec1 = _conv(2 * width, width)
        self.residual = nn.Conv2d(width, 2, 3, padding=1)
        # Zero start: the untrained field is exactly the soft-argmax one.
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)
        self.uncertainty = nn.Sequential(_conv(width + 1, 64), nn.Conv2d(64, 1, 3, padding=1))

    def forward(self, source: Tensor, target: Tensor) -> dict[str, Tensor]:
        raw = cosine_cross_similarity(source, target)
        beta = self.log_beta.exp()
        ht, wt = self.grid_size
        # The scores (eq. 1, after the consensus) are never formed as a volume: beta * scores
        # and eq. 1's normalised volume are the consensus volume times per-cell factors, so
        # each is one pass over the volume (and the latter none: see _encode_first).
        top = None
        if self.consensus:
            volume, best = consensus_volume(raw, self.grid_size, rounds=self.consensus_rounds)
            scale = beta / (best + EPS)  # scores = volume / (best + EPS)
            logits = volume * scale
            top = best * scale
            # normalise_volume(scores) = volume / (|volume| + EPS (best + EPS))
            unit = 1.0 / (channel_norm(volume) + EPS * (best + EPS))
        else:
            logits = raw * beta
            volume = F.relu(raw)
            unit = 1.0 / (channel_norm(volume) + EPS)
        base, peak = softmax_expectation(logits, cell_centres(ht, wt, like=raw), top)
        with torch.no_grad():  # served measures and prior weights, never trained through
            reverse = reverse_expectation(logits, self.grid_size)
        if self.motion_prior_kernel:
            with torch.no_grad():
                weight = round_trip_consistency(reverse, base, self.grid_size)
                expected = neighbourhood_motion(base, weight, self.motion_prior_kernel)
            base = prior_expectation(logits, expected, self.motion_prior_sigma, self.grid_size)
        e1 = self._encode_first(volume, unit)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([upsample2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([upsample2(d2), e1], dim=1))
        mapping = base + self.max_residual * torch.tanh(self.residual(d1))
        log_sigma = self.uncertainty(torch.cat([d1, peak], dim=1))
        with torch.no_grad():
            confidence = round_trip_consistency(reverse, mapping, self.grid_size)
        return {"mapping": mapping, "log_sigma": log_sigma, "confidence": confidence}

    def _encode_first(self, volume: Tensor, unit: Tensor) -> Tensor:
        """`enc1` on eq. 1's normalised volume, volume * unit (unit (B, 1, h, w) per source
        cell): the first layer is a 1x1 convolution, linear per cell, so the factor is
        applied to its `width` outputs instead of to the h*w channels of its input."""
        first, *rest = self.enc1
        assert isinstance(first, nn.Conv2d) and first.bias is not None
        x = F.conv2d(volume, first.weight) * unit + first.bias.view(1, -1, 1, 1)
        for layer in rest:
            x = layer(x)
        return x
