"""Jobs and results as bytes for Redis: msgpack maps of plain values and raw arrays.

Nothing here unpickles or executes anything: an array travels as `{dtype, shape, data}` with
the dtype taken from a short allow-list, and every decoded payload is checked for the
fields, types and sizes it must have (`PayloadError` otherwise), so a corrupt or hostile
entry can at worst be rejected.

Images travel as the job holds them: uint8 pixels at the model's input size, as decoded and
resized by the API (`service.imaging.to_model_pixels`), marked `scale: 255` (the graphs take
pixels / 255; the inference engine divides). Float payloads are refused.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

from service.jobs import AlignOutput, InferenceJob, InferenceResult, LandmarkOutput

SCHEMA = 1
_DTYPES: dict[str, np.dtype[Any]] = {
    "|u1": np.dtype(np.uint8),
    "<f2": np.dtype("<f2"),
    "<f4": np.dtype("<f4"),
}
_MAX_NDIM = 4


class PayloadError(ValueError):
    """A payload that is not a well-formed jlad job or result."""


def pack_array(array: NDArray[Any]) -> dict[str, Any]:
    """`array` as a msgpack-able map; little-endian uint8, float16 or float32 only."""
    little = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
    key = little.dtype.str
    if key not in _DTYPES:
        raise TypeError(f"arrays of dtype {array.dtype} are not sent through Redis")
    return {"dtype": key, "shape": list(little.shape), "data": little.tobytes()}


def unpack_array(obj: object, what: str) -> NDArray[Any]:
    """The array `pack_array` packed, as a writable native array; checks every field."""
    if not isinstance(obj, dict):
        raise PayloadError(f"{what}: expected an array map")
    key = obj.get("dtype")
    dtype = _DTYPES.get(key) if isinstance(key, str) else None
    shape = obj.get("shape")
    data = obj.get("data")
    if dtype is None:
        raise PayloadError(f"{what}: dtype {key!r} is not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(n, int) and n >= 0 for n in shape)
    ):
        raise PayloadError(f"{what}: bad shape {shape!r}")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
        raise PayloadError(f"{what}: data does not hold a {dtype} array of shape {shape}")
    array: NDArray[Any] = np.frombuffer(data, dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def pack_images(pixels: NDArray[np.uint8]) -> dict[str, Any]:
    """(N, 3, H, W) uint8 model pixels as a msgpack-able map."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"job images must be uint8 pixels, not {pixels.dtype}")
    return {"scale": 255, **pack_array(pixels)}


def unpack_images(obj: object) -> NDArray[np.uint8]:
    array = unpack_array(obj, "images")
    scale = obj.get("scale") if isinstance(obj, dict) else None
    if array.ndim != 4 or array.shape[1] != 3:
        raise PayloadError(f"images: expected (N, 3, H, W), got {array.shape}")
    if scale != 255 or array.dtype != np.uint8:
        raise PayloadError(
            f"images: expected uint8 pixels at scale 255, got {array.dtype} / {scale!r}"
        )
    pixels: NDArray[np.uint8] = array
    return pixels


def _packb(obj: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _unpackb(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PayloadError(f"{what}: not msgpack ({exc})") from None
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
        raise PayloadError(f"{what}: not a jlad {what} (schema {SCHEMA})")
    return obj


def _index_list(obj: object, what: str, bound: int) -> list[int]:
    if not isinstance(obj, list) or not all(isinstance(i, int) and 0 <= i < bound for i in obj):
        raise PayloadError(f"{what}: expected image indices below {bound}")
    return list(obj)


def encode_job(job: InferenceJob) -> bytes:
    """The model work of `job` (not its deadline or ids, which travel as stream fields)."""
    return _packb(
        {
            "schema": SCHEMA,
            "model": job.model,
            "images": pack_images(job.images),
            "landmarks": list(job.landmarks),
            "pairs": [[s, t] for s, t in job.pairs],
        }
    )


def decode_job(data: bytes, *, deadline: float, request_id: str) -> InferenceJob:
    obj = _unpackb(data, "job")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise PayloadError("job: no model name")
    images = unpack_images(obj.get("images"))
    count = int(images.shape[0])
    landmarks = _index_list(obj.get("landmarks"), "landmarks", count)
    raw_pairs = obj.get("pairs")
    if not isinstance(raw_pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 for p in raw_pairs
    ):
        raise PayloadError("pairs: expected [source, target] index pairs")
    flat = _index_list([i for p in raw_pairs for i in p], "pairs", count)
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    return InferenceJob(model, images, landmarks, pairs, deadline, request_id)


def encode_result(result: InferenceResult) -> bytes:
    return _packb(
        {
            "schema": SCHEMA,
            "landmarks": [
                [pack_array(o.points), pack_array(o.confidence), pack_array(o.heatmaps)]
                for o in result.landmarks
            ],
            "alignments": [
                [pack_array(o.mapping), pack_array(o.log_sigma), pack_array(o.confidence)]
                for o in result.alignments
            ],
            "timings_ms": {k: float(v) for k, v in result.timings_ms.items()},
            "batch_jobs": result.batch_jobs,
            "batch_images": result.batch_images,
        }
    )


def _triples(obj: object, what: str) -> list[list[NDArray[np.float32]]]:
    if not isinstance(obj, list) or not all(isinstance(t, list) and len(t) == 3 for t in obj):
        raise PayloadError(f"{what}: expected lists of three arrays")
    return [
        [unpack_array(a, f"{what}[{i}]").astype(np.float32, copy=False) for a in t]
        for i, t in enumerate(obj)
    ]


def decode_result(data: bytes) -> InferenceResult:
    obj = _unpackb(data, "result")
    timings = obj.get("timings_ms")
    jobs, images = obj.get("batch_jobs"), obj.get("batch_images")
    if not isinstance(timings, dict) or not isinstance(jobs, int) or not isinstance(images, int):
        raise PayloadError("result: timings_ms, batch_jobs and batch_images are required")
    return InferenceResult(
        landmarks=[LandmarkOutput(*t) for t in _triples(obj.get("landmarks"), "landmarks")],
        alignments=[AlignOutput(*t) for t in _triples(obj.get("alignments"), "alignments")],
        timings_ms={str(k): float(v) for k, v in timings.items()},
        batch_jobs=jobs,
        batch_images=images,
    )
