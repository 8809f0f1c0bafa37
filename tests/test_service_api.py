"""Every endpoint end to end: real uvicorn, real HTTP, the real exported models."""

from __future__ import annotations

import base64
import gc
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.service_support import (
    RunningServer,
    assert_problem,
    astronaut,
    chelsea,
    coffee,
    encode,
    serve,
    service_settings,
)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RunningServer]:
    gc.unfreeze()  # servers started earlier in this process froze theirs: see the next test
    with serve(service_settings(model_dir)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def decode_array(encoded: dict[str, Any]) -> np.ndarray:
    dtype = {"float16": "<f2", "float32": "<f4"}[encoded["dtype"]]
    raw = base64.b64decode(encoded["data"])
    return np.frombuffer(raw, dtype).reshape(encoded["shape"])


def png_array(content: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(content)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def landmarks_of(client: httpx.Client, image: np.ndarray, **params: str) -> dict[str, Any]:
    r = client.post("/landmarks", files={"image": ("i.png", encode(image))}, params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def correspond(
    client: httpx.Client, source: np.ndarray, target: np.ndarray, **data: str
) -> httpx.Response:
    files = {"source": ("s.png", encode(source)), "target": ("t.png", encode(target))}
    return client.post("/correspond", files=files, data=data)


# -- operations --------------------------------------------------------------------------


def test_health_and_readiness_name_the_models_and_provider(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    # a ready service has moved its startup objects out of the collector's way (heap.py)
    assert gc.get_freeze_count() > 10_000
    names = {m["name"] for m in ready["models"]}
    assert {"objects", "faces"} <= names
    assert all(m["provider"] == "CPUExecutionProvider" for m in ready["models"])
    assert ready["dispatcher"]["kind"] == "local"


def test_models_lists_manifests_and_unknown_model_is_404(client: httpx.Client) -> None:
    listing = client.get("/models").json()
    assert listing["default_model"] == "objects"
    by_name = {m["name"]: m for m in listing["models"]}
    assert by_name["objects"]["manifest"]["schema"] == "jlad.manifest/1"
    assert by_name["objects"]["default"] is True
    one = client.get("/models/faces").json()
    assert one["name"] == "faces" and one["num_landmarks"] == one["manifest"]["num_landmarks"]
    assert_problem(client.get("/models/nope"), 404, "unknown-model")


def test_request_id_is_echoed_or_generated(client: httpx.Client) -> None:
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert len(generated.headers["x-request-id"]) == 32
    problem = client.get("/models/nope", headers={"X-Request-ID": "trace-7"})
    assert problem.json()["request_id"] == "trace-7"


def test_metrics_expose_provider_requests_and_batches(client: httpx.Client) -> None:
    landmarks_of(client, chelsea())
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    providers = {s.labels["provider"] for s in families["jlad_execution_provider"].samples}
    assert providers == {"CPUExecutionProvider"}
    assert any(s.labels.get("route") == "/landmarks" for s in families["jlad_requests"].samples)
    assert "jlad_batch_size_jobs" in families
    assert families["jlad_ready"].samples[0].value == 1


# -- /landmarks --------------------------------------------------------------------------


def test_landmarks_json_lie_in_the_image(client: httpx.Client, server: RunningServer) -> None:
    image = chelsea()
    body = landmarks_of(client, image)
    k = server.state.models["objects"].num_landmarks
    assert body["model"] == {"name": "objects", "version": server.state.models["objects"].version}
    assert body["image_size"] == {"width": 451, "height": 300}
    assert [lm["index"] for lm in body["landmarks"]] == list(range(k))
    for lm in body["landmarks"]:
        assert -0.5 <= lm["x"] <= 450.5 and -0.5 <= lm["y"] <= 299.5
        assert 0 <= lm["confidence"] <= 1
    assert body["timings_ms"]["backbone_ms"] > 0 and body["batch"]["jobs"] >= 1


def test_landmarks_from_json_base64_equal_multipart(client: httpx.Client) -> None:
    image = coffee()
    multipart = landmarks_of(client, image, model="faces")
    payload = {"image": base64.b64encode(encode(image)).decode(), "model": "faces"}
    as_json = client.post("/landmarks", json=payload)
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["landmarks"] == multipart["landmarks"]
    assert as_json.json()["model"]["name"] == "faces"


def test_landmarks_follow_a_horizontal_shift(client: httpx.Client) -> None:
    """The same content shifted right by dx pixels moves every landmark left by dx."""
    image, dx, size = astronaut(), 32, 320
    crop_a = np.ascontiguousarray(image[60 : 60 + size, 40 : 40 + size])
    crop_b = np.ascontiguousarray(image[60 : 60 + size, 40 + dx : 40 + dx + size])
    a = landmarks_of(client, crop_a)["landmarks"]
    b = landmarks_of(client, crop_b)["landmarks"]
    moves = np.array([[lb["x"] - la["x"], lb["y"] - la["y"]] for la, lb in zip(a, b, strict=True)])
    # Median over landmarks: one landmark sitting on a weak feature may jump. The bounds fit
    # the committed `objects` model, whose landmarks follow about half of a shift (their
    # heatmaps are broad, and a soft-argmax of a broad map leans towards the centre): the
    # move must point the right way and be at least 40 % of the shift. A model that ignored
    # the shift (as the untrained placeholder did: moves of 0.01 px) fails by far.
    assert -1.3 * dx < np.median(moves[:, 0]) < -0.4 * dx, moves
    assert abs(np.median(moves[:, 1])) < 0.3 * dx, moves


def test_landmarks_png_and_npz(client: httpx.Client) -> None:
    image = chelsea()
    files = {"image": ("c.png", encode(image))}
    drawn = client.post("/landmarks", files=files, headers={"Accept": "image/png"})
    assert drawn.headers["content-type"] == "image/png"
    assert png_array(drawn.content).shape == (300, 451, 3)
    heat = client.post("/landmarks", files=files, params={"view": "heatmaps"})
    assert heat.headers["content-type"] == "image/png"
    assert png_array(heat.content).shape == (300, 451, 3)
    packed = client.post("/landmarks", files=files, headers={"Accept": "application/x-npz"})
    assert packed.headers["content-type"] == "application/x-npz"
    arrays = np.load(io.BytesIO(packed.content))
    k = arrays["points"].shape[0]
    assert arrays["points"].shape == (k, 2) and arrays["confidence"].shape == (k,)
    np.testing.assert_allclose(arrays["heatmaps"].sum(axis=(1, 2)), 1, atol=1e-3)


# -- /correspond -------------------------------------------------------------------------


def test_flow_of_an_image_against_itself_is_near_zero(client: httpx.Client) -> None:
    image = chelsea()
    for resolution in ("grid", "source", "target"):
        r = correspond(client, image, image, resolution=resolution)
        assert r.status_code == 200, r.text
        body = r.json()
        flow = decode_array(body["flow"])
        confidence = decode_array(body["confidence"])
        assert flow.shape[:2] == confidence.shape
        if resolution == "grid":
            assert flow.shape == (32, 32, 2)
        else:
            assert flow.shape == (300, 451, 2)
        # A cell is 451/32 ~ 14 px wide: the median error must be far below one cell (a
        # quarter of one: the committed model's trained W_A residual moves self-matches by
        # ~0.16 cell, 2.3 px, where the untrained soft-argmax gave < 2 px).
        assert np.median(np.linalg.norm(flow, axis=-1)) < 3.5, resolution
        assert body["direction"] == (
            "target->source" if resolution == "target" else "source->target"
        )


def test_correspond_field_shapes_dtypes_and_matches(client: httpx.Client) -> None:
    source, target = astronaut(), chelsea()
    points = [[10.0, 20.0], [255.5, 255.5], [511.0, 0.0], [-0.5, 511.5]]
    r = correspond(
        client, source, target, resolution="target", dtype="float16", points=json.dumps(points)
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source_size"] == {"width": 512, "height": 512}
    assert body["target_size"] == {"width": 451, "height": 300}
    assert body["resolution"] == {"width": 451, "height": 300}
    assert body["flow"]["dtype"] == "float16"
    flow = decode_array(body["flow"])
    assert flow.shape == (300, 451, 2) and np.isfinite(flow).all()
    # Backward field: every target pixel + flow lands on (or near) the source image.
    positions = flow.astype(np.float32) + np.stack(np.meshgrid(np.arange(451), np.arange(300)), -1)
    assert (
        positions.min() >= -1 and positions[..., 0].max() <= 512 and positions[..., 1].max() <= 512
    )
    assert [m["source"] for m in body["matches"]] == points
    for m in body["matches"]:
        assert -1 <= m["target"][0] <= 451 and -1 <= m["target"][1] <= 300
        assert 0 <= m["confidence"] <= 1


def test_correspond_json_body_equals_multipart(client: httpx.Client) -> None:
    source, target = coffee(), chelsea()
    multipart = correspond(client, source, target).json()
    payload = {
        "source": base64.b64encode(encode(source)).decode(),
        "target": base64.b64encode(encode(target)).decode(),
        "resolution": "grid",
    }
    as_json = client.post("/correspond", json=payload).json()
    assert as_json["flow"] == multipart["flow"]
    assert as_json["confidence"] == multipart["confidence"]


def test_correspond_png_views_decode(client: httpx.Client) -> None:
    source, target = astronaut(), chelsea()
    expected = {
        "flow": (512, 512, 3),
        "confidence": (512, 512, 3),
        "warped": (300, 451, 3),
        "matches": (512, 512 + 8 + 451, 3),
        "landmarks": (512, 512 + 8 + 451, 3),
    }
    for view, shape in expected.items():
        r = correspond(client, source, target, view=view)
        assert r.status_code == 200, (view, r.text)
        assert r.headers["content-type"] == "image/png"
        assert png_array(r.content).shape == shape, view
    grid_png = client.post(
        "/correspond",
        files={"source": ("s.png", encode(source)), "target": ("t.png", encode(target))},
        params={"resolution": "grid"},
        headers={"Accept": "image/png"},
    )
    assert png_array(grid_png.content).shape == (32, 32, 3)


def test_correspond_npz_holds_the_same_field(client: httpx.Client) -> None:
    source, target = chelsea(), coffee()
    as_json = correspond(client, source, target, resolution="source").json()
    files = {"source": ("s.png", encode(source)), "target": ("t.png", encode(target))}
    packed = client.post(
        "/correspond",
        files=files,
        data={"resolution": "source"},
        headers={"Accept": "application/x-npz"},
    )
    arrays = np.load(io.BytesIO(packed.content))
    np.testing.assert_array_equal(arrays["flow"], decode_array(as_json["flow"]))
    np.testing.assert_array_equal(arrays["confidence"], decode_array(as_json["confidence"]))
    assert str(arrays["direction"]) == "source->target"


# -- /propagate --------------------------------------------------------------------------


def labelled_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, width // 4 : width // 2] = 3
    mask[height // 2 :, width // 2 :] = 7
    return mask


def test_propagate_onto_the_same_image_keeps_the_mask(client: httpx.Client) -> None:
    image = chelsea()
    mask = labelled_mask(300, 451)
    palette_mask = Image.fromarray(mask).convert("P")
    palette_mask.putpalette([v for i in range(256) for v in (i * 30 % 256, i * 70 % 256, i)])
    buffer = io.BytesIO()
    palette_mask.save(buffer, format="PNG")
    files = [
        ("source", ("s.png", encode(image))),
        ("mask", ("m.png", buffer.getvalue())),
        ("targets", ("t0.png", encode(image))),
        ("targets", ("t1.png", encode(coffee()))),
    ]
    r = client.post("/propagate", files=files, data={"min_confidence": "0"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["index"] for m in body["masks"]] == [0, 1]
    assert body["masks"][1]["size"] == {"width": 600, "height": 400}
    with Image.open(io.BytesIO(base64.b64decode(body["masks"][0]["mask"]))) as out:
        assert out.mode == "P"  # the palette came back
        labels = np.asarray(out)
    assert set(np.unique(labels)) <= {0, 3, 7}
    agreement = (labels == mask).mean()
    assert agreement > 0.9, agreement
    assert set(body["masks"][1]["labels"]) <= {0, 3, 7}


def test_propagate_npz_and_single_png(client: httpx.Client) -> None:
    image = coffee()
    mask = labelled_mask(400, 600).astype(np.uint16) * 1000  # 16-bit labels
    files = [
        ("source", ("s.png", encode(image))),
        ("mask", ("m.png", encode(mask))),
        ("targets", ("t.png", encode(image))),
    ]
    packed = client.post("/propagate", files=files, headers={"Accept": "application/x-npz"})
    assert packed.status_code == 200, packed.text
    arrays = np.load(io.BytesIO(packed.content))
    assert arrays["mask_0"].dtype == np.uint16
    assert set(np.unique(arrays["mask_0"])) <= {0, 3000, 7000}
    assert arrays["reliable_fraction"].shape == (1,)
    single = client.post("/propagate", files=files, headers={"Accept": "image/png"})
    assert single.headers["content-type"] == "image/png"
    assert np.array_equal(png_array(single.content), arrays["mask_0"])


def test_propagate_colour_refinement_keeps_labels_and_rejects_unknown_modes(
    client: httpx.Client,
) -> None:
    image = chelsea()
    mask = labelled_mask(300, 451).astype(np.uint16) * 1000
    files = [
        ("source", ("s.png", encode(image))),
        ("mask", ("m.png", encode(mask))),
        ("targets", ("t.png", encode(image))),
    ]
    npz = {"Accept": "application/x-npz"}
    plain = client.post("/propagate", files=files, data={"min_confidence": "0"}, headers=npz)
    refined = client.post(
        "/propagate", files=files, data={"min_confidence": "0", "refine": "colour"}, headers=npz
    )
    assert refined.status_code == 200, refined.text
    before, after = (np.load(io.BytesIO(r.content))["mask_0"] for r in (plain, refined))
    assert after.dtype == np.uint16 and set(np.unique(after)) <= {0, 3000, 7000}
    assert not np.array_equal(before, after)  # boxes are not the cat's colours: pixels move
    bad = client.post("/propagate", files=files, data={"refine": "magic"})
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"


# -- deployment knobs: keys, root path, proxies ------------------------------------------


@pytest.fixture(scope="module")
def guarded(model_dir: Path) -> Iterator[RunningServer]:
    settings = service_settings(
        model_dir,
        models=["faces"],
        default_model="faces",
        api_keys=["s3cret", "other"],
        root_path="/jlad",
        trusted_proxies=["127.0.0.1"],
    )
    with serve(settings) as running:
        yield running


def test_api_keys_guard_inference_but_not_probes(guarded: RunningServer) -> None:
    image = {"image": ("c.png", encode(chelsea()))}
    with guarded.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200
        missing = assert_problem(client.post("/landmarks", files=image), 401, "unauthorized")
        assert "X-API-Key" in missing["detail"]
        wrong = client.post("/landmarks", files=image, headers={"X-API-Key": "nope"})
        assert_problem(wrong, 401, "unauthorized")
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        ok = client.post("/landmarks", files=image, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 200
        bearer = client.post("/landmarks", files=image, headers={"Authorization": "Bearer other"})
        assert bearer.status_code == 200
        assert client.get("/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert_problem(client.get("/models"), 401, "unauthorized")


def test_root_path_serves_behind_a_prefix(guarded: RunningServer) -> None:
    with guarded.client() as client:
        # A proxy that strips the prefix, and one that does not: both reach the routes.
        assert client.get("/healthz").status_code == 200
        assert client.get("/jlad/healthz").status_code == 200
        spec = client.get("/jlad/openapi.json").json()
        assert spec["servers"][0]["url"] == "/jlad"


def test_forwarded_headers_only_from_trusted_proxies(
    guarded: RunningServer, client: httpx.Client
) -> None:
    """The trailing-slash redirect is built from the scheme uvicorn believes."""
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    with guarded.client(follow_redirects=False) as trusting:
        trusted = trusting.get("/models/", headers=headers)
    assert trusted.status_code == 307
    assert trusted.headers["location"].startswith("https://")
    # The main test server trusts no proxy (JLAD_TRUSTED_PROXIES empty).
    untrusted = client.get("/models/", headers=headers, follow_redirects=False)
    assert untrusted.status_code == 307
    assert untrusted.headers["location"].startswith("http://")
