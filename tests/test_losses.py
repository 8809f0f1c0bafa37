"""Each loss of eq. 2-8: a case where it must be zero or small, one where it must be large,
and gradients that reach what they should (and not the teacher side)."""

from __future__ import annotations

import pytest
import torch

from model_export import losses
from model_export.geometry import cell_centres
from model_export.model import JLAD, ModelConfig
from model_export.similarity import l2_normalise
from model_export.train import joint_step

torch.set_num_threads(2)


def identity_mapping(b: int, h: int, w: int) -> torch.Tensor:
    return cell_centres(h, w).permute(2, 0, 1)[None].expand(b, -1, -1, -1).clone()


def distinct_features(b: int = 2, h: int = 6, w: int = 6) -> torch.Tensor:
    # one-hot per cell: every cell is orthogonal to every other
    c = h * w
    return torch.eye(c).reshape(c, h, w)[None].expand(b, -1, -1, -1).clone()


def test_uncertainty_weighting_eq3() -> None:
    per_position = torch.full((1, 1, 2, 2), 2.0)
    assert float(losses.uncertainty_weighted(per_position, torch.zeros_like(per_position))) == 2.0
    # optimum over s is s = log(l): value 1 + log(l) < l for l > 1
    best = losses.uncertainty_weighted(per_position, torch.log(per_position))
    assert abs(float(best) - (1 + float(torch.log(torch.tensor(2.0))))) < 1e-6


def test_alignment_loss_small_for_true_mapping_large_for_wrong() -> None:
    f = distinct_features()
    s = torch.zeros(2, 1, 6, 6)
    right = losses.alignment_loss(f, f, identity_mapping(2, 6, 6), s, temperature=0.05)
    shifted = identity_mapping(2, 6, 6)
    shifted[:, 0] += 2 / 6  # one cell to the right: the centre of the window is wrong
    wrong = losses.alignment_loss(f, f, shifted, s, temperature=0.05)
    assert float(right) < 0.01
    assert float(wrong) > 1.0


def test_alignment_loss_gradient_reaches_mapping_and_sigma() -> None:
    f = l2_normalise(torch.randn(1, 8, 6, 6))
    mapping = (identity_mapping(1, 6, 6) + 0.05).requires_grad_(True)
    s = torch.zeros(1, 1, 6, 6, requires_grad=True)
    losses.alignment_loss(f, f, mapping, s).backward()
    assert mapping.grad is not None and float(mapping.grad.abs().sum()) > 0
    assert s.grad is not None and float(s.grad.abs().sum()) > 0


def test_flow_supervision_loss_zero_at_truth_and_counts_cells() -> None:
    m = identity_mapping(1, 4, 4)
    valid = torch.ones(1, 1, 4, 4)
    assert float(losses.flow_supervision_loss(m, m, valid)) == 0.0
    off = m.clone()
    off[:, 0] += 2 * (2 / 4)  # two cells
    torch.testing.assert_close(losses.flow_supervision_loss(off, m, valid), torch.tensor(2.0))
    assert float(losses.flow_supervision_loss(off, m, torch.zeros_like(valid))) == 0.0


def test_concentration_loss_eq4() -> None:
    delta = torch.zeros(1, 1, 8, 8)
    delta[0, 0, 3, 3] = 1
    assert float(losses.concentration_loss(delta)) < 1e-6
    uniform = torch.full((1, 1, 8, 8), 1 / 64)
    # variance of a uniform distribution over 8 cells is (8^2 - 1) / 12 per axis
    torch.testing.assert_close(losses.concentration_loss(uniform), torch.tensor(2 * 63 / 12))


def test_separation_loss_eq5() -> None:
    apart = torch.tensor([[[-0.8, -0.8], [0.8, 0.8], [0.8, -0.8]]])
    together = torch.zeros(1, 3, 2)
    assert float(losses.separation_loss(apart, margin=0.05)) == 0.0
    torch.testing.assert_close(losses.separation_loss(together, margin=0.05), torch.tensor(0.05))


def test_separation_loss_eq5_distance_form() -> None:
    apart = torch.tensor([[[-0.8, -0.8], [0.8, 0.8], [0.8, -0.8]]])
    assert float(losses.separation_loss(apart, margin=0.05, kind="distance")) == 0.0
    # two points 0.1 apart with margin 0.09 (sqrt 0.3): each ordered pair scores 0.3 - 0.1
    pair = torch.tensor([[[0.0, 0.0], [0.1, 0.0]]])
    torch.testing.assert_close(
        losses.separation_loss(pair, margin=0.09, kind="distance"),
        torch.tensor(0.2),
        atol=1e-4,
        rtol=0,
    )
    with pytest.raises(ValueError, match="separation kind"):
        losses.separation_loss(pair, kind="cubic")


def test_distance_separation_parts_points_the_squared_form_cannot() -> None:
    """Nearly collapsed points: the squared hinge's gradient vanishes with the distance, the
    distance hinge's does not (why the objects refit uses it)."""
    grads = {}
    for kind in ("squared", "distance"):
        pts = torch.tensor([[[0.0, 0.0], [1e-3, 0.0]]], requires_grad=True)
        losses.separation_loss(pts, margin=0.1, kind=kind).backward()
        assert pts.grad is not None
        grads[kind] = float(pts.grad.abs().max())
        assert float(pts.grad[0, 0, 0]) > 0 > float(pts.grad[0, 1, 0])  # pushed apart
    assert grads["squared"] < 1e-2 < 0.4 < grads["distance"]


def test_landmark_loss_eq6_is_the_sum() -> None:
    heat = torch.softmax(torch.randn(2, 3, 5, 5).flatten(2), -1).reshape(2, 3, 5, 5)
    pts = torch.rand(2, 3, 2) * 2 - 1
    torch.testing.assert_close(
        losses.landmark_loss(heat, pts),
        losses.concentration_loss(heat) + losses.separation_loss(pts),
    )


def test_landmark_loss_eq6_weighs_each_term() -> None:
    heat = torch.softmax(torch.randn(2, 3, 5, 5).flatten(2), -1).reshape(2, 3, 5, 5)
    pts = torch.zeros(2, 3, 2)  # collapsed: eq. 5 is at its maximum
    torch.testing.assert_close(
        losses.landmark_loss(heat, pts, separation_weight=4.0, concentration_weight=0.1),
        0.1 * losses.concentration_loss(heat) + 4.0 * losses.separation_loss(pts),
    )
    only_separation = losses.landmark_loss(heat, pts, concentration_weight=0.0)
    torch.testing.assert_close(only_separation, losses.separation_loss(pts))


def test_joint_loss_eq7_zero_when_tau_carries_landmarks_exactly() -> None:
    pts = torch.tensor([[[-0.5, -0.5], [0.25, 0.5]]])
    m = identity_mapping(1, 8, 8)
    assert float(losses.joint_loss(pts, pts, m)) < 1e-10
    shifted = m.clone()
    shifted[:, 0] += 0.5
    torch.testing.assert_close(losses.joint_loss(pts, pts, shifted), torch.tensor(0.25))


def test_joint_loss_confidence_weights_but_gets_no_gradient() -> None:
    pts = torch.tensor([[[-0.5, -0.5], [0.5, 0.5]]])
    m = identity_mapping(1, 8, 8)
    m[:, 0] += 0.5
    m.requires_grad_(True)
    conf = torch.ones(1, 1, 8, 8, requires_grad=True)
    losses.joint_loss(pts, pts, m, conf).backward()
    assert m.grad is not None and float(m.grad.abs().sum()) > 0
    assert conf.grad is None or float(conf.grad.abs().sum()) == 0.0
    m = m.detach()
    low_right = torch.ones(1, 1, 8, 8)
    low_right[..., 4:, 4:] = 0.0  # the second landmark's match is unreliable
    target = pts.clone()
    target[0, 0] += torch.tensor([0.5, 0.0])  # first landmark carried exactly
    assert float(losses.joint_loss(pts, target, m, low_right)) < 1e-6
    assert float(losses.joint_loss(pts, target, m)) > 0.1


def test_total_loss_eq8_lambda_sets() -> None:
    one = torch.tensor(1.0)
    assert float(losses.total_loss(one, one, one, losses.ALIGNMENT_SIDE)) == 21.0
    assert float(losses.total_loss(one, 2 * one, 3 * one, losses.LANDMARK_SIDE)) == 312.0


def _grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_joint_step_updates_one_side_and_leaves_the_teacher_alone() -> None:
    model = JLAD(
        ModelConfig(input_size=(64, 64), feature_dim=16, head_width=16, num_landmarks=4),
        pretrained=False,
    ).train()
    c0 = model.backbone.out_channels
    a = l2_normalise(torch.randn(2, c0, 8, 8))
    b = l2_normalise(torch.randn(2, c0, 8, 8))

    joint_step(model, a, b, "align")["total"].backward()
    assert _grads(model.aligner) > 0 and _grads(model.adapter) > 0
    assert _grads(model.detector) == 0  # W_D is the teacher here
    assert all(p.grad is None for p in model.backbone.parameters())

    model.zero_grad(set_to_none=True)
    joint_step(model, a, b, "landmarks")["total"].backward()
    assert _grads(model.detector) > 0 and _grads(model.adapter) > 0
    assert _grads(model.aligner) == 0  # W_A, W_C are the teacher here
