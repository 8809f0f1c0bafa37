"""Propagate an annotated mask through an ordered sequence of frames.

Two modes (docs/CLIENT.md explains when to use which):

`anchor`: every frame gets the mask straight from the annotated frame. Frames go to
    `POST /propagate` in batches of `batch_size` targets per call; the service runs the
    source through the backbone once per call and reuses those features for every target of
    the batch (the API is stateless, so "once" means once per call: larger batches, fewer
    recomputations).
`chain`: frame to frame, held to the annotated frame. Each step warps the previous frame's
    mask onto the frame (`POST /correspond`, `resolution=target`, and `propagate_mask` here
    in the client, with the same unreliable-pixel rule as the service) and also the
    annotation itself (a second `/correspond` from the annotated image; one call when the
    previous frame is the annotated one). `chain_step` then combines the two: a pixel whose
    match to the annotated frame is reliable (confidence >= `min_confidence`) takes the
    directly warped label, every other pixel the chained one, so the chain only fills in
    where the direct match fails (large motion, deformation) and cannot drift where the
    direct match holds. The step's *reliability* is the agreement (`label_agreement`, the
    IoU for one label) between the chained and the directly warped masks: per-step match
    confidence stays near 1 between neighbouring frames even while a chain drifts onto the
    background, whereas drift shows as disagreement with the annotated frame. Below
    `fallback_reliability` the frame takes the directly warped mask (`fell_back`) and the
    chain restarts from it. With `refine="colour"` the directly warped mask also votes in
    the colour refinement of the fused one (`refine_by_colour(..., votes=...)`).

If the annotated image is itself one of the frames (`anchor_index`), that frame keeps the
annotation, and the chain walks forwards from it and then backwards from it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from jlad_client.client import JladClient, Refine
from jlad_client.images import ImageInput, MaskInput, image_size, read_mask, read_rgb
from jlad_client.masks import (
    DEFAULT_MIN_CONFIDENCE,
    correspondence_cell_px,
    label_agreement,
    propagate_mask,
    refine_by_colour,
)

Mode = Literal["anchor", "chain"]
DEFAULT_FALLBACK_RELIABILITY = 0.3
"""Chain mode: agreement with the directly warped mask below which a frame takes the directly
warped mask. Chosen on the four DAVIS-2016 sample sequences (docs/EVALUATION.md): 0.3 keeps
the chain at least as good as anchor mode on each of them; 0.5 restarts too often (the
directly warped mask is itself poor on fast motion) and 0 lets `libby` drift."""


class Refiner(Protocol):
    """Moves a frame's propagated mask onto the frame's content (e.g. `colour_refiner`);
    `votes` are masks of the same frame propagated by other routes."""

    def __call__(
        self, mask: NDArray[np.integer], *, votes: Sequence[NDArray[np.integer]] = ()
    ) -> NDArray[np.integer]: ...


@dataclass(frozen=True)
class FrameMask:
    """The mask given to one frame.

    Attributes:
        index: position of the frame in the input sequence.
        mask: (H, W) integer labels in the frame's pixels.
        origin: `annotated` (the annotation itself), `anchor` (warped from the annotated
            frame) or `previous` (warped from the frame before it in the chain).
        reliability: `anchor` mode: the service's `reliable_fraction` (share of the
            frame's pixels whose match met `min_confidence`); `chain` mode: the agreement
            between the chained mask and the mask warped straight from the annotated frame
            (see the module docstring); 1 for the annotation.
        fell_back: True when that agreement was below `fallback_reliability` and the frame
            took the directly warped mask.
    """

    index: int
    mask: NDArray[np.integer]
    origin: Literal["annotated", "anchor", "previous"]
    reliability: float
    fell_back: bool = False


@dataclass(frozen=True)
class ChainStep:
    """One chain-mode step: the frame's mask, its reliability, and how it was made."""

    mask: NDArray[np.integer]
    reliability: float
    origin: Literal["anchor", "previous"]
    fell_back: bool


def chain_step(
    previous_mask: NDArray[np.integer],
    previous_field: NDArray[np.floating] | None,
    previous_confidence: NDArray[np.floating] | None,
    annotation: NDArray[np.integer],
    anchor_field: NDArray[np.floating],
    anchor_confidence: NDArray[np.floating],
    *,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    keep_if_neighbours_agree: bool = True,
    fallback_reliability: float = DEFAULT_FALLBACK_RELIABILITY,
    refine: Refiner | None = None,
) -> ChainStep:
    """One step of chain mode, from correspondence arrays (the service's or the model's).

    Args:
        previous_mask: (Hp, Wp) labels of the frame before this one in the chain.
        previous_field, previous_confidence: backward field (H, W, 2) from this frame to the
            previous frame (source pixel per target pixel) and its confidence (H, W); both
            None when the previous frame is the annotated one (the step is then the direct
            warp, origin `anchor`, reliability 1).
        annotation: (Ha, Wa) labels of the annotated frame.
        anchor_field, anchor_confidence: the same from this frame to the annotated frame.
        min_confidence, keep_if_neighbours_agree: the unreliable-pixel rule of
            `propagate_mask`, used for both warps; `min_confidence` also decides which
            pixels keep the directly warped label.
        fallback_reliability: below this agreement the frame takes the directly warped mask.
        refine: applied to the step's mask (e.g. `colour_refiner`), with the directly
            warped mask as a vote when the mask is the fused one: where chain and anchor
            disagree near a boundary, the frame's colours decide. The reliability stays
            that of the unrefined masks.

    Returns:
        The mask: the directly warped label where the match to the annotated frame reaches
        `min_confidence`, the chained label elsewhere (or the directly warped mask when
        falling back); reliability = `label_agreement` of the chained and directly warped
        masks.
    """
    warp = functools.partial(
        propagate_mask,
        min_confidence=min_confidence,
        keep_if_neighbours_agree=keep_if_neighbours_agree,
    )
    direct = warp(annotation, anchor_field, anchor_confidence)
    if previous_field is None or previous_confidence is None:
        return ChainStep(direct if refine is None else refine(direct), 1.0, "anchor", False)
    chained = warp(previous_mask, previous_field, previous_confidence)
    agreement = label_agreement(chained, direct)
    if not agreement >= fallback_reliability:
        return ChainStep(direct if refine is None else refine(direct), agreement, "anchor", True)
    # Where the direct match holds, the chain has nothing to add and could only have drifted.
    trusted = np.asarray(anchor_confidence) >= min_confidence
    fused = np.where(trusted, direct, chained).astype(direct.dtype, copy=False)
    # The direct warp also votes on the refined boundaries: a chain refined from its own
    # refined masks alone crept off the object's colours on the DAVIS sample (scooter-black).
    mask = fused if refine is None else refine(fused, votes=[direct])
    return ChainStep(mask, agreement, "previous", False)


def colour_refiner(
    annotated_image: NDArray[np.uint8],
    annotation: NDArray[np.integer],
    frame: NDArray[np.uint8],
    grid_size: tuple[int, int],
) -> Refiner:
    """`refine_by_colour` for masks propagated onto `frame` from the annotated frame's
    colours, within one cell of the (h, w) correspondence grid of the boundaries."""
    radius = correspondence_cell_px(frame.shape[:2], grid_size)

    def refine(
        mask: NDArray[np.integer], *, votes: Sequence[NDArray[np.integer]] = ()
    ) -> NDArray[np.integer]:
        return refine_by_colour(
            annotated_image, annotation, frame, mask, radius=radius, votes=votes
        )

    return refine


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
    refine: Refine,
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
            refine=None if refine == "none" else refine,
        )
        answers = zip(batch, result.masks, result.reliable_fraction, strict=True)
        for index, target_mask, reliability in answers:
            yield FrameMask(index, target_mask, "anchor", reliability)


def _grid_size(client: JladClient, model: str | None) -> tuple[int, int]:
    """The (h, w) correspondence grid of `model` (else the client's, else the default)."""
    models = client.models()
    wanted = model or client.model
    for info in models:
        if (info.name == wanted or (wanted is None and info.is_default)) and info.grid_size:
            return info.grid_size.height, info.grid_size.width
    raise ValueError(f"the service does not say the grid size of model {wanted or 'default'}")


def _backward_arrays(
    client: JladClient, source: ImageInput, target: ImageInput, model: str | None
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Backward field (Ht, Wt, 2) and confidence (Ht, Wt) from `target` to `source`, via
    `/correspond` at target resolution."""
    corr = client.correspond(source, target, resolution="target", model=model)
    return corr.backward_field(), np.asarray(corr.confidence, np.float32)


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
    refine: Refine = "none",
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
        fallback_reliability: `chain` mode: agreement with the directly warped mask below
            which a frame takes the directly warped mask (see `chain_step`).
        model: model name (default: the client's, else the service's).
        refine: `colour` moves every mask's boundaries onto the frame's colours
            (`jlad_client.masks.refine_by_colour`, the annotated frame's colours per label;
            on the DAVIS sample J from frame 0 0.575 -> 0.712); `none` leaves them.
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
            refine=refine,
        )
        return
    if refine not in ("none", "colour"):
        raise ValueError(f"refine must be 'none' or 'colour', got {refine!r}")
    annotated_rgb = read_rgb(source) if refine == "colour" else None
    grid = _grid_size(client, model) if refine == "colour" else None

    masks: dict[int, NDArray[np.integer]] = {} if anchor_index is None else {anchor_index: labels}
    for index, previous in chain_order(len(frames), anchor_index):
        anchor_field, anchor_conf = _backward_arrays(client, source, frames[index], model)
        previous_field = previous_conf = None
        # A step from the annotated frame itself needs no second correspondence.
        if previous is not None and previous != anchor_index:
            previous_field, previous_conf = _backward_arrays(
                client, frames[previous], frames[index], model
            )
        step = chain_step(
            labels if previous is None else masks[previous],
            previous_field,
            previous_conf,
            labels,
            anchor_field,
            anchor_conf,
            min_confidence=min_confidence,
            keep_if_neighbours_agree=keep_if_neighbours_agree,
            fallback_reliability=fallback_reliability,
            refine=None
            if annotated_rgb is None or grid is None
            else colour_refiner(annotated_rgb, labels, read_rgb(frames[index]), grid),
        )
        masks[index] = step.mask
        yield FrameMask(index, step.mask, step.origin, step.reliability, step.fell_back)


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
