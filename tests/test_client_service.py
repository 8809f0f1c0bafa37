"""The client, the sequence helper and the `jlad` CLI against a real running service.

One `python -m service` process per module (real uvicorn, real ONNX Runtime on the exported
models of the `model_dir` fixture), on a free port, with an API key and a one-job queue so
that concurrent requests really get 429. Known answers come from synthetic shifts of a
scikit-image sample picture and of a labelled mask drawn on it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from jlad_client import (
    NO_RETRY,
    AsyncJladClient,
    JladClient,
    ProblemError,
    RetryPolicy,
    TransportError,
)
from jlad_client.images import read_mask
from jlad_client.masks import correspondence_cell_px, mask_iou, refine_by_colour
from jlad_client.sequence import FrameMask, propagate_sequence
from numpy.typing import NDArray
from PIL import Image

from tests.service_support import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "client-test-key"


@dataclass(frozen=True)
class Service:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def service(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    port = free_port()
    log = tmp_path_factory.mktemp("service") / "service.log"
    env = {
        **os.environ,
        "JLAD_PORT": str(port),
        "JLAD_MODEL_DIR": str(model_dir),
        "JLAD_API_KEYS": API_KEY,
        # One waiting job at most, and a long batching window: concurrent clients get 429.
        "JLAD_MAX_QUEUE": "1",
        "JLAD_MAX_WAIT_MS": "50",
        "JLAD_PROVIDERS": "cpu",
        "JLAD_INTRA_OP_THREADS": "2",
        "OMP_NUM_THREADS": "2",
        "JLAD_SHUTDOWN_GRACE_S": "2",
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with JladClient(url, API_KEY) as client:
            try:
                client.wait_until_ready(timeout_s=120)
            except TransportError:
                process.kill()
                pytest.fail(f"service did not become ready:\n{log.read_text()[-3000:]}")
        yield Service(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def client(service: Service) -> Iterator[JladClient]:
    with JladClient(service.url, API_KEY, retry=RetryPolicy(max_retries=8)) as jlad:
        yield jlad


# -- synthetic known answers ---------------------------------------------------------------

SHIFT = 12  # pixels to the right
# IoU a 12-pixel shift of the test picture must be carried with (the unwarped mask scores
# far lower; each test also checks it beats that baseline where it matters).
SHIFT_IOU_FLOOR = 0.85


def _picture() -> NDArray[np.uint8]:
    """A 192x256 RGB photograph (scikit-image's astronaut, downsampled)."""
    return np.ascontiguousarray(skimage.data.astronaut()[::2, ::2][:192])


def _mask() -> NDArray[np.uint8]:
    """Two labels on the picture: 1 (a big box) with 2 (a smaller box) inside it."""
    mask = np.zeros((192, 256), np.uint8)
    mask[30:170, 70:190] = 1
    mask[50:100, 100:160] = 2
    return mask


def _shift_right(array: NDArray[np.generic], shift: int, edge: bool) -> NDArray[np.generic]:
    """`array` moved `shift` pixels to the right (same size; the left strip is padded)."""
    pad = [(0, 0), (shift, 0)] + [(0, 0)] * (array.ndim - 2)
    padded = np.pad(array, pad, mode="edge") if edge else np.pad(array, pad)
    return np.ascontiguousarray(padded[:, : array.shape[1]])


def _png(array: NDArray[np.uint8]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# -- endpoints -----------------------------------------------------------------------------


def test_models_health_and_ready(client: JladClient) -> None:
    models = client.models()
    names = {m.name for m in models}
    assert "objects" in names
    default = [m for m in models if m.is_default]
    assert len(default) == 1 and default[0].name == "objects"
    objects = next(m for m in models if m.name == "objects")
    assert objects.input_size is not None and objects.num_landmarks
    assert objects.manifest["schema"] == "jlad.manifest/1"
    assert client.health() == {"status": "ok"}
    ready = client.ready()
    assert ready.ready and ready.status_code == 200
    assert ready.body["status"] == "ready"


def test_missing_or_wrong_api_key_raises_unauthorized(service: Service) -> None:
    for key in ("", "wrong"):
        with JladClient(service.url, key) as anonymous, pytest.raises(ProblemError) as caught:
            anonymous.landmarks(_picture())
        assert caught.value.status == 401
        assert caught.value.type == "https://jlad.dev/problems/unauthorized"
        assert caught.value.title and caught.value.detail


def test_landmarks_round_trip(client: JladClient) -> None:
    picture = _picture()
    result = client.landmarks(picture)
    k = next(m.num_landmarks for m in client.models() if m.name == result.model.name)
    assert result.points.shape == (k, 2) and result.confidence.shape == (k,)
    assert (result.image_size.width, result.image_size.height) == (256, 192)
    assert [lm.index for lm in result.landmarks] == list(range(k))
    assert (result.points[:, 0] >= -0.5).all() and (result.points[:, 0] <= 255.5).all()
    assert (result.points[:, 1] >= -0.5).all() and (result.points[:, 1] <= 191.5).all()
    assert ((result.confidence >= 0) & (result.confidence <= 1)).all()
    png = client.landmarks_png(picture)
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_correspond_round_trip_at_every_resolution(client: JladClient) -> None:
    picture = _picture()
    target = _shift_right(picture, SHIFT, edge=True)
    grid = client.correspond(picture, target, points=[[128, 96], [100, 60]])
    assert grid.direction == "source->target" and grid.flow.ndim == 3
    assert grid.flow.shape[:2] == grid.confidence.shape
    assert (grid.resolution.height, grid.resolution.width) == grid.flow.shape[:2]
    assert len(grid.matches) == 2 and grid.matches[0].source == (128.0, 96.0)
    source_res = client.correspond(picture, target, resolution="source", dtype="float16")
    assert source_res.flow.shape == (192, 256, 2) and source_res.flow.dtype == np.float32
    backward = client.correspond(picture, target, resolution="target")
    assert backward.direction == "target->source" and backward.flow.shape == (192, 256, 2)
    # The target is the source moved right: every target pixel comes from SHIFT px left.
    inner = backward.flow[40:150, 60:200]
    assert abs(float(np.median(inner[..., 0])) + SHIFT) < 3.0
    assert abs(float(np.median(inner[..., 1]))) < 3.0
    # The same field as a lossless .npz.
    binary = client.correspond(picture, target, resolution="target", binary=True)
    np.testing.assert_allclose(binary.flow, backward.flow, atol=1e-4)
    np.testing.assert_allclose(binary.confidence, backward.confidence, atol=1e-5)
    png = client.correspond_png(picture, target, view="warped")
    assert Image.open(io.BytesIO(png)).size[0] >= 256


def test_service_errors_come_back_as_problems(client: JladClient) -> None:
    with pytest.raises(ProblemError) as caught:
        client.landmarks(_picture(), model="no-such-model")
    assert caught.value.status == 404 and caught.value.kind == "unknown-model"
    with pytest.raises(ProblemError) as caught:
        client.landmarks(b"\x89PNG\r\n\x1a\n not really a png")
    assert caught.value.status in (415, 422)
    assert caught.value.type.startswith("https://jlad.dev/problems/")
    with pytest.raises(ProblemError) as caught:
        client.propagate(_picture(), _mask()[:100], [_picture()])
    assert caught.value.kind == "invalid-mask"


def test_propagation_of_a_shifted_mask_has_the_known_answer(client: JladClient) -> None:
    picture, mask = _picture(), _mask()
    target = _shift_right(picture, SHIFT, edge=True)
    expected = _shift_right(mask, SHIFT, edge=False)
    result = client.propagate(picture, mask, [target, picture], min_confidence=0.0)
    shifted, same = result.masks
    assert shifted.shape == (192, 256) and shifted.dtype == np.uint8
    assert set(np.unique(shifted)) == {0, 1, 2}  # labels kept, never blended
    iou = mask_iou(shifted, expected)
    baseline = mask_iou(mask, expected)
    assert iou > SHIFT_IOU_FLOOR, f"IoU {iou:.3f}"
    assert iou > baseline + 0.05, f"IoU {iou:.3f} vs unwarped {baseline:.3f}"
    inner_label_iou = mask_iou(shifted == 2, expected == 2)
    assert inner_label_iou > 0.75
    # The source itself as a target gives the mask back (flow of a pair with itself ~ 0).
    assert (same == mask).mean() > 0.98
    assert result.reliable_fraction == [1.0, 1.0]  # threshold 0: every match counts


def test_unreliable_pixels_become_background(client: JladClient) -> None:
    picture, mask = _picture(), _mask()
    strict = client.propagate(
        picture, mask, [picture], min_confidence=1.0, keep_if_neighbours_agree=False
    )
    assert strict.reliable_fraction[0] < 0.01
    assert np.count_nonzero(strict.masks[0]) <= 0.01 * mask.size
    # The default rule keeps unreliable pixels deep inside a region, drops those at edges.
    default = client.propagate(picture, mask, [picture], min_confidence=1.0)
    kept = np.count_nonzero(default.masks[0])
    assert 0.5 * np.count_nonzero(mask) < kept < np.count_nonzero(mask)


def test_async_client_round_trip(service: Service) -> None:
    picture, mask = _picture(), _mask()
    target = _shift_right(picture, SHIFT, edge=True)

    async def run() -> tuple[float, int, float]:
        async with AsyncJladClient(service.url, API_KEY, retry=RetryPolicy(8)) as jlad:
            prop, corr, lm = await asyncio.gather(
                jlad.propagate(picture, mask, [target], min_confidence=0.0),
                jlad.correspond(picture, target, resolution="target"),
                jlad.landmarks(picture),
            )
        expected = _shift_right(mask, SHIFT, edge=False)
        flow_x = float(np.median(corr.flow[40:150, 60:200, 0]))
        return mask_iou(prop.masks[0], expected), len(lm.landmarks), flow_x

    iou, landmarks, flow_x = asyncio.run(run())
    assert iou > SHIFT_IOU_FLOOR and landmarks > 0 and abs(flow_x + SHIFT) < 3.0


def test_concurrent_requests_get_429_and_retries_absorb_it(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    picture = _picture()
    target = _shift_right(picture, SHIFT, edge=True)

    async def burst(policy: RetryPolicy) -> list[object]:
        async with AsyncJladClient(service.url, API_KEY, retry=policy) as jlad:
            calls = [jlad.correspond(picture, target) for _ in range(5)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    without = asyncio.run(burst(NO_RETRY))
    rejected = [r for r in without if isinstance(r, ProblemError)]
    assert rejected, "a one-job queue should turn some of 5 concurrent requests away"
    assert all(r.status == 429 and r.kind == "queue-full" for r in rejected)
    assert all(r.retry_after is not None and r.retry_after >= 1 for r in rejected)

    with caplog.at_level(logging.INFO, logger="jlad_client"):
        retried = asyncio.run(burst(RetryPolicy(max_retries=10, max_backoff_s=2)))
    assert all(not isinstance(r, BaseException) for r in retried), retried
    assert any("answered 429" in rec.getMessage() for rec in caplog.records)


# -- sequences -----------------------------------------------------------------------------


def _frames(count: int) -> list[NDArray[np.uint8]]:
    """Frame i is the picture moved i * SHIFT / 2 pixels right."""
    return [_shift_right(_picture(), i * SHIFT // 2, edge=True) for i in range(count)]


def _sequence_from_first_frame(
    client: JladClient,
    frames: list[NDArray[np.uint8]],
    mask: NDArray[np.uint8],
    mode: str,
    **options: object,
) -> dict[int, FrameMask]:
    """`propagate_sequence` from frames[0] (annotated with `mask`), trusting every match."""
    items = propagate_sequence(
        client,
        frames[0],
        mask,
        frames,
        mode=mode,  # type: ignore[arg-type]
        anchor_index=0,
        min_confidence=0.0,
        **options,  # type: ignore[arg-type]
    )
    return {r.index: r for r in items}


@pytest.mark.parametrize("mode", ["anchor", "chain"])
def test_sequence_propagation(client: JladClient, mode: str) -> None:
    frames, mask = _frames(3), _mask()
    by_index = _sequence_from_first_frame(client, frames, mask, mode, batch_size=2)
    assert sorted(by_index) == [0, 1, 2]
    assert by_index[0].origin == "annotated"
    np.testing.assert_array_equal(by_index[0].mask, mask)
    expected_origin = "anchor" if mode == "anchor" else "previous"
    assert by_index[2].origin == expected_origin
    for i in (1, 2):
        expected = _shift_right(mask, i * SHIFT // 2, edge=False)
        assert mask_iou(by_index[i].mask, expected) > SHIFT_IOU_FLOOR
        assert set(np.unique(by_index[i].mask)) == {0, 1, 2}


@pytest.mark.parametrize("mode", ["anchor", "chain"])
def test_colour_refinement_is_the_client_function_on_the_plain_masks(
    client: JladClient, mode: str
) -> None:
    """`refine="colour"` (the service's for anchor mode, the client's for chain mode) gives
    exactly `refine_by_colour` of the plain mask, with the band one grid cell wide."""
    frames, mask = _frames(2), _mask()
    plain, refined = (
        {
            i: r.mask
            for i, r in _sequence_from_first_frame(client, frames, mask, mode, refine=how).items()
        }
        for how in ("none", "colour")
    )
    info = next(m for m in client.models() if m.is_default)
    assert info.grid_size is not None
    radius = correspondence_cell_px((192, 256), (info.grid_size.height, info.grid_size.width))
    expected = refine_by_colour(frames[0], mask, frames[1], plain[1], radius=radius)
    np.testing.assert_array_equal(refined[1], expected)
    assert not np.array_equal(refined[1], plain[1])  # the astronaut's colours move some pixels
    assert set(np.unique(refined[1])) <= {0, 1, 2}


def test_chain_falls_back_to_the_annotated_frame_when_unreliable(client: JladClient) -> None:
    frames, mask = _frames(3), _mask()
    # Agreement can never reach 1.01, so every chained step falls back to the direct warp.
    results = list(
        propagate_sequence(
            client,
            frames[0],
            mask,
            frames[1:],
            mode="chain",
            fallback_reliability=1.01,
            min_confidence=0.0,
        )
    )
    assert [r.index for r in results] == [0, 1]
    assert results[0].origin == "anchor" and not results[0].fell_back
    assert results[1].fell_back
    expected = _shift_right(mask, SHIFT, edge=False)
    assert mask_iou(results[1].mask, expected) > SHIFT_IOU_FLOOR


# -- the CLI -------------------------------------------------------------------------------


def _jlad(service: Service, *args: str, key: str = API_KEY) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JLAD_URL": service.url, "JLAD_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "jlad_client.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_propagate_end_to_end(service: Service, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = _frames(3)
    for i, frame in enumerate(frames):
        (folder / f"frame{i}.png").write_bytes(_png(frame))
    (tmp_path / "mask0.png").write_bytes(_png(_mask()))
    out = tmp_path / "out"
    done = _jlad(
        service,
        "propagate",
        "--mask",
        str(tmp_path / "mask0.png"),
        str(folder / "frame0.png"),
        str(folder),
        "--out",
        str(out),
        "--min-confidence",
        "0",
    )
    assert done.returncode == 0, done.stderr
    assert "propagated labels [0, 1, 2] to 3 frame(s)" in done.stdout
    assert "propagate (anchor)" in done.stderr  # the tqdm bar
    for i in range(3):
        mask = read_mask(out / "masks" / f"frame{i}.png")
        expected = _shift_right(_mask(), i * SHIFT // 2, edge=False)
        assert mask_iou(mask, expected) > SHIFT_IOU_FLOOR
        overlay = np.asarray(Image.open(out / "overlays" / f"frame{i}.png"))
        assert overlay.shape == (192, 256, 3)
        assert not np.array_equal(overlay, frames[i])  # the labels are drawn
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["frames"] == 3 and summary["summary"]["from_anchor"] == 2
    assert [f["origin"] for f in summary["frames"]] == ["annotated", "anchor", "anchor"]

    chain_out = tmp_path / "chain"
    done = _jlad(
        service,
        "propagate",
        "--mode",
        "chain",
        "--mask",
        str(tmp_path / "mask0.png"),
        str(folder / "frame0.png"),
        str(folder),
        "--out",
        str(chain_out),
        "--no-overlays",
        "--min-confidence",
        "0",
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (chain_out / "masks").iterdir()) == [
        "frame0.png",
        "frame1.png",
        "frame2.png",
    ]
    assert not (chain_out / "overlays").exists()


def test_cli_other_commands(service: Service, tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png(_picture()))
    b.write_bytes(_png(_shift_right(_picture(), SHIFT, edge=True)))

    models = _jlad(service, "models")
    assert models.returncode == 0 and "objects*" in models.stdout

    landmarks = _jlad(service, "landmarks", str(a), "--out", str(tmp_path / "lm"))
    assert landmarks.returncode == 0, landmarks.stderr
    assert (tmp_path / "lm" / "a_landmarks.png").exists()
    record = json.loads((tmp_path / "lm" / "a_landmarks.json").read_text())
    assert record["image_size"] == {"width": 256, "height": 192}

    corr = _jlad(
        service,
        "correspond",
        str(a),
        str(b),
        "--points",
        "128,96",
        "--out",
        str(tmp_path / "ab"),
        "--json",
    )
    assert corr.returncode == 0, corr.stderr
    summary = json.loads(corr.stdout)
    assert summary["direction"] == "target->source" and len(summary["matches"]) == 1
    for name in ("flow.flo", "flow.png", "confidence.png", "warped.png", "matches.png"):
        assert (tmp_path / "ab" / name).stat().st_size > 0

    health = _jlad(service, "health")
    assert health.returncode == 0 and "ready: True" in health.stdout


def test_cli_reports_errors_with_exit_codes(service: Service, tmp_path: Path) -> None:
    a = tmp_path / "a.png"
    a.write_bytes(_png(_picture()))
    denied = _jlad(service, "landmarks", str(a), key="wrong")
    assert denied.returncode == 1
    assert "401" in denied.stderr and "https://jlad.dev/problems/unauthorized" in denied.stderr
    unreachable = subprocess.run(
        [
            sys.executable,
            "-m",
            "jlad_client.cli",
            "models",
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "--retries",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 3
    missing = _jlad(
        service,
        "propagate",
        "--mask",
        str(a),
        str(a),
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "o"),
    )
    assert missing.returncode == 2 and "nope" in missing.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "jlad_client.cli", "propagate", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0 and "examples:" in helped.stdout


def test_tss_mask_iou_bench_on_a_synthetic_pair(service: Service, tmp_path: Path) -> None:
    """bench/tss_mask_iou.py on a TSS-shaped folder whose answer is known (a shift)."""
    pair = tmp_path / "tss" / "SYN" / "pair_01"
    pair.mkdir(parents=True)
    binary = (_mask() != 0).astype(np.uint8) * 255
    (pair / "image1.png").write_bytes(_png(_picture()))
    (pair / "image2.png").write_bytes(_png(_shift_right(_picture(), SHIFT, edge=True)))
    (pair / "mask1.png").write_bytes(_png(binary))
    (pair / "mask2.png").write_bytes(_png(_shift_right(binary, SHIFT, edge=False)))
    (pair / "flip_gt.txt").write_text("0\n")
    out = tmp_path / "bench"
    env = {**os.environ, "JLAD_URL": service.url, "JLAD_API_KEY": API_KEY}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "tss_mask_iou.py"),
            str(tmp_path / "tss"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "tss_mask_iou.json").read_text())
    (record,) = report["per_pair"]
    assert record["pair"] == "SYN/pair_01" and record["flip_gt"] is False
    assert record["iou_all_matches"] > SHIFT_IOU_FLOOR
    assert record["iou_all_matches"] > record["iou_identity"] + 0.05
    assert report["mean"]["iou_identity"] == pytest.approx(record["iou_identity"])
    assert "| SYN/pair_01 |" in (out / "tss_mask_iou.md").read_text()
    assert Image.open(out / "tss_mask_iou.png").format == "PNG"
