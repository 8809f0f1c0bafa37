"""Known-answer tests for carrying label masks through backward correspondence fields."""

from __future__ import annotations

import numpy as np
import pytest
from jlad_client.masks import (
    backward_field_from_flow,
    box_fraction,
    correspondence_cell_px,
    mask_iou,
    neighbourhood_agrees,
    overlay_labels,
    propagate_mask,
    refine_by_colour,
    resize_mask,
)
from jlad_client.warp import identity_grid


def _labelled_mask(height: int = 20, width: int = 24) -> np.ndarray:
    """Three labels (1, 2, 7) on background 0."""
    mask = np.zeros((height, width), np.uint8)
    mask[3:9, 4:12] = 1
    mask[10:17, 6:10] = 2
    mask[5:15, 15:21] = 7
    return mask


def test_identity_field_returns_the_mask() -> None:
    mask = _labelled_mask()
    out = propagate_mask(mask, identity_grid(*mask.shape), np.ones(mask.shape, np.float32))
    np.testing.assert_array_equal(out, mask)
    assert out.dtype == mask.dtype


def test_integer_shift_moves_every_label() -> None:
    """A target that is the source shifted by (dx, dy) = (3, -2): target pixel q comes from
    q - (3, -2); the warped mask equals the shifted mask, background where it came from
    outside."""
    mask = _labelled_mask()
    dx, dy = 3, -2
    field = identity_grid(*mask.shape) - np.array([dx, dy], np.float32)
    out = propagate_mask(mask, field, np.ones(mask.shape, np.float32))
    expected = np.zeros_like(mask)
    expected[0 : mask.shape[0] + dy, dx:] = mask[-dy:, : mask.shape[1] - dx]
    np.testing.assert_array_equal(out, expected)


def test_sub_pixel_field_never_blends_labels() -> None:
    mask = _labelled_mask()
    jitter = np.random.default_rng(0).uniform(-0.45, 0.45, (*mask.shape, 2))
    field = identity_grid(*mask.shape) + jitter.astype(np.float32)
    out = propagate_mask(mask, field, None)
    assert set(np.unique(out)) <= {0, 1, 2, 7}
    # Offsets below half a pixel round back to the same pixel.
    np.testing.assert_array_equal(out, mask)


def test_displacement_field_is_converted_to_positions() -> None:
    flow = np.zeros((4, 5, 2), np.float32)
    flow[..., 0] = 2.0
    flow[..., 1] = -1.0
    field = backward_field_from_flow(flow)
    assert field.shape == (4, 5, 2)
    np.testing.assert_allclose(field[3, 1], [3.0, 2.0])
    np.testing.assert_allclose(field[0, 0], [2.0, -1.0])


def test_different_source_and_target_sizes() -> None:
    """A 2x downscaled target: target pixel (x, y) comes from source (2x + 0.5, 2y + 0.5)."""
    mask = _labelled_mask(20, 24)
    grid = identity_grid(10, 12)
    field = grid * 2 + 0.5
    out = propagate_mask(mask, field, np.ones((10, 12), np.float32))
    assert out.shape == (10, 12)
    np.testing.assert_array_equal(out, resize_mask(mask, (10, 12)))


def test_unreliable_pixels_take_the_configured_value() -> None:
    mask = _labelled_mask()
    conf = np.ones(mask.shape, np.float32)
    conf[:, :12] = 0.2
    field = identity_grid(*mask.shape)
    out = propagate_mask(
        mask, field, conf, min_confidence=0.5, unreliable=255, keep_if_neighbours_agree=False
    )
    assert (out[:, :12] == 255).all()
    np.testing.assert_array_equal(out[:, 12:], mask[:, 12:])
    # None keeps the sampled label everywhere.
    kept = propagate_mask(mask, field, conf, unreliable=None)
    np.testing.assert_array_equal(kept, mask)
    # A threshold of 0 trusts every match.
    trusting = propagate_mask(mask, field, conf, min_confidence=0.0)
    np.testing.assert_array_equal(trusting, mask)


def test_nan_confidence_and_nan_positions() -> None:
    mask = _labelled_mask()
    field = identity_grid(*mask.shape)
    field[5, 6] = np.nan
    conf = np.ones(mask.shape, np.float32)
    conf[4, 5] = np.nan
    out = propagate_mask(mask, field, conf, unreliable=9, outside=0, keep_if_neighbours_agree=False)
    assert out[5, 6] == 0  # unknown position: outside
    assert out[4, 5] == 9  # unknown confidence: unreliable
    assert mask[5, 6] == 1 and mask[4, 5] == 1


def test_neighbourhood_rule_keeps_interiors_and_drops_boundaries() -> None:
    mask = np.zeros((12, 12), np.uint8)
    mask[2:10, 2:10] = 3
    conf = np.zeros(mask.shape, np.float32)  # every match unreliable
    out = propagate_mask(
        mask, identity_grid(12, 12), conf, keep_if_neighbours_agree=True, unreliable=0
    )
    expected = np.zeros_like(mask)
    expected[3:9, 3:9] = 3  # the interior: 3x3 windows entirely inside the square
    # Background pixels at least 2 away from the square keep 0 too; those next to it
    # become the `unreliable` value, which is also 0 here.
    np.testing.assert_array_equal(out, expected)
    wider = propagate_mask(
        mask, identity_grid(12, 12), conf, keep_if_neighbours_agree=True, agree_radius=2
    )
    assert np.count_nonzero(wider) == 4 * 4


def test_neighbourhood_agrees_known_answer() -> None:
    labels = np.array([[1, 1, 1, 2], [1, 1, 1, 2], [1, 1, 1, 2]], np.int32)
    agree = neighbourhood_agrees(labels, 1)
    expected = np.array(
        [[True, True, False, False], [True, True, False, False], [True, True, False, False]]
    )
    np.testing.assert_array_equal(agree, expected)
    assert neighbourhood_agrees(labels, 0).all()


def test_bool_mask_and_wide_label_dtypes() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:4] = True
    out = propagate_mask(mask, identity_grid(6, 6), None)
    assert out.dtype == np.uint8 and out.sum() == 9
    wide = np.full((6, 6), 70000, np.int32)
    np.testing.assert_array_equal(propagate_mask(wide, identity_grid(6, 6), None), wide)


def test_bad_inputs_raise() -> None:
    mask = _labelled_mask()
    with pytest.raises(TypeError):
        propagate_mask(mask.astype(np.float32), identity_grid(*mask.shape), None)
    with pytest.raises(ValueError):
        propagate_mask(mask[None], identity_grid(*mask.shape), None)
    with pytest.raises(ValueError):
        propagate_mask(mask, identity_grid(*mask.shape)[..., :1], None)
    with pytest.raises(ValueError):
        propagate_mask(mask, identity_grid(*mask.shape), np.ones((3, 3), np.float32))


def test_mask_iou_known_answers() -> None:
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    a[0:2, 0:2] = 1
    b[0:2, 1:3] = 5
    assert mask_iou(a, b) == pytest.approx(2 / 6)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError):
        mask_iou(a, b[:3])


def test_resize_mask_keeps_labels_and_round_trips() -> None:
    mask = _labelled_mask()
    up = resize_mask(mask, (40, 48))
    assert set(np.unique(up)) == set(np.unique(mask))
    np.testing.assert_array_equal(resize_mask(up, mask.shape), mask)


def test_overlay_labels_tints_only_labelled_pixels() -> None:
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0] = 1
    mask[3, 3] = 2
    out = overlay_labels(image, mask, alpha=0.5)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1:3, 1:3], image[1:3, 1:3])
    assert not np.array_equal(out[0, 0], image[0, 0])
    assert not np.array_equal(out[0, 0], out[3, 3])  # one colour per label


def _two_colour_scene(edge: int, height: int = 40, width: int = 60) -> np.ndarray:
    """Red object (columns < `edge`) on a blue background, with a little noise."""
    rng = np.random.default_rng(edge)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :edge] = (200, 30, 30)
    image[:, edge:] = (30, 40, 190)
    noise = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def test_box_fraction_known_answer() -> None:
    indicator = np.zeros((5, 5), bool)
    indicator[2, 2] = True
    share = box_fraction(indicator, 1)
    assert share[2, 2] == pytest.approx(1 / 9) and share[1, 1] == pytest.approx(1 / 9)
    assert share[0, 0] == 0.0
    np.testing.assert_allclose(box_fraction(np.ones((4, 7), bool), 3), 1.0)
    np.testing.assert_array_equal(box_fraction(indicator, 0), indicator.astype(float))


def test_colour_refinement_moves_a_misplaced_boundary_onto_the_colour_edge() -> None:
    """The warped mask's edge is 6 px off (as a one-cell flow error leaves it): within the
    radius the boundary snaps to the colour edge; farther away nothing changes."""
    source = _two_colour_scene(edge=30)
    source_mask = np.zeros((40, 60), np.uint8)
    source_mask[:, :30] = 1
    target = _two_colour_scene(edge=24)
    warped = np.zeros((40, 60), np.uint8)
    warped[:, :30] = 1  # 6 columns too far right
    refined = refine_by_colour(source, source_mask, target, warped, radius=8)
    truth = np.zeros((40, 60), np.uint8)
    truth[:, :24] = 1
    assert mask_iou(warped, truth) == pytest.approx(24 / 30)
    assert mask_iou(refined, truth) == 1.0
    # A colour edge beyond the radius is out of reach: the band is 2 px, the edge 6 px off.
    near = refine_by_colour(source, source_mask, target, warped, radius=2)
    assert mask_iou(near, truth) == pytest.approx(24 / 28)
    assert refined.dtype == warped.dtype


def test_colour_refinement_keeps_labels_and_leaves_uniform_masks() -> None:
    source = _two_colour_scene(edge=30)
    labels = np.zeros((40, 60), np.uint16)
    labels[:, :30] = 300
    target = _two_colour_scene(edge=24)
    warped = labels.copy()
    refined = refine_by_colour(source, labels, target, warped, radius=8)
    assert set(np.unique(refined)) <= {0, 300}
    # One label everywhere (no boundary), or a zero radius: nothing to move.
    whole = np.full((40, 60), 300, np.uint16)
    np.testing.assert_array_equal(refine_by_colour(source, labels, target, whole, radius=8), whole)
    np.testing.assert_array_equal(
        refine_by_colour(source, labels, target, warped, radius=0), warped
    )
    # A stronger prior trusts the warped mask more: the far columns stay put.
    held = refine_by_colour(source, labels, target, warped, radius=8, prior_weight=50.0)
    np.testing.assert_array_equal(held, warped)


def test_colour_refinement_votes_average_the_routes_priors() -> None:
    """Where the colours say nothing (one grey for both labels), the label is the one with
    the larger mean window share over the mask and its votes: edges at columns 30 and 24,
    radius 8, so label 1 keeps columns c with (30 - (c - 8)) + (24 - (c - 8)) > 17, c <= 26."""
    grey = np.full((40, 60, 3), 128, np.uint8)
    source_mask = np.zeros((40, 60), np.uint8)
    source_mask[:, :30] = 1
    warped = source_mask.copy()
    vote = np.zeros((40, 60), np.uint8)
    vote[:, :24] = 1
    refined = refine_by_colour(grey, source_mask, grey, warped, radius=8, votes=[vote])
    expected = np.zeros((40, 60), np.uint8)
    expected[:, :27] = 1
    np.testing.assert_array_equal(refined, expected)
    # A vote that agrees with the mask changes nothing.
    np.testing.assert_array_equal(
        refine_by_colour(grey, source_mask, grey, warped, radius=8, votes=[warped]),
        refine_by_colour(grey, source_mask, grey, warped, radius=8),
    )
    with pytest.raises(ValueError, match="vote"):
        refine_by_colour(grey, source_mask, grey, warped, radius=8, votes=[vote[:5]])


def test_colour_refinement_rejects_bad_inputs() -> None:
    image = np.zeros((10, 12, 3), np.uint8)
    mask = np.zeros((10, 12), np.uint8)
    with pytest.raises(ValueError, match="must be"):
        refine_by_colour(image, mask[:5], image, mask, radius=2)
    with pytest.raises(ValueError, match="prior_weight"):
        refine_by_colour(image, mask, image, mask, radius=2, prior_weight=0.0)
    with pytest.raises(ValueError, match="radius"):
        box_fraction(mask.astype(bool), -1)
    assert correspondence_cell_px((480, 854), (32, 32)) == 27
