"""Evaluation metrics (numpy only, pure functions).

Coordinates follow docs/CONTRACT.md; the conversions between the models' outputs and image
pixels live in `jlad_client.coords`, shared with the service.

Protocols (docs/EVALUATION.md):

- PCK@alpha: a transferred keypoint is correct when it lies within `alpha * L` of the true
  one (PF-WILLOW: L = longer side of the bounding box of the target keypoints).
- TSS flow accuracy: share of foreground pixels whose end-point error, with the image's
  longer side scaled to 100 px, is under 5 px; pixels with unknown true flow are ignored.
- Mask transfer: intersection over union of the carried mask and the true one.
- Landmark error: linear map without bias from the K discovered landmarks to the 5
  annotated points, fitted on a training split; mean point error on a validation split as
  a percentage of the inter-ocular distance.
- Object landmarks (PF-WILLOW): spread (mean distance between the K points, % of the image
  diagonal), part purity (how often landmark k lands nearest the same annotated keypoint)
  and the leave-one-image-out regressor error in % of the keypoint box's longer side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from jlad_client.flowio import valid_flow_mask
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.floating]

DEFAULT_ALPHAS = (0.05, 0.1, 0.15)
EYES = (0, 1)
"""Indices of the left and right eye among the 5 MTFL points."""


# --- keypoint transfer ---------------------------------------------------------------------


def keypoint_bbox_size(points: ArrayLike) -> float:
    """Longer side of the bounding box of points (N, 2) (non-finite points ignored): the
    PF-WILLOW PCK reference length L."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        raise ValueError("no finite keypoints to measure")
    extent = pts.max(axis=0) - pts.min(axis=0)
    return float(extent.max())


def pck(
    pred_pts: ArrayLike,
    true_pts: ArrayLike,
    bbox_or_L: float | Sequence[float],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> dict[float, float]:
    """Percentage of correct keypoints, as a fraction in [0, 1], for each alpha.

    pred_pts, true_pts: (N, 2) pixel (x, y) in the same image. bbox_or_L: the reference
    length L, or a box (x0, y0, x1, y1) whose longer side is L. A keypoint is correct when
    `||pred - true|| <= alpha * L`. Keypoints whose true position is not finite (not
    annotated) are left out; a non-finite prediction counts as wrong.
    """
    pred = np.asarray(pred_pts, np.float64).reshape(-1, 2)
    true = np.asarray(true_pts, np.float64).reshape(-1, 2)
    if pred.shape != true.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {true.shape}")
    if np.ndim(bbox_or_L) == 0:
        length = float(bbox_or_L)  # type: ignore[arg-type]
    else:
        x0, y0, x1, y1 = (float(v) for v in bbox_or_L)  # type: ignore[union-attr]
        length = max(x1 - x0, y1 - y0)
    if not length > 0:
        raise ValueError(f"reference length must be positive, got {length}")
    known = np.isfinite(true).all(axis=1)
    if not known.any():
        raise ValueError("no annotated keypoints")
    dist = np.linalg.norm(pred[known] - true[known], axis=1)
    dist = np.where(np.isfinite(dist), dist, np.inf)
    return {float(a): float(np.mean(dist <= a * length)) for a in alphas}


# --- dense flow and masks ------------------------------------------------------------------


def end_point_error(pred_flow: ArrayLike, true_flow: ArrayLike) -> NDArray[np.float64]:
    """(H, W) Euclidean distance between two flows (H, W, 2)."""
    pred = np.asarray(pred_flow, np.float64)
    true = np.asarray(true_flow, np.float64)
    if pred.shape != true.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"flows must both be (H, W, 2), got {pred.shape} and {true.shape}")
    return np.asarray(np.linalg.norm(pred - true, axis=-1), np.float64)


def correct_flow_pixels(
    pred_flow: ArrayLike,
    true_flow: ArrayLike,
    mask: ArrayLike,
    threshold_px: float = 5.0,
    scale_to: float = 100.0,
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Which pixels TSS evaluates, (H, W), and whether each of them is correct, (N,): end-point
    error under `threshold_px` once the image is scaled so that its longer side is
    `scale_to` pixels.

    pred_flow, true_flow: (H, W, 2) pixel flows defined on the source image (H, W).
    mask: (H, W) foreground of the source image. Pixels where the true flow is unknown
    (`jlad_client.flowio.valid_flow_mask`) are not evaluated. Scaling both flows by
    `scale_to / max(H, W)` is the same as resizing the image pair, hence the rescaled error.
    """
    true = np.asarray(true_flow, np.float64)
    fg = np.asarray(mask, bool)
    if fg.shape != true.shape[:2]:
        raise ValueError(f"mask {fg.shape} does not match flow {true.shape[:2]}")
    evaluated = fg & valid_flow_mask(true)
    if not evaluated.any():
        raise ValueError("no foreground pixel with known flow")
    known = np.where(evaluated[..., None], true, 0.0)
    error = end_point_error(pred_flow, known)[evaluated] * scale_to / max(true.shape[:2])
    error = np.where(np.isfinite(error), error, np.inf)
    return evaluated, error < threshold_px


def flow_accuracy(
    pred_flow: ArrayLike,
    true_flow: ArrayLike,
    mask: ArrayLike,
    threshold_px: float = 5.0,
    scale_to: float = 100.0,
) -> float:
    """TSS flow accuracy: the share of correct pixels of `correct_flow_pixels`."""
    _, correct = correct_flow_pixels(pred_flow, true_flow, mask, threshold_px, scale_to)
    return float(np.mean(correct))


def roc_auc(scores: ArrayLike, positive: ArrayLike) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative (ties count half). How well a confidence separates correct matches
    (`positive`) from wrong ones: 0.5 = no better than chance, 1 = perfectly."""
    s = np.asarray(scores, np.float64).ravel()
    pos = np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    # Average ranks over ties (Mann-Whitney U).
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mask_iou(pred_mask: ArrayLike, true_mask: ArrayLike) -> float:
    """Intersection over union of two (H, W) masks (non-zero = foreground); 1.0 when both
    are empty (nothing to find, nothing found)."""
    pred = np.asarray(pred_mask) != 0
    true = np.asarray(true_mask) != 0
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    union = np.logical_or(pred, true).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, true).sum() / union)


# --- unsupervised landmarks ----------------------------------------------------------------


def fit_landmark_regressor(
    landmarks: ArrayLike, annotations: ArrayLike, ridge: float = 1e-6
) -> NDArray[np.float64]:
    """Least-squares linear map WITHOUT bias from K landmarks to the annotated points.

    landmarks: (N, K, 2) discovered landmarks; annotations: (N, P, 2) annotated points (P =
    5 for MTFL), both in the same coordinates (we use normalised [-1, 1] so that the image
    centre is the origin). Returns W (2K, 2P) such that `landmarks.reshape(N, 2K) @ W`
    predicts `annotations.reshape(N, 2P)` (x, y interleaved per point).

    `ridge` adds `ridge * mean(diag(X^T X))` to the diagonal of the normal equations: a
    relative Tikhonov term far too small to change a well-posed fit (1e-6 of the typical
    scale) that keeps the solve stable when two landmarks collapse onto each other and make
    X^T X singular. `ridge=0` gives the plain minimum-norm least-squares solution.
    """
    x = np.asarray(landmarks, np.float64)
    y = np.asarray(annotations, np.float64)
    if x.ndim != 3 or y.ndim != 3 or x.shape[-1] != 2 or y.shape[-1] != 2:
        raise ValueError(f"expected (N, K, 2) and (N, P, 2), got {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} landmark sets but {len(y)} annotations")
    xm = x.reshape(len(x), -1)
    ym = y.reshape(len(y), -1)
    if ridge == 0:
        return np.asarray(np.linalg.lstsq(xm, ym, rcond=None)[0], np.float64)
    gram = xm.T @ xm
    lam = ridge * max(float(np.mean(np.diag(gram))), 1e-12)
    return np.asarray(np.linalg.solve(gram + lam * np.eye(len(gram)), xm.T @ ym), np.float64)


def regress_landmarks(weights: ArrayLike, landmarks: ArrayLike) -> NDArray[np.float64]:
    """Apply a regressor W (2K, 2P) from `fit_landmark_regressor` to landmarks (N, K, 2);
    returns the predicted points (N, P, 2)."""
    w = np.asarray(weights, np.float64)
    x = np.asarray(landmarks, np.float64)
    return (x.reshape(len(x), -1) @ w).reshape(len(x), -1, 2)


def landmark_error(
    pred_points: ArrayLike, true_points: ArrayLike, eyes: tuple[int, int] = EYES
) -> float:
    """Mean point error in percent of the inter-ocular distance.

    pred_points, true_points: (N, P, 2) in the same coordinates (any uniform scale: the
    ratio does not depend on it). For each image, the mean Euclidean error over its P points
    is divided by the distance between its true eye points `eyes`; the result is the mean
    over images, times 100.
    """
    pred = np.asarray(pred_points, np.float64)
    true = np.asarray(true_points, np.float64)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"shapes must match and be (N, P, 2): {pred.shape} vs {true.shape}")
    inter_ocular = np.linalg.norm(true[:, eyes[0]] - true[:, eyes[1]], axis=-1)
    if np.any(inter_ocular <= 0):
        raise ValueError("an image has coincident eye points")
    per_image = np.linalg.norm(pred - true, axis=-1).mean(axis=1) / inter_ocular
    return float(100 * per_image.mean())


def landmark_spread(points: ArrayLike, size: tuple[int, int]) -> float:
    """Mean distance between the K points (K, 2) of one image, over all K (K - 1) / 2 pairs,
    in percent of the diagonal of the image of `size` = (H, W) (points in its pixels).
    0 when the landmarks have collapsed onto one spot."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(pts) < 2:
        raise ValueError("spread needs two or more points")
    upper = np.triu_indices(len(pts), k=1)
    distances = np.linalg.norm(pts[:, None] - pts[None], axis=-1)[upper]
    return float(100 * distances.mean() / math.hypot(*size))


def nearest_keypoints(landmarks: ArrayLike, keypoints: ArrayLike) -> NDArray[np.int64]:
    """For each landmark (K, 2) the index of the nearest keypoint (P, 2) of the same image
    (same pixel coordinates); (K,). Keypoints that are not finite are never chosen."""
    lm = np.asarray(landmarks, np.float64).reshape(-1, 2)
    kp = np.asarray(keypoints, np.float64).reshape(-1, 2)
    distances = np.linalg.norm(lm[:, None] - kp[None], axis=-1)
    distances[:, ~np.isfinite(kp).all(axis=1)] = np.inf
    return np.asarray(distances.argmin(axis=1), np.int64)


def part_purity(assignments: ArrayLike) -> NDArray[np.float64]:
    """Per landmark, the share of images whose nearest keypoint is the landmark's most common
    one. assignments: (N, K) keypoint index per image and landmark (`nearest_keypoints`);
    returns (K,) in [1/N, 1]: 1 when landmark k lands on the same annotated part in every
    image."""
    a = np.asarray(assignments, np.int64)
    if a.ndim != 2 or len(a) == 0:
        raise ValueError(f"expected (N, K) with N >= 1, got {a.shape}")
    return np.array([np.bincount(column).max() / len(column) for column in a.T], np.float64)


def keypoint_error(pred_points: ArrayLike, true_points: ArrayLike) -> NDArray[np.float64]:
    """Per image, the mean point error in percent of the longer side of the true keypoints'
    bounding box (`keypoint_bbox_size`). pred_points, true_points: (N, P, 2) pixels of each
    image; returns (N,)."""
    pred = np.asarray(pred_points, np.float64)
    true = np.asarray(true_points, np.float64)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"shapes must match and be (N, P, 2): {pred.shape} vs {true.shape}")
    lengths = np.array([keypoint_bbox_size(t) for t in true])
    return np.asarray(100 * np.linalg.norm(pred - true, axis=-1).mean(axis=1) / lengths)


def leave_one_out_regression(
    landmarks: ArrayLike, annotations: ArrayLike, ridge: float = 1e-6
) -> NDArray[np.float64]:
    """Predict each image's annotated points from its landmarks with the linear map (no
    bias, `fit_landmark_regressor`) fitted on all the other images. landmarks (N, K, 2),
    annotations (N, P, 2), same coordinates (normalised per image); returns (N, P, 2).
    With fewer than 2K other images the fit is under-determined: the tiny ridge makes it the
    minimum-norm least-squares solution."""
    x = np.asarray(landmarks, np.float64)
    y = np.asarray(annotations, np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need 2+ images with both landmarks and annotations: {x.shape} {y.shape}")
    out = np.empty_like(y)
    for i in range(len(x)):
        rest = np.arange(len(x)) != i
        weights = fit_landmark_regressor(x[rest], y[rest], ridge)
        out[i] = regress_landmarks(weights, x[i : i + 1])[0]
    return out


def box_pattern_landmarks(
    annotations: ArrayLike, num_landmarks: int, seed: int = 0
) -> NDArray[np.float64]:
    """A reference landmark detector that knows where the object is: one fixed random
    pattern of `num_landmarks` points in [-0.5, 0.5]^2, placed in each image by the centre
    and the longer side of its annotated keypoints' bounding box. annotations (N, P, 2) ->
    (N, K, 2), same coordinates. It reads the annotations, so it is an upper reference for
    `leave_one_out_regression`: what points that only follow the object's position and size
    would score, not a method."""
    y = np.asarray(annotations, np.float64)
    pattern = np.random.default_rng(seed).uniform(-0.5, 0.5, (num_landmarks, 2))
    centre = (y.max(axis=1) + y.min(axis=1)) / 2
    size = (y.max(axis=1) - y.min(axis=1)).max(axis=1)
    return np.asarray(centre[:, None] + size[:, None, None] * pattern[None])


def leave_one_out_mean_shape(annotations: ArrayLike) -> NDArray[np.float64]:
    """The mean-shape baseline of `leave_one_out_regression`: each image's points predicted
    as the mean of the other images' (N, P, 2) -> (N, P, 2)."""
    y = np.asarray(annotations, np.float64)
    if len(y) < 2:
        raise ValueError("need 2+ images")
    return np.asarray((y.sum(axis=0, keepdims=True) - y) / (len(y) - 1))
