"""What goes out: raw model outputs turned into the answers' arrays, JSON parts and PNGs."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from jlad_client.masks import (
    correspondence_cell_px,
    propagate_mask,
    refine_by_colour,
    reliable_fraction,
)
from numpy.typing import NDArray

from service import fields, rendering
from service.imaging import Mask, encode_mask_png
from service.inputs import PNG, Decoded
from service.jobs import InferenceResult
from service.runtime import ModelInfo
from service.schemas import (
    BatchInfo,
    CorrespondOptions,
    EncodedArray,
    FieldDtype,
    ImageSize,
    ModelRef,
    PropagateOptions,
    Resolution,
)

F32 = NDArray[np.float32]


def model_ref(info: ModelInfo) -> ModelRef:
    return ModelRef(name=info.name, version=info.version)


def size_of(wh: tuple[int, int]) -> ImageSize:
    return ImageSize(width=wh[0], height=wh[1])


def encode_array(array: NDArray[np.floating], dtype: FieldDtype) -> EncodedArray:
    little = np.ascontiguousarray(array, "<f2" if dtype == "float16" else "<f4")
    return EncodedArray(
        shape=list(little.shape), dtype=dtype, data=base64.b64encode(little.tobytes()).decode()
    )


def npz_bytes(arrays: dict[str, NDArray[Any]]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def timings(result: InferenceResult, **extra: float) -> dict[str, float]:
    out = {**result.timings_ms, **extra}
    return {k: round(v, 3) for k, v in out.items()}


def batch_info(result: InferenceResult) -> BatchInfo:
    return BatchInfo(jobs=result.batch_jobs, images=result.batch_images)


@dataclass
class CorrespondPlan:
    """Which model outputs a /correspond request needs, and how to sample them."""

    sampling: Resolution
    forward: bool  # align(source, target)
    backward: bool  # align(target, source)
    landmarks: bool

    @classmethod
    def of(cls, opts: CorrespondOptions, output: str) -> CorrespondPlan:
        png = output == PNG
        view = (opts.view or "flow") if png else None
        sampling: Resolution = opts.resolution or ("source" if png else "grid")
        dense = view in (None, "flow", "confidence")
        forward = (dense and sampling != "target") or bool(opts.points) or view == "matches"
        backward = (dense and sampling == "target") or view == "warped"
        return cls(sampling, forward, backward, view == "landmarks")

    def pairs(self) -> list[tuple[int, int]]:
        return ([(0, 1)] if self.forward else []) + ([(1, 0)] if self.backward else [])


@dataclass
class CorrespondOutputs:
    """Everything /correspond can answer, in pixels of the original images."""

    direction: str
    flow: F32
    confidence: F32
    points: F32 | None
    matches: F32 | None
    match_confidence: F32 | None


def correspond_outputs(
    plan: CorrespondPlan,
    opts: CorrespondOptions,
    source: Decoded,
    target: Decoded,
    result: InferenceResult,
) -> CorrespondOutputs:
    """Flow, confidence and query-point matches from the raw alignment outputs."""
    aligned = iter(result.alignments)
    fwd = next(aligned) if plan.forward else None
    bwd = next(aligned) if plan.backward else None
    empty = np.zeros((0, 0, 2), np.float32)
    flow, conf, direction = empty, np.zeros((0, 0), np.float32), "source->target"
    if plan.sampling == "target" and bwd is not None:
        direction = "target->source"
        flow = fields.dense_flow(bwd.mapping, "pixels", target.size, source.size)
        conf = fields.dense_confidence(bwd.confidence, "pixels", target.size)
    elif fwd is not None:
        how = "grid" if plan.sampling == "grid" else "pixels"
        flow = fields.dense_flow(fwd.mapping, how, source.size, target.size)
        conf = fields.dense_confidence(fwd.confidence, how, source.size)
    points = matches = match_conf = None
    if opts.points and fwd is not None:
        points = np.asarray(opts.points, np.float32).reshape(-1, 2)
        matches, match_conf = fields.match_points(
            fwd.mapping, fwd.confidence, points, source.size, target.size
        )
    return CorrespondOutputs(direction, flow, conf, points, matches, match_conf)


def correspond_png(
    plan: CorrespondPlan,
    opts: CorrespondOptions,
    source: Decoded,
    target: Decoded,
    result: InferenceResult,
) -> bytes:
    view = opts.view or "flow"
    if view == "landmarks":
        pts = [
            fields.landmarks_to_pixels(lm.points, *img.size)
            for lm, img in zip(result.landmarks, (source, target), strict=True)
        ]
        return rendering.landmarks_png([source.rgb, target.rgb], pts)
    if view == "warped":
        bwd = result.alignments[-1]
        positions = fields.match_positions(bwd.mapping, target.size, source.size)
        return rendering.warped_png(source.rgb, positions)
    if view == "matches":
        fwd = result.alignments[0]
        query = (
            np.asarray(opts.points, np.float32).reshape(-1, 2)
            if opts.points
            else rendering.lattice_points(*source.size)
        )
        matched, conf = fields.match_points(
            fwd.mapping, fwd.confidence, query, source.size, target.size
        )
        return rendering.matches_png(source.rgb, target.rgb, query, matched, conf)
    out = correspond_outputs(plan, opts, source, target, result)
    if view == "confidence":
        return rendering.confidence_png(out.confidence)
    return rendering.flow_png(out.flow)


def propagate_one(
    mask: Mask,
    source: Decoded,
    target: Decoded,
    result_mapping: F32,
    confidence: F32,
    opts: PropagateOptions,
) -> tuple[bytes, list[int], float, NDArray[Any]]:
    """Carry `mask` onto `target` through align(target, source); PNG, labels, reliable share."""
    positions = fields.match_positions(result_mapping, target.size, source.size)
    conf = fields.dense_confidence(confidence, "pixels", target.size)
    labels = propagate_mask(
        mask.labels,
        positions,
        conf,
        min_confidence=opts.min_confidence,
        keep_if_neighbours_agree=opts.keep_if_neighbours_agree,
    )
    if opts.refine == "colour":
        height, width = result_mapping.shape[-2:]
        radius = correspondence_cell_px(target.rgb.shape[:2], (int(height), int(width)))
        labels = refine_by_colour(source.rgb, mask.labels, target.rgb, labels, radius=radius)
    out = Mask(np.asarray(labels, mask.labels.dtype), mask.palette)
    reliable = reliable_fraction(conf, opts.min_confidence)
    return encode_mask_png(out), [int(v) for v in np.unique(labels)], reliable, out.labels
