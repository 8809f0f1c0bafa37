"""Propagate an annotated mask through an ordered sequence of frames.

Two modes (docs/CLIENT.md explains when to use which):

`anchor`: every frame gets the mask straight from the annotated frame. Frames go to
    `POST /propagate` in batches of `batch_size` targets per call; the service runs the
    source through the backbone once per call and reuses those features for every target of
    the batch (the API is stateless, so "once" means once per call: larger batches, fewer
    recomputations).
`chain`: frame to frame. Frame i gets the mask of the frame before it (in the walk away from
    the annotated frame), warped through `POST /correspond` (`resolution=target`) and
    `propagate_mask` here in the client, with the same unreliable-pixel rule as the service.
    Its *reliability* is the share of the carried pixels (target pixels whose match lands on
    a labelled pixel of the previous mask; all pixels when that mask is empty) whose match
    confidence reaches `min_confidence`. When it is below `fallback_reliability`, the frame
    is also warped straight from the annotated frame and whichever of the two has the higher
    reliability is kept; the chain continues from the kept mask. Chaining follows gradual
    change (deformation, viewpoint drift) better; the fallback stops errors from
    accumulating after occlusions or cuts.

If the annotated image is itself one of the frames (`anchor_index`), that frame keeps the
annotation, and the chain walks forwards from it and then backwards from it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from jlad_client.client import JladClient
from jlad_client.images import ImageInput, MaskInput, image_size, read_mask
from jlad_client.masks import DEFAULT_MIN_CONFIDENCE, propagate_mask
from jlad_client.warp import sample_nearest

Mode = Literal["anchor", "chain"]
DEFAULT_FALLBACK_RELIABILITY = 0.5


@dataclass(frozen=True)
class FrameMask:
    """The mask given to one frame.

    Attributes:
        index: position of the frame in the input sequence.
        mask: (H, W) integer labels in the frame's pixels.
        origin: `annotated` (the annotation itself), `anchor` (warped from the annotated
            frame) or `previous` (warped from the frame before it in the chain).
        reliability: `anchor` mode: the service's `reliable_fraction` (share of the
            frame's pixels whose match met `min_confidence`); `chain` mode: the same share
            over the carried pixels only (see the module docstring); 1 for the annotation.
        fell_back: True when the chain's reliability was too low and the annotated frame was
            asked instead.
    """

    index: int
    mask: NDArray[np.integer]
    origin: Literal["annotated", "anchor", "previous"]
    reliability: float
    fell_back: bool = False


def carried_reliability(
    source_mask: NDArray[np.integer],
    backward_field: NDArray[np.floating],
    confidence: NDArray[np.floating],
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> float:
    """Share of the carried target pixels whose confidence (Ht, Wt) reaches `min_confidence`.

    Carried pixels: those whose match (Ht, Wt, 2) lands on a labelled (non-zero) source
    pixel; every target pixel when none does. NaN confidence counts as unreliable.
    """
    carried = sample_nearest(np.asarray(source_mask) != 0, backward_field, fill=False).astype(bool)
    conf = np.asarray(confidence, np.float64)
    values = conf[carried] if carried.any() else conf.ravel()
    if values.size == 0:
        return 0.0
    return float(np.count_nonzero(values >= min_confidence)) / values.size


def chain_order(count: int, anchor_index: int | None) -> list[tuple[int, int | None]]:
    """(frame, previous frame) pairs in chain order; previous None = the annotated image.

    Forwards from the anchor to the end, then backwards from the anchor to the start.
    """
    if anchor_index is None:
        return [(i, i - 1 if i > 0 else None) for i in range(count)]
    forward: list[tuple[int, int | None]] = [(i, i - 1) for i in range(anchor_index + 1, count)]
    backward: list[tuple[int, int | None]] = [(i, i + 1) for i in range(anchor_index - 1, -1, -1)]
    return forward + backward


def _check_mask_size(mask: NDArray[np.integer], source: ImageInput) -> None:
    width, height = image_size(source)
    if mask.shape != (height, width):
        raise ValueError(
            f"the mask is {mask.shape[1]}x{mask.shape[0]} but the annotated image is "
            f"{width}x{height}: they must be the same size"
        )


def _propagate_anchor(
    client: JladClient,
    source: ImageInput,
    mask: NDArray[np.integer],
    frames: Sequence[ImageInput],
    todo: list[int],
    *,
    batch_size: int,
    min_confidence: float,
    keep_if_neighbours_agree: bool,
    model: str | None,
) -> Iterator[FrameMask]:
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        result = client.propagate(
            source,
            mask,
            [frames[i] for i in batch],
            model=model,
            min_confidence=min_confidence,
            keep_if_neighbours_agree=keep_if_neighbours_agree,
        )
        answers = zip(batch, result.masks, result.reliable_fraction, strict=True)
        for index, target_mask, reliability in answers:
            yield FrameMask(index, target_mask, "anchor", reliability)


def _warp_through_service(
    client: JladClient,
    source: ImageInput,
    mask: NDArray[np.integer],
    target: ImageInput,
    *,
    min_confidence: float,
    keep_if_neighbours_agree: bool,
    model: str | None,
) -> tuple[NDArray[np.integer], float]:
    """`mask` carried onto `target` via `/correspond` + `propagate_mask`, and its
    reliability."""
    corr = client.correspond(source, target, resolution="target", model=model)
    field = corr.backward_field()
    warped = propagate_mask(
        mask,
        field,
        corr.confidence,
        min_confidence=min_confidence,
        keep_if_neighbours_agree=keep_if_neighbours_agree,
    )
    return warped, carried_reliability(mask, field, corr.confidence, min_confidence)


def propagate_sequence(
    client: JladClient,
    source: ImageInput,
    mask: MaskInput,
    frames: Sequence[ImageInput],
    *,
    mode: Mode = "anchor",
    anchor_index: int | None = None,
    batch_size: int = 8,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    keep_if_neighbours_agree: bool = True,
    fallback_reliability: float = DEFAULT_FALLBACK_RELIABILITY,
    model: str | None = None,
) -> Iterator[FrameMask]:
    """Yield a `FrameMask` for every frame, as each is ready (in processing order).

    Args:
        client: a connected `JladClient`.
        source: the annotated image.
        mask: its (H, W) label mask (same size as `source`).
        frames: the frames, in sequence order.
        mode: `anchor` or `chain` (see the module docstring).
        anchor_index: index of `source` within `frames`, if it is one of them.
        batch_size: targets per `/propagate` call in `anchor` mode.
        min_confidence, keep_if_neighbours_agree: the unreliable-pixel rule (unreliable
            pixels become background 0; see `jlad_client.masks`), the same in both modes.
        fallback_reliability: `chain` mode: reliability below which the annotated frame is
            asked too.
        model: model name (default: the client's, else the service's).
    """
    labels = read_mask(mask)
    _check_mask_size(labels, source)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if mode not in ("anchor", "chain"):
        raise ValueError(f"mode must be 'anchor' or 'chain', got {mode!r}")
    if anchor_index is not None:
        if not 0 <= anchor_index < len(frames):
            raise ValueError(f"anchor_index {anchor_index} outside 0..{len(frames) - 1}")
        yield FrameMask(anchor_index, labels, "annotated", 1.0)
    if mode == "anchor":
        todo = [i for i in range(len(frames)) if i != anchor_index]
        yield from _propagate_anchor(
            client,
            source,
            labels,
            frames,
            todo,
            batch_size=batch_size,
            min_confidence=min_confidence,
            keep_if_neighbours_agree=keep_if_neighbours_agree,
            model=model,
        )
        return

    warp = functools.partial(
        _warp_through_service,
        client,
        min_confidence=min_confidence,
        keep_if_neighbours_agree=keep_if_neighbours_agree,
        model=model,
    )
    masks: dict[int, NDArray[np.integer]] = {} if anchor_index is None else {anchor_index: labels}
    for index, previous in chain_order(len(frames), anchor_index):
        prev_image = source if previous is None else frames[previous]
        prev_mask = labels if previous is None else masks[previous]
        warped, reliability = warp(prev_image, prev_mask, frames[index])
        origin: Literal["anchor", "previous"] = "anchor" if previous is None else "previous"
        fell_back = False
        if previous is not None and not reliability >= fallback_reliability:
            fell_back = True
            direct, direct_reliability = warp(source, labels, frames[index])
            if direct_reliability > reliability:
                warped, reliability, origin = direct, direct_reliability, "anchor"
        masks[index] = warped
        yield FrameMask(index, warped, origin, reliability, fell_back)


@dataclass(frozen=True)
class SequenceSummary:
    """Counts over a finished sequence, for logs and the CLI's summary."""

    frames: int
    from_anchor: int
    from_previous: int
    fallbacks: int
    mean_reliability: float  # over the propagated frames, NaN when none said
    mean_foreground_fraction: float
    seconds: float


def summarise(results: Sequence[FrameMask], started: float) -> SequenceSummary:
    """A `SequenceSummary` of `results`; `started` is a `time.perf_counter()` reading."""
    reliabilities = [r.reliability for r in results if r.origin != "annotated"]
    finite = [r for r in reliabilities if np.isfinite(r)]
    fractions = [float(np.count_nonzero(r.mask)) / max(r.mask.size, 1) for r in results]
    return SequenceSummary(
        frames=len(results),
        from_anchor=sum(r.origin == "anchor" for r in results),
        from_previous=sum(r.origin == "previous" for r in results),
        fallbacks=sum(r.fell_back for r in results),
        mean_reliability=float(np.mean(finite)) if finite else float("nan"),
        mean_foreground_fraction=float(np.mean(fractions)) if fractions else 0.0,
        seconds=time.perf_counter() - started,
    )
