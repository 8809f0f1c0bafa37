"""A battery of bad requests: each gets its problem+json, and the service keeps serving."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service_support import (
    RunningServer,
    assert_problem,
    astronaut,
    chelsea,
    encode,
    png_declaring,
    serve,
    service_settings,
)

MAX_UPLOAD = 2 * 1024 * 1024
MAX_PIXELS = 4_000_000
MAX_POINTS = 16


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RunningServer]:
    settings = service_settings(
        model_dir,
        models=["objects"],
        max_upload_bytes=MAX_UPLOAD,
        max_image_pixels=MAX_PIXELS,
        max_query_points=MAX_POINTS,
        max_targets=4,
    )
    with serve(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


# -- payloads ----------------------------------------------------------------------------

SMALL = np.ascontiguousarray(chelsea()[::4, ::4])  # (75, 113, 3)
SMALL_PNG = encode(SMALL)
NOISE = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)


def corrupt_png() -> bytes:
    data = bytearray(encode(NOISE))
    at = data.index(b"IDAT") + 40
    data[at : at + 64] = bytes(64)
    return bytes(data)


def corrupt_jpeg() -> bytes:
    """A JPEG whose quantisation tables were overwritten: the header no longer parses."""
    data = bytearray(encode(NOISE, "JPEG"))
    at = data.index(b"\xff\xdb")  # DQT marker
    data[at : at + 200] = b"\xff" * 200
    return bytes(data)


def bomb() -> bytes:
    return encode(np.zeros((2500, 2500), np.uint8))  # 6.25 Mpx > limit, a few kB


def image_files(content: bytes, name: str = "image") -> dict[str, tuple[str, bytes]]:
    return {name: ("f.png", content)}


def pair(source: bytes = SMALL_PNG, target: bytes = SMALL_PNG) -> dict[str, tuple[str, bytes]]:
    return {"source": ("s.png", source), "target": ("t.png", target)}


def mask_png(labels: np.ndarray) -> bytes:
    return encode(labels)


@dataclass
class Case:
    send: Callable[[httpx.Client], httpx.Response]
    status: int
    kind: str


B64 = base64.b64encode(SMALL_PNG).decode()

CASES: dict[str, Case] = {
    "corrupt-jpeg": Case(
        lambda c: c.post("/landmarks", files=image_files(corrupt_jpeg())), 422, "corrupt-image"
    ),
    "corrupt-png": Case(
        lambda c: c.post("/landmarks", files=image_files(corrupt_png())), 422, "corrupt-image"
    ),
    "truncated-png": Case(
        lambda c: c.post("/landmarks", files=image_files(encode(NOISE)[:3000])),
        422,
        "corrupt-image",
    ),
    "truncated-jpeg": Case(
        lambda c: c.post("/landmarks", files=image_files(encode(NOISE, "JPEG")[:2000])),
        422,
        "corrupt-image",
    ),
    "zero-bytes": Case(
        lambda c: c.post("/landmarks", files=image_files(b"")), 422, "corrupt-image"
    ),
    "1x1": Case(
        lambda c: c.post("/landmarks", files=image_files(encode(np.zeros((1, 1, 3), np.uint8)))),
        422,
        "image-too-small",
    ),
    "20000x20000-header": Case(
        lambda c: c.post("/landmarks", files=image_files(png_declaring(20000, 20000))),
        413,
        "image-too-large",
    ),
    "decompression-bomb": Case(
        lambda c: c.post("/landmarks", files=image_files(bomb())), 413, "image-too-large"
    ),
    "text-as-image": Case(
        lambda c: c.post("/landmarks", files={"image": ("a.txt", b"just some text\n" * 20)}),
        415,
        "unsupported-image",
    ),
    "wrong-field-name": Case(
        lambda c: c.post("/landmarks", files=image_files(SMALL_PNG, "img")),
        422,
        "validation-error",
    ),
    "missing-target": Case(
        lambda c: c.post("/correspond", files={"source": ("s.png", SMALL_PNG)}),
        422,
        "validation-error",
    ),
    "image-as-text-field": Case(
        lambda c: c.post("/landmarks", data={"image": "not a file"}, files={"x": ("x", b"")}),
        422,
        "validation-error",
    ),
    "duplicate-image": Case(
        lambda c: c.post(
            "/landmarks", files=[("image", ("a.png", SMALL_PNG)), ("image", ("b.png", SMALL_PNG))]
        ),
        422,
        "validation-error",
    ),
    "json-wrong-key": Case(
        lambda c: c.post("/landmarks", json={"picture": B64}), 422, "validation-error"
    ),
    "json-not-json": Case(
        lambda c: c.post(
            "/landmarks", content=b'{"image": "abc', headers={"Content-Type": "application/json"}
        ),
        400,
        "bad-request",
    ),
    "json-bad-base64": Case(
        lambda c: c.post("/landmarks", json={"image": "%%%not-base64%%%"}),
        422,
        "validation-error",
    ),
    "json-wrong-type": Case(
        lambda c: c.post("/landmarks", json={"image": 12345}), 422, "validation-error"
    ),
    "huge-base64": Case(
        lambda c: c.post("/landmarks", json={"image": "A" * (MAX_UPLOAD + 10)}),
        413,
        "upload-too-large",
    ),
    "huge-multipart": Case(
        lambda c: c.post("/landmarks", files=image_files(b"\x89PNG" + bytes(MAX_UPLOAD))),
        413,
        "upload-too-large",
    ),
    "huge-chunked-body": Case(
        lambda c: c.post(
            "/landmarks",
            content=iter([b"x" * (1024 * 1024)] * 3),  # no Content-Length: counted as it streams
            headers={"Content-Type": "application/json"},
        ),
        413,
        "upload-too-large",
    ),
    "unknown-model-query": Case(
        lambda c: c.post("/landmarks", files=image_files(SMALL_PNG), params={"model": "zebra"}),
        404,
        "unknown-model",
    ),
    "unknown-model-json": Case(
        lambda c: c.post("/correspond", json={"source": B64, "target": B64, "model": "zebra"}),
        404,
        "unknown-model",
    ),
    "too-many-points": Case(
        lambda c: c.post(
            "/correspond",
            files=pair(),
            data={"points": json.dumps([[1, 1]] * (MAX_POINTS + 1))},
        ),
        422,
        "too-many-points",
    ),
    "points-out-of-bounds": Case(
        lambda c: c.post("/correspond", files=pair(), data={"points": "[[5, 5], [113, 10]]"}),
        422,
        "points-out-of-bounds",
    ),
    "points-negative": Case(
        lambda c: c.post("/correspond", files=pair(), data={"points": "[[-3, 5]]"}),
        422,
        "points-out-of-bounds",
    ),
    "points-not-pairs": Case(
        lambda c: c.post("/correspond", files=pair(), data={"points": "[[1, 2, 3]]"}),
        422,
        "validation-error",
    ),
    "points-not-json": Case(
        lambda c: c.post("/correspond", files=pair(), data={"points": "1,2;3,4"}),
        422,
        "validation-error",
    ),
    "wrong-accept": Case(
        lambda c: c.post(
            "/landmarks", files=image_files(SMALL_PNG), headers={"Accept": "text/html"}
        ),
        406,
        "not-acceptable",
    ),
    "text-body": Case(
        lambda c: c.post("/landmarks", content=b"hello", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported-media-type",
    ),
    "no-content-type": Case(
        lambda c: c.post("/landmarks", content=SMALL_PNG), 415, "unsupported-media-type"
    ),
    "bad-resolution": Case(
        lambda c: c.post("/correspond", files=pair(), params={"resolution": "huge"}),
        422,
        "validation-error",
    ),
    "bad-dtype-field": Case(
        lambda c: c.post("/correspond", files=pair(), data={"dtype": "int8"}),
        422,
        "validation-error",
    ),
    "bad-view": Case(
        lambda c: c.post("/correspond", files=pair(), params={"view": "hologram"}),
        422,
        "validation-error",
    ),
    "deadline-not-a-number": Case(
        lambda c: c.post(
            "/landmarks", files=image_files(SMALL_PNG), headers={"X-Deadline-Ms": "soon"}
        ),
        422,
        "validation-error",
    ),
    "deadline-too-long": Case(
        lambda c: c.post(
            "/landmarks", files=image_files(SMALL_PNG), headers={"X-Deadline-Ms": "99999999"}
        ),
        422,
        "validation-error",
    ),
    "deadline-1ms": Case(
        lambda c: c.post(
            "/landmarks", files=image_files(encode(astronaut())), headers={"X-Deadline-Ms": "1"}
        ),
        504,
        "deadline-exceeded",
    ),
    "unknown-route": Case(lambda c: c.post("/landmark"), 404, "not-found"),
    "wrong-method": Case(lambda c: c.get("/landmarks"), 405, "method-not-allowed"),
    "broken-multipart": Case(
        lambda c: c.post(
            "/landmarks",
            content=b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc',
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        ),
        422,
        "validation-error",
    ),
    "mask-size-mismatch": Case(
        lambda c: c.post(
            "/propagate",
            files=[
                ("source", ("s.png", SMALL_PNG)),
                ("mask", ("m.png", mask_png(np.zeros((10, 10), np.uint8)))),
                ("targets", ("t.png", SMALL_PNG)),
            ],
        ),
        422,
        "invalid-mask",
    ),
    "colour-mask": Case(
        lambda c: c.post(
            "/propagate",
            files=[
                ("source", ("s.png", SMALL_PNG)),
                ("mask", ("m.png", SMALL_PNG)),
                ("targets", ("t.png", SMALL_PNG)),
            ],
        ),
        422,
        "invalid-mask",
    ),
    "no-targets": Case(
        lambda c: c.post(
            "/propagate",
            files=[
                ("source", ("s.png", SMALL_PNG)),
                ("mask", ("m.png", mask_png(np.zeros((75, 113), np.uint8)))),
            ],
        ),
        422,
        "validation-error",
    ),
    "too-many-targets": Case(
        lambda c: c.post(
            "/propagate",
            json={"source": B64, "mask": B64, "targets": [B64] * 5},
        ),
        422,
        "validation-error",
    ),
    "png-for-two-masks": Case(
        lambda c: c.post(
            "/propagate",
            files=[
                ("source", ("s.png", SMALL_PNG)),
                ("mask", ("m.png", mask_png(np.zeros((75, 113), np.uint8)))),
                ("targets", ("t.png", SMALL_PNG)),
                ("targets", ("u.png", SMALL_PNG)),
            ],
            headers={"Accept": "image/png"},
        ),
        406,
        "not-acceptable",
    ),
    "min-confidence-above-1": Case(
        lambda c: c.post(
            "/propagate", json={"source": B64, "mask": B64, "targets": [B64], "min_confidence": 3}
        ),
        422,
        "validation-error",
    ),
    "unknown-model-path": Case(lambda c: c.get("/models/zebra"), 404, "unknown-model"),
}


def good_request(client: httpx.Client) -> None:
    r = client.post("/landmarks", files=image_files(SMALL_PNG))
    assert r.status_code == 200, r.text
    assert len(r.json()["landmarks"]) > 0


def test_the_battery_is_large_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_its_problem_and_service_still_answers(
    client: httpx.Client, name: str
) -> None:
    case = CASES[name]
    response = case.send(client)
    body = assert_problem(response, case.status, case.kind)
    assert body["request_id"] == response.headers["x-request-id"]
    good_request(client)


def test_no_bad_input_was_counted_as_a_server_error(client: httpx.Client) -> None:
    metrics = client.get("/metrics").text
    server_errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("jlad_requests_total")
        and 'status="5' in line
        # 504 is the expected answer of the 1 ms deadline case; /readyz said 503 at start-up.
        and 'status="504"' not in line
        and 'route="/readyz"' not in line
    ]
    assert server_errors == []


def test_palette_and_16_bit_and_rgba_uploads_are_served(client: httpx.Client) -> None:
    rgba = np.dstack([SMALL, np.full(SMALL.shape[:2], 200, np.uint8)])
    grey16 = SMALL[..., 0].astype(np.uint16) * 257
    palette = io.BytesIO()
    Image.fromarray(SMALL).convert("P").save(palette, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(SMALL).convert("CMYK").save(cmyk, format="JPEG")
    for content in (encode(rgba), encode(grey16), palette.getvalue(), cmyk.getvalue()):
        r = client.post("/landmarks", files=image_files(content))
        assert r.status_code == 200, r.text
        assert r.json()["image_size"] == {"width": 113, "height": 75}


@pytest.mark.parametrize(
    ("source", "target", "named"),
    [
        (SMALL_PNG, b"", "target"),
        (b"", SMALL_PNG, "source"),
        (b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "source"),  # both bad: the source is reported
    ],
)
def test_correspond_names_the_upload_that_failed(
    client: httpx.Client, source: bytes, target: bytes, named: str
) -> None:
    """The two uploads decode concurrently; the problem still names the right one."""
    response = client.post("/correspond", files=pair(source, target))
    body = assert_problem(response, 422, "corrupt-image")
    assert body["detail"].startswith(named), body["detail"]
    good_request(client)
