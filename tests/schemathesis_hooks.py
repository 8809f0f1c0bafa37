"""schemathesis hooks of tests/test_openapi_contract.py (SCHEMATHESIS_HOOKS=<this module>).

Everything about a request that JSON Schema can state is generated from the service's own
OpenAPI document. What it cannot state is the content of the images: a file part (or a
base64 string) is an image the service decodes, at least JLAD_MIN_IMAGE_SIDE pixels on a
side; a mask has its source's size; query points lie on the source image. In positive
(schema-valid) cases these hooks put real content there, so that such a case is a request
the service must answer 2xx, and the positive-data check holds the document to that:

- every image becomes a real PNG of random size (8..48 px a side) and noise;
- /propagate's mask becomes a label PNG of the source's size;
- /correspond's points are wrapped onto the source image (their count is kept; in a
  multipart body they stay JSON text);
- a positive X-Deadline-Ms is at least 60 s: a shorter budget than the work takes is
  answered 504 by design (tests/test_service_bad_inputs.py checks that), not a fault.

Negative cases are sent as generated. Nothing else is changed.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from typing import Any

import numpy as np
import schemathesis
from PIL import Image
from schemathesis.transport.serialization import Binary

MIN_SIDE, MAX_SIDE = 8, 48
MIN_DEADLINE_MS = 60_000
_rng = random.Random(17)


def _png(array: np.ndarray[Any, Any]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(size: tuple[int, int] | None = None) -> tuple[bytes, tuple[int, int]]:
    """A PNG of random noise, `size` = (width, height) or random; and its size."""
    width, height = size or (_rng.randint(MIN_SIDE, MAX_SIDE), _rng.randint(MIN_SIDE, MAX_SIDE))
    pixels = np.random.default_rng(_rng.getrandbits(32)).integers(
        0, 256, (height, width, 3), dtype=np.uint8
    )
    return _png(pixels), (width, height)


def _mask(size: tuple[int, int]) -> bytes:
    width, height = size
    labels = np.random.default_rng(_rng.getrandbits(32)).integers(
        0, 3, (height, width), dtype=np.uint8
    )
    return _png(labels)


def _wrap(value: Any, extent: int) -> float:
    """`value` wrapped onto [-0.5, extent - 0.5]."""
    try:
        number = abs(float(value))
    except OverflowError:  # a JSON integer beyond float range
        number = 0.0
    return math.fmod(number, extent) - 0.5 if math.isfinite(number) else 0.0


def _on_image(points: Any, size: tuple[int, int]) -> Any:
    """Each generated [x, y] wrapped onto a width x height image; JSON text stays text."""
    if isinstance(points, str):
        return json.dumps(_on_image(json.loads(points), size))
    width, height = size
    return [[_wrap(x, width), _wrap(y, height)] for x, y in points]


def _fill(body: dict[str, Any], encode: Any) -> None:
    """Real content into the image fields of a body (`encode`: bytes -> the field value)."""
    source_size: tuple[int, int] | None = None
    for name in ("image", "source", "target"):
        if name in body:
            data, size = _image()
            body[name] = encode(data)
            if name == "source":
                source_size = size
    if "targets" in body and isinstance(body["targets"], list):
        body["targets"] = [encode(_image()[0]) for _ in body["targets"]]
    if "mask" in body:
        if source_size is None:
            data, source_size = _image()
        body["mask"] = encode(_mask(source_size))
    if isinstance(body.get("points"), list | str) and source_size is not None:
        body["points"] = _on_image(body["points"], source_size)


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    deadline = next((k for k in case.headers or {} if k.lower() == "x-deadline-ms"), None)
    if deadline is not None and str(case.headers[deadline]).isdigit():
        case.headers[deadline] = str(max(int(case.headers[deadline]), MIN_DEADLINE_MS))
    if case.method.upper() != "POST" or not isinstance(case.body, dict):
        return case
    if case.media_type == "multipart/form-data":
        _fill(case.body, Binary)
    elif case.media_type == "application/json":
        _fill(case.body, lambda data: base64.b64encode(data).decode())
    return case
