"""Known-answer tests of the evaluation metrics and coordinate conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jlad_client.coords import (
    mapping_to_pixel_flow,
    mapping_to_target_pixels,
    normalised_to_pixels,
    pixels_to_normalised,
    rescale_pixels,
    transfer_points,
)
from jlad_client.flowio import FLO_UNKNOWN_THRESHOLD
from jlad_client.warp import identity_grid

from model_export.baselines import identity_mapping, nearest_neighbour_mapping
from model_export.metrics import (
    box_pattern_landmarks,
    fit_landmark_regressor,
    flow_accuracy,
    keypoint_bbox_size,
    keypoint_error,
    landmark_error,
    landmark_spread,
    leave_one_out_mean_shape,
    leave_one_out_regression,
    mask_iou,
    nearest_keypoints,
    part_purity,
    pck,
    regress_landmarks,
    roc_auc,
)

# --- coordinates ---------------------------------------------------------------------------


def test_normalised_pixels_known_values_and_round_trip() -> None:
    # W = 4, H = 2: the left edge -1 is x = -0.5, the centre of pixel 0 is -0.75.
    np.testing.assert_allclose(
        normalised_to_pixels([[-1, -1], [1, 1]], (2, 4)), [[-0.5, -0.5], [3.5, 1.5]]
    )
    np.testing.assert_allclose(pixels_to_normalised([[0, 0]], (2, 4)), [[-0.75, -0.5]])
    pts = np.random.default_rng(0).uniform(-1, 50, (7, 2))
    np.testing.assert_allclose(
        normalised_to_pixels(pixels_to_normalised(pts, (30, 60)), (30, 60)), pts
    )


def test_rescale_pixels_keeps_pixel_centres() -> None:
    # Pixel 0 of a 10-wide image covers [-0.5, 0.5]; doubled, its centre is at 0.5.
    np.testing.assert_allclose(
        rescale_pixels([[0, 0], [9, 4]], (5, 10), (10, 20)), [[0.5, 0.5], [18.5, 8.5]]
    )


def _affine_mapping(h: int, w: int, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    centres = pixels_to_normalised(identity_grid(h, w), (h, w))  # (h, w, 2)
    return np.asarray((centres @ matrix.T + offset).transpose(2, 0, 1))


def test_identity_mapping_gives_zero_flow_up_to_the_border() -> None:
    mapping = identity_mapping(1, 4, 6)[0].numpy()
    flow = mapping_to_pixel_flow(mapping, (40, 60), (40, 60))
    assert flow.shape == (40, 60, 2)
    np.testing.assert_allclose(flow, 0, atol=1e-4)


def test_translation_mapping_gives_constant_pixel_flow_between_sizes() -> None:
    # A shift of 0.1 normalised in x is 0.05 * width target pixels; the target is twice as
    # large as the source, so positions scale by 2 too.
    mapping = _affine_mapping(8, 8, np.eye(2), np.array([0.1, -0.2]))
    positions = mapping_to_target_pixels(mapping, (32, 32), (64, 64))
    expected = rescale_pixels(identity_grid(32, 32), (32, 32), (64, 64)) + np.array([3.2, -6.4])
    np.testing.assert_allclose(positions, expected, atol=1e-3)


def test_affine_mapping_is_exact_inside_the_grid() -> None:
    matrix, offset = np.array([[0.8, 0.1], [-0.2, 0.9]]), np.array([0.05, 0.02])
    mapping = _affine_mapping(8, 8, matrix, offset)
    flow = mapping_to_pixel_flow(mapping, (64, 64), (64, 64))
    own = identity_grid(64, 64)
    expected = (
        normalised_to_pixels(pixels_to_normalised(own, (64, 64)) @ matrix.T + offset, (64, 64))
        - own
    )
    inner = slice(4, 60)  # outside the outer half cell the displacement is held constant
    np.testing.assert_allclose(flow[inner, inner], expected[inner, inner], atol=1e-3)


def test_transfer_points_equals_reading_the_dense_field() -> None:
    rng = np.random.default_rng(1)
    mapping = rng.uniform(-1, 1, (2, 5, 7)).astype(np.float32)
    src, tgt = (40, 56), (30, 90)
    dense = mapping_to_target_pixels(mapping, src, tgt)
    pts = np.array([[0, 0], [55, 39], [13, 7], [30, 20]], np.float64)
    carried = transfer_points(mapping, pts, src, tgt)
    np.testing.assert_allclose(
        carried, dense[pts[:, 1].astype(int), pts[:, 0].astype(int)], atol=1e-4
    )


# --- baselines -----------------------------------------------------------------------------


def test_nearest_neighbour_mapping_finds_the_matching_cell() -> None:
    # Target = source with its cells shuffled: each source cell must map to its new place.
    torch.manual_seed(0)
    source = torch.nn.functional.normalize(torch.randn(1, 16, 3, 4), dim=1)
    perm = torch.randperm(12)
    target = source.flatten(2)[:, :, perm].reshape(1, 16, 3, 4)
    mapping = nearest_neighbour_mapping(source, target)
    assert mapping.shape == (1, 2, 3, 4)
    where = torch.argsort(perm)  # target index of each source cell
    rows, cols = where // 4, where % 4
    expected = torch.stack([(2 * cols + 1) / 4 - 1, (2 * rows + 1) / 3 - 1]).reshape(2, 3, 4)
    torch.testing.assert_close(mapping[0], expected)


# --- PCK -----------------------------------------------------------------------------------


def test_pck_known_answer_and_box_form() -> None:
    true = np.zeros((5, 2))
    pred = np.array([[0, 0], [4, 0], [0, 9], [14, 0], [12, 16]], np.float64)  # 0 4 9 14 20
    assert pck(pred, true, 100.0) == {0.05: 0.4, 0.1: 0.6, 0.15: 0.8}
    assert pck(pred, true, (10, 20, 60, 120), alphas=(0.2,)) == {0.2: 1.0}


def test_pck_skips_unannotated_and_fails_nan_predictions() -> None:
    true = np.array([[0, 0], [np.nan, np.nan], [10, 10]])
    pred = np.array([[1, 0], [0, 0], [np.nan, 10]])
    assert pck(pred, true, 10.0, alphas=(0.5,)) == {0.5: 0.5}
    with pytest.raises(ValueError):
        pck(pred, true, 0.0)


def test_keypoint_bbox_size_is_the_longer_side() -> None:
    assert keypoint_bbox_size(np.array([[10, 5], [40, 25], [np.nan, 0], [20, 8]])) == 30.0


# --- flow and masks ------------------------------------------------------------------------


def test_flow_accuracy_scales_the_longer_side_to_100() -> None:
    h, w = 100, 200  # longer side 200: errors are halved before the 5 px threshold
    true = np.zeros((h, w, 2), np.float32)
    pred = np.zeros_like(true)
    pred[:, :50, 0] = 8.0  # 4 px at 100 px scale: correct
    pred[:, 50:100, 0] = 12.0  # 6 px: wrong
    mask = np.zeros((h, w), bool)
    mask[:, :100] = True
    assert flow_accuracy(pred, true, mask) == pytest.approx(0.5)
    assert flow_accuracy(pred, true, mask, threshold_px=7) == pytest.approx(1.0)


def test_flow_accuracy_ignores_unknown_flow() -> None:
    true = np.zeros((10, 10, 2), np.float32)
    true[:5] = 2 * FLO_UNKNOWN_THRESHOLD
    pred = np.zeros_like(true)
    pred[:5] = 50.0  # only wrong where the truth is unknown
    assert flow_accuracy(pred, true, np.ones((10, 10), bool)) == 1.0
    with pytest.raises(ValueError):
        flow_accuracy(pred, true, np.zeros((10, 10), bool))


def test_mask_iou_known_answer() -> None:
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:4] = 255  # 16 pixels
    b[2:6, 2:6] = True  # 16 pixels, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 28)
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0


# --- landmark regression -------------------------------------------------------------------


def test_regressor_recovers_a_linear_map_exactly() -> None:
    rng = np.random.default_rng(2)
    landmarks = rng.uniform(-1, 1, (200, 10, 2))
    weights = rng.normal(size=(20, 10))
    truth = (landmarks.reshape(200, 20) @ weights).reshape(200, 5, 2)
    fitted = fit_landmark_regressor(landmarks, truth, ridge=0)
    np.testing.assert_allclose(fitted, weights, atol=1e-8)
    np.testing.assert_allclose(fit_landmark_regressor(landmarks, truth), weights, atol=1e-3)
    np.testing.assert_allclose(regress_landmarks(fitted, landmarks), truth, atol=1e-8)


def test_regressor_has_no_bias() -> None:
    # All-zero landmarks can only predict zeros, whatever the annotations say.
    truth = np.full((20, 5, 2), 3.0)
    fitted = fit_landmark_regressor(np.zeros((20, 4, 2)), truth)
    np.testing.assert_allclose(regress_landmarks(fitted, np.zeros((3, 4, 2))), 0.0)


def test_regressor_survives_collapsed_landmarks() -> None:
    rng = np.random.default_rng(3)
    landmarks = rng.uniform(-1, 1, (50, 3, 2))
    landmarks[:, 2] = landmarks[:, 1]  # two landmarks on the same spot: singular X^T X
    truth = landmarks[:, :2].repeat(3, axis=1)[:, :5]
    fitted = fit_landmark_regressor(landmarks, truth)
    assert np.isfinite(fitted).all()
    np.testing.assert_allclose(regress_landmarks(fitted, landmarks), truth, atol=1e-4)


def test_landmark_error_in_percent_of_inter_ocular_distance() -> None:
    truth = np.array([[[0, 0], [10, 0], [5, 5], [2, 8], [8, 8]]], np.float64)
    assert landmark_error(truth + np.array([0, 1]), truth) == pytest.approx(10.0)
    two = np.concatenate([truth, truth * 2])  # second face twice as large, same 2 px shift
    assert landmark_error(two + np.array([2, 0]), two) == pytest.approx((20 + 10) / 2)
    with pytest.raises(ValueError):
        landmark_error(np.zeros((1, 5, 2)), np.zeros((1, 5, 2)))


def test_roc_auc_known_answers() -> None:
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    # One inversion among the 2 x 2 positive/negative pairs: 3 of 4 ordered right.
    assert roc_auc([0.1, 0.6, 0.5, 0.9], [False, False, True, True]) == 0.75
    assert roc_auc([0.5, 0.5, 0.5], [True, False, True]) == 0.5  # ties count half
    assert np.isnan(roc_auc([0.1, 0.2], [True, True]))


# --- object landmarks ----------------------------------------------------------------------


def test_landmark_spread_known_answer() -> None:
    # A 3-4-5 triangle in a 30 x 40 image (diagonal 50): mean side (3 + 4 + 5) / 3 = 4 -> 8 %.
    points = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]])
    assert landmark_spread(points, (30, 40)) == pytest.approx(8.0)
    assert landmark_spread(np.ones((5, 2)), (30, 40)) == 0.0  # collapsed


def test_nearest_keypoints_and_part_purity() -> None:
    keypoints = np.array([[0.0, 0.0], [10.0, 0.0], [np.nan, np.nan]])
    landmarks = np.array([[1.0, 1.0], [9.0, 0.0], [100.0, 100.0]])
    assert nearest_keypoints(landmarks, keypoints).tolist() == [0, 1, 1]  # NaN never chosen
    # Landmark 0 on keypoint 3 in 3 of 4 images, landmark 1 always on 2.
    purity = part_purity(np.array([[3, 2], [3, 2], [1, 2], [3, 2]]))
    assert purity.tolist() == [0.75, 1.0]


def test_keypoint_error_in_percent_of_the_box_side() -> None:
    true = np.array([[[0.0, 0.0], [20.0, 10.0]]])  # box 20 x 10: L = 20
    pred = true + np.array([[[2.0, 0.0], [0.0, 0.0]]])  # errors 2 and 0: mean 1 -> 5 %
    assert keypoint_error(pred, true).tolist() == pytest.approx([5.0])


def test_leave_one_out_regression_recovers_a_linear_map() -> None:
    rng = np.random.default_rng(0)
    landmarks = rng.normal(size=(12, 3, 2))  # 12 images, 6 inputs: every fold well-posed
    weights = rng.normal(size=(6, 4))
    points = regress_landmarks(weights, landmarks)
    np.testing.assert_allclose(leave_one_out_regression(landmarks, points), points, atol=1e-4)


def test_leave_one_out_mean_shape_leaves_the_image_out() -> None:
    points = np.array([[[0.0, 0.0]], [[2.0, 4.0]], [[4.0, 8.0]]])
    expected = np.array([[[3.0, 6.0]], [[2.0, 4.0]], [[1.0, 2.0]]])
    np.testing.assert_allclose(leave_one_out_mean_shape(points), expected)


def test_box_pattern_landmarks_follow_the_keypoint_box() -> None:
    keypoints = np.array([[[0.0, 0.0], [2.0, 1.0]], [[1.0, 1.0], [5.0, 3.0]]])  # boxes 2, 4
    points = box_pattern_landmarks(keypoints, 3)
    assert points.shape == (2, 3, 2)
    # Same pattern in both images: the second is the first scaled 2x about the box centres.
    np.testing.assert_allclose(points[1] - [3.0, 2.0], 2 * (points[0] - [1.0, 0.5]))
    assert np.all(np.abs(points[0] - [1.0, 0.5]) <= 1.0)  # within half the longer side
    # Objects that differ only in position and size: the box pattern predicts them exactly.
    shape = np.array([[0.0, 0.0], [1.0, 0.2], [0.3, 1.0], [0.8, 0.9]])
    rng = np.random.default_rng(0)
    objects = np.stack([rng.uniform(-1, 1, 2) + rng.uniform(0.5, 2) * shape for _ in range(8)])
    predicted = leave_one_out_regression(box_pattern_landmarks(objects, 10), objects)
    np.testing.assert_allclose(predicted, objects, atol=1e-3)
