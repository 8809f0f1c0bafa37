"""Known-answer tests for chain mode's step rule (`jlad_client.sequence.chain_step`) and the
mask helpers it uses, on synthetic label maps and correspondence fields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from jlad_client.masks import label_agreement, propagate_mask, reliable_fraction
from jlad_client.sequence import ChainStep, chain_step
from jlad_client.warp import identity_grid

H, W = 20, 30


def _square(x0: int, y0: int, size: int = 8, label: int = 1) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[y0 : y0 + size, x0 : x0 + size] = label
    return mask


def _shift_field(dx: float, dy: float = 0.0) -> np.ndarray:
    """Backward field of a target that is the source moved by (dx, dy): target pixel q comes
    from q - (dx, dy)."""
    return identity_grid(H, W) - np.array([dx, dy], np.float32)


ONES = np.ones((H, W), np.float32)
ZEROS = np.zeros((H, W), np.float32)
UNSURE = np.full((H, W), 0.4, np.float32)  # below the default min_confidence 0.5


def _drifting_step(mask: np.ndarray, annotation: np.ndarray, **options: Any) -> ChainStep:
    """A chain step whose chained match moves everything 1 px right, confidently, while the
    object stays put: the direct match (identity) is right but unsure."""
    return chain_step(
        mask,
        _shift_field(1),
        ONES,
        annotation,
        identity_grid(H, W),
        UNSURE,
        fallback_reliability=0.0,
        **options,
    )


def test_label_agreement_known_answers() -> None:
    # Two 8x8 squares overlapping on 8x6: IoU = 48 / (64 + 64 - 48).
    assert label_agreement(_square(4, 4), _square(6, 4)) == pytest.approx(48 / 80)
    assert label_agreement(_square(4, 4), _square(4, 4)) == 1.0
    assert label_agreement(np.zeros((H, W), np.uint8), np.zeros((H, W), np.uint8)) == 1.0
    assert label_agreement(_square(0, 0), _square(20, 10)) == 0.0
    # Same pixels, different labels: no agreement (label-aware, unlike mask_iou).
    assert label_agreement(_square(4, 4, label=1), _square(4, 4, label=2)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        label_agreement(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))


def test_reliable_fraction_known_answer() -> None:
    confidence = np.array([[0.9, 0.5, 0.49, np.nan]], np.float32)
    assert reliable_fraction(confidence, 0.5) == 0.5  # 0.9 and 0.5 reach it; NaN does not
    assert reliable_fraction(confidence, 0.0) == 0.75


def test_step_from_the_annotated_frame_is_the_direct_warp() -> None:
    annotation = _square(4, 4)
    step = chain_step(annotation, None, None, annotation, _shift_field(3), ONES)
    np.testing.assert_array_equal(step.mask, _square(7, 4))
    assert (step.reliability, step.origin, step.fell_back) == (1.0, "anchor", False)


def test_trusted_direct_pixels_win_and_the_chain_fills_the_rest() -> None:
    """Left half: the match to the annotated frame is reliable, so its label stays; right
    half: it is not (confidence 0), so the chained label is used there."""
    annotation = _square(2, 6)  # columns 2..9
    previous = _square(18, 6)  # columns 18..25, carried unchanged by an identity chain step
    anchor_confidence = ZEROS.copy()
    anchor_confidence[:, : W // 2] = 1.0
    step = chain_step(
        previous,
        identity_grid(H, W),
        ONES,
        annotation,
        identity_grid(H, W),
        anchor_confidence,
        keep_if_neighbours_agree=False,
        fallback_reliability=0.0,
    )
    expected = np.zeros((H, W), np.uint8)
    expected[6:14, 2:10] = 1  # direct, trusted half
    expected[6:14, 18:26] = 1  # chained, untrusted half
    np.testing.assert_array_equal(step.mask, expected)
    assert step.origin == "previous" and not step.fell_back
    # The chained mask (columns 18..25) and the direct one (columns 2..9 in the trusted half,
    # nothing in the other: unreliable pixels become background) do not overlap at all.
    assert step.reliability == 0.0


def test_disagreement_below_the_threshold_falls_back_to_the_direct_warp() -> None:
    """The direct matches are all unsure (0.4 < 0.5): the direct warp keeps only the 6x6
    interior of the annotated 8x8 square (neighbourhood rule), and contributes no trusted
    pixel; the chain brings the previous mask, 2 px to the right of the annotation."""
    annotation, previous = _square(4, 4), _square(6, 4)
    unsure = np.full((H, W), 0.4, np.float32)
    args = (previous, identity_grid(H, W), ONES, annotation, identity_grid(H, W), unsure)
    direct = _square(5, 5, size=6)
    np.testing.assert_array_equal(propagate_mask(annotation, identity_grid(H, W), unsure), direct)
    # Overlap: columns 6..10 x rows 5..10 = 30; union 64 + 36 - 30 = 70.
    agreement = 30 / 70
    kept = chain_step(*args, fallback_reliability=0.3)
    assert kept.reliability == pytest.approx(agreement)
    np.testing.assert_array_equal(kept.mask, previous)  # nothing trusted: all from the chain
    assert kept.origin == "previous" and not kept.fell_back
    fallen = chain_step(*args, fallback_reliability=0.5)
    assert fallen.reliability == pytest.approx(agreement)
    assert fallen.fell_back and fallen.origin == "anchor"
    np.testing.assert_array_equal(fallen.mask, direct)


def test_reliability_drops_as_the_chain_drifts() -> None:
    """Every chain step matches confidently but wrongly (1 px to the right per frame) while
    the object stays put; the direct matches are unsure (confidence 0.4, below 0.5) but right.
    Per-step confidence stays 1 throughout; the reported reliability must fall."""
    annotation = _square(6, 6)
    mask, reliabilities = annotation, list[float]()
    for _ in range(4):
        step = _drifting_step(mask, annotation)
        mask, reliabilities = step.mask, [*reliabilities, step.reliability]
    # The direct warp keeps the 6x6 interior (columns 7..12); after k steps the chain's 8x8
    # square covers columns 6+k..13+k: overlap 6 x (7 - k), union 64 + 36 - overlap.
    expected = [6 * (7 - k) / (100 - 6 * (7 - k)) for k in range(1, 5)]
    assert reliabilities == pytest.approx(expected)
    np.testing.assert_array_equal(mask, _square(10, 6))


def test_multi_label_masks_keep_their_labels() -> None:
    annotation = _square(2, 2, label=3) + _square(16, 10, label=9)
    step = chain_step(annotation, _shift_field(1), ONES, annotation, _shift_field(1), ONES)
    expected = _square(3, 2, label=3) + _square(17, 10, label=9)
    np.testing.assert_array_equal(step.mask, expected)
    assert step.reliability == 1.0 and step.origin == "previous"


def test_refinement_of_a_fused_step_hears_the_direct_warp() -> None:
    """The refiner gets the directly warped mask as a vote on fused steps, none otherwise."""
    calls: list[tuple[np.ndarray, list[np.ndarray]]] = []

    def recorder(mask: np.ndarray, *, votes: Sequence[np.ndarray] = ()) -> np.ndarray:
        calls.append((mask, list(votes)))
        return mask

    annotation = _square(4, 4)
    first = chain_step(annotation, None, None, annotation, _shift_field(1), ONES, refine=recorder)
    assert len(calls) == 1 and calls[0][1] == []
    # Unsure direct matches: the fused mask is the chained one; the direct warp votes.
    fused = _drifting_step(first.mask, annotation, refine=recorder)
    direct = propagate_mask(annotation, identity_grid(H, W), UNSURE)
    assert len(calls) == 2 and len(calls[1][1]) == 1
    np.testing.assert_array_equal(calls[1][1][0], direct)
    np.testing.assert_array_equal(fused.mask, calls[1][0])
