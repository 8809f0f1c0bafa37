"""The losses of eq. 2-8, one function each.

Conventions: features (B, C, h, w) unit length per cell; `mapping` (B, 2, h, w) normalised
(x, y) of each source cell's match in the target; `log_sigma` (B, 1, h, w) = s, the
predicted log uncertainty; heatmaps (B, K, h, w) sum to one; points (B, K, 2) normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model_export.geometry import cell_centres, sample_at, warp_by_mapping


def uncertainty_weighted(per_position: Tensor, log_sigma: Tensor) -> Tensor:
    """Eq. 3 (uncertainty weighting): mean of l * exp(-s) + s.

    Positions the network calls uncertain (large s) count little; the `+ s` penalty stops
    s from growing without bound. per_position and log_sigma broadcast to (B, 1, h, w).
    """
    return (per_position * torch.exp(-log_sigma) + log_sigma).mean()


def window_cross_entropy(
    source: Tensor, warped_target: Tensor, window: int = 3, temperature: float = 0.1
) -> Tensor:
    """Eq. 2 (per position): cross-entropy of the softmax over a `window` x `window`
    neighbourhood of the warped target, towards its centre.

    source, warped_target (B, C, h, w) -> (B, 1, h, w). The match tau points at must be more
    similar to the source feature than its neighbours.
    """
    r = window // 2
    h, w = source.shape[-2:]
    padded = F.pad(warped_target, (r, r, r, r))
    sims = torch.stack(
        [
            (source * padded[:, :, dy : dy + h, dx : dx + w]).sum(1)
            for dy in range(window)
            for dx in range(window)
        ],
        dim=1,
    )
    log_prob = torch.log_softmax(sims / temperature, dim=1)
    centre = (window * window) // 2
    return -log_prob[:, centre : centre + 1]


def alignment_loss(
    source: Tensor,
    target: Tensor,
    mapping: Tensor,
    log_sigma: Tensor,
    window: int = 3,
    temperature: float = 0.1,
) -> Tensor:
    """Eq. 2-3, alignment loss: warp the target features by tau (grid_sample, so gradients
    reach tau), take the window cross-entropy of eq. 2 at every source cell and weight it by
    the uncertainty as in eq. 3. Source cells whose match falls outside the target are
    masked out (their warped features are zero)."""
    warped = warp_by_mapping(target, mapping)
    per_position = window_cross_entropy(source, warped, window, temperature)
    inside = (mapping.abs() <= 1).all(dim=1, keepdim=True).to(per_position.dtype)
    return uncertainty_weighted(per_position * inside, log_sigma)


def flow_supervision_loss(
    mapping: Tensor, true_mapping: Tensor, valid: Tensor, log_sigma: Tensor | None = None
) -> Tensor:
    """Pre-training aid (not among the paper's eq. 2-8; MODEL.md allows it on synthetic
    pairs): end-point error between tau and the known warp, in cells, over valid cells,
    uncertainty-weighted like eq. 3 when `log_sigma` is given.

    mapping, true_mapping (B, 2, h, w); valid (B, 1, h, w) in {0, 1}.
    """
    h, w = mapping.shape[-2:]
    scale = mapping.new_tensor([w / 2, h / 2]).view(1, 2, 1, 1)
    epe = ((mapping - true_mapping) * scale).norm(dim=1, keepdim=True) * valid
    if log_sigma is None:
        return epe.sum() / valid.sum().clamp_min(1)
    return uncertainty_weighted(epe, log_sigma)


def concentration_loss(heatmaps: Tensor) -> Tensor:
    """Eq. 4, concentration: each heatmap's spatial variance (x and y, in cells^2), averaged
    over landmarks and images. Zero for a map whose mass sits on one cell."""
    h, w = heatmaps.shape[-2:]
    grid = cell_centres(h, w, like=heatmaps)
    mean = torch.einsum("bkhw,hwc->bkc", heatmaps, grid)
    diff = (grid[None, None] - mean[:, :, None, None]) * grid.new_tensor([w / 2, h / 2])
    return torch.einsum("bkhw,bkhwc->bk", heatmaps, diff * diff).mean()


def separation_loss(points: Tensor, margin: float = 0.05, kind: str = "squared") -> Tensor:
    """Eq. 5, hinge embedding (separation): for every pair of different landmarks,
    max(0, margin - ||p_k - p_k'||^2) in normalised coordinates, averaged over pairs.

    kind="distance": max(0, sqrt(margin) - ||p_k - p_k'||) instead (same zero set). Choice:
    the squared form's gradient vanishes as two points meet, so landmarks that have collapsed
    onto one spot never part again (the first `objects` runs: all 10 on one keypoint); the
    distance form pushes them apart with unit strength however close they are.
    """
    k = points.shape[1]
    dist2 = (points[:, :, None] - points[:, None]).pow(2).sum(-1)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=points.device)
    if kind == "squared":
        return F.relu(margin - dist2)[:, off_diagonal].mean()
    if kind == "distance":
        return F.relu(margin**0.5 - (dist2 + 1e-6).sqrt())[:, off_diagonal].mean()
    raise ValueError(f"separation kind must be 'squared' or 'distance', got {kind!r}")


def landmark_loss(
    heatmaps: Tensor,
    points: Tensor,
    margin: float = 0.05,
    separation_weight: float = 1.0,
    separation: str = "squared",
    concentration_weight: float = 1.0,
) -> Tensor:
    """Eq. 6, landmark loss = concentration (eq. 4) + separation (eq. 5), each weighted."""
    return concentration_weight * concentration_loss(heatmaps) + separation_weight * (
        separation_loss(points, margin, separation)
    )


def joint_loss(
    source_points: Tensor, target_points: Tensor, mapping: Tensor, confidence: Tensor | None = None
) -> Tensor:
    """Eq. 7, joint loss (one direction): source landmarks carried by tau must land on the
    target's landmarks: mean over k of c_k ||phi_k(target) - tau(phi_k(source))||^2, in
    normalised coordinates (as eq. 5), with c_k the alignment confidence at the source
    landmark (no gradient through c_k, so only reliable matches teach). Call it for both
    directions.

    source_points, target_points (B, K, 2); mapping (B, 2, h, w); confidence (B, 1, h, w).
    """
    carried = sample_at(mapping, source_points)  # (B, K, 2)
    err = (target_points - carried).pow(2).sum(-1)
    if confidence is None:
        return err.mean()
    c = sample_at(confidence, source_points).squeeze(-1).detach()
    return (c * err).sum() / c.sum().clamp_min(1e-6)


@dataclass(frozen=True)
class Lambdas:
    """(lambda_D, lambda_A, lambda_J) of eq. 8."""

    landmark: float
    alignment: float
    joint: float


ALIGNMENT_SIDE = Lambdas(1.0, 10.0, 10.0)  # updating {W_F, W_A, W_C}
LANDMARK_SIDE = Lambdas(10.0, 1.0, 100.0)  # updating {W_F, W_D}


def total_loss(landmark: Tensor, alignment: Tensor, joint: Tensor, lambdas: Lambdas) -> Tensor:
    """Eq. 8, total = lambda_D * landmark + lambda_A * alignment + lambda_J * joint."""
    return lambdas.landmark * landmark + lambdas.alignment * alignment + lambdas.joint * joint
