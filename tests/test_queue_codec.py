"""What goes through Redis: msgpack + raw array bytes, exact round trips, nothing unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from service.imaging import to_model_pixels
from service.jobs import AlignOutput, InferenceJob, InferenceResult, LandmarkOutput
from service.redis_codec import (
    PayloadError,
    decode_job,
    decode_result,
    encode_job,
    encode_result,
    pack_array,
    unpack_array,
)
from service.redis_support import redacted_url
from tests.service_support import astronaut, chelsea


def test_model_pixels_travel_as_uint8_and_come_back_bit_for_bit() -> None:
    pixels = np.stack([to_model_pixels(chelsea(), 64, 48), to_model_pixels(astronaut(), 64, 48)])
    job = InferenceJob("faces", pixels, landmarks=[1], pairs=[(0, 1), (1, 0)], request_id="r")
    data = encode_job(job)
    # the pixels plus a little framing
    assert len(data) < pixels.nbytes + 300
    back = decode_job(data, deadline=123.5, request_id="r")
    assert back.images.dtype == np.uint8 and back.images.flags.writeable
    assert np.array_equal(back.images, pixels)
    assert (back.model, back.landmarks, back.pairs) == ("faces", [1], [(0, 1), (1, 0)])
    assert (back.deadline, back.request_id) == (123.5, "r")
    # the wire format of schema 1 that earlier APIs wrote for such images: uint8 at scale 255
    assert msgpack.unpackb(data)["images"]["scale"] == 255


def test_float_images_are_refused_on_both_sides() -> None:
    floats = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    with pytest.raises(TypeError, match="uint8"):
        encode_job(InferenceJob("objects", floats, landmarks=[0]))  # type: ignore[arg-type]
    good = msgpack.unpackb(encode_job(InferenceJob("m", np.zeros((1, 3, 8, 8), np.uint8))))
    as_float = {"scale": 1, "dtype": "<f4", "shape": [1, 3, 8, 8], "data": floats.tobytes()}
    with pytest.raises(PayloadError, match="uint8 pixels"):
        decode_job(msgpack.packb({**good, "images": as_float}), deadline=1.0, request_id="")


def test_results_round_trip_exactly() -> None:
    rng = np.random.default_rng(1)

    def f32(*shape: int) -> np.ndarray[Any, Any]:
        return rng.random(shape, dtype=np.float32)

    result = InferenceResult(
        landmarks=[LandmarkOutput(f32(10, 2), f32(10), f32(10, 4, 4))],
        alignments=[AlignOutput(f32(2, 4, 4), f32(4, 4), f32(4, 4)) for _ in range(2)],
        timings_ms={"backbone_ms": 1.5, "heads_ms": 0.25},
        batch_jobs=3,
        batch_images=5,
    )
    back = decode_result(encode_result(result))
    assert (back.batch_jobs, back.batch_images, back.timings_ms) == (3, 5, result.timings_ms)
    for got, want in zip(
        back.landmarks + back.alignments, result.landmarks + result.alignments, strict=True
    ):
        for name in got.__dataclass_fields__:
            assert np.array_equal(getattr(got, name), getattr(want, name)), name


class _WritesAFile:
    """Unpickling this would create a file: proof that nothing is unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickles_and_malformed_payloads_are_rejected_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = pickle.dumps(_WritesAFile(str(marker)))
    good = msgpack.unpackb(encode_job(InferenceJob("m", np.zeros((1, 3, 2, 2), np.uint8))))

    def with_images(**changes: Any) -> bytes:
        packed: bytes = msgpack.packb({**good, "images": {**good["images"], **changes}})
        return packed

    bad_payloads = {
        "pickle": hostile,
        "not a map": msgpack.packb([1, 2, 3]),
        "other schema": msgpack.packb({**good, "schema": 99}),
        "object dtype": with_images(dtype="|O"),
        "float64": with_images(dtype="<f8"),
        "size mismatch": with_images(shape=[1, 3, 2, 3]),
        "negative dim": with_images(shape=[-1, 3, 2, 2]),
        "scale mismatch": with_images(scale=1),
        "landmark index out of range": msgpack.packb({**good, "landmarks": [1]}),
        "bad pair": msgpack.packb({**good, "pairs": [[0]]}),
        "no model": msgpack.packb({**good, "model": ""}),
    }
    for name, payload in bad_payloads.items():
        with pytest.raises(PayloadError):
            decode_job(payload, deadline=1.0, request_id=name)
    with pytest.raises(PayloadError):
        decode_result(hostile)
    assert not marker.exists() and not os.listdir(tmp_path)


def test_only_uint8_float16_float32_arrays_are_sent() -> None:
    with pytest.raises(TypeError):
        pack_array(np.zeros(3, np.float64))
    half = np.arange(6, dtype=np.float16).reshape(2, 3)
    assert np.array_equal(unpack_array(pack_array(half), "half"), half)
    big_endian = np.arange(4, dtype=">f4")
    assert np.array_equal(unpack_array(pack_array(big_endian), "be"), big_endian)


def test_passwords_never_reach_logs_or_readyz() -> None:
    assert (
        redacted_url("rediss://:s3cret@redis.example:6380/0")
        == "rediss://:***@redis.example:6380/0"
    )
    assert redacted_url("redis://user:pw@h/1") == "redis://user:***@h/1"
    assert redacted_url("redis://h:6379/0") == "redis://h:6379/0"
