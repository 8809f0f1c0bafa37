"""ONNX Runtime sessions on the real exported models: repository, checksums, providers,
batched runs, fp16; and readiness when the requested provider does not load."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from model_export.quantize import cpu_has_vnni
from service.imaging import model_input, to_model_pixels
from service.jobs import InferenceJob
from service.runtime import (
    CPU,
    CUDA,
    InferenceEngine,
    ModelInfo,
    ModelLoadError,
    ModelSessions,
    ProviderError,
    find_models,
    resolve_providers,
)
from tests.service_support import assert_problem, astronaut, chelsea, coffee, encode, serve
from tests.service_support import service_settings as make_settings

HAS_CUDA = CUDA in ort.get_available_providers()
# Asking a CPU-only ONNX Runtime for CUDA warns; here that is the point of the test.
NO_CUDA_WARNING = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")


@pytest.fixture(scope="module")
def faces(model_dir: Path) -> ModelInfo:
    return find_models(model_dir, ["faces"])["faces"]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> InferenceEngine:
    infos = find_models(model_dir, ["faces"])
    return InferenceEngine.load(
        infos, precision="fp32", providers="cpu", allow_cpu_fallback=False, intra_op_threads=1
    )


def model_pixels(info: ModelInfo) -> np.ndarray:
    h, w = info.input_size
    return np.stack([to_model_pixels(img, h, w) for img in (astronaut(), chelsea(), coffee())])


def test_repository_serves_the_highest_version(model_dir: Path, tmp_path: Path) -> None:
    source = model_dir / "faces" / "1"
    for version in ("2", "10"):
        target = tmp_path / "faces" / version
        shutil.copytree(source, target, symlinks=True)
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["version"] = version
        (target / "manifest.json").write_text(json.dumps(manifest))
    found = find_models(tmp_path)
    assert list(found) == ["faces"]
    assert found["faces"].version == "10"  # numeric order, not text order


def test_missing_repository_and_missing_models_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="make models"):
        find_models(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="make models"):
        find_models(tmp_path)


def test_a_modified_graph_fails_its_checksum(faces: ModelInfo, tmp_path: Path) -> None:
    copy = tmp_path / "faces" / faces.version
    shutil.copytree(faces.root, copy)
    graph = copy / "fp32" / "landmarks.onnx"
    data = bytearray(graph.read_bytes())
    data[-100] ^= 0xFF
    graph.write_bytes(bytes(data))
    info = find_models(tmp_path)["faces"]
    with pytest.raises(ModelLoadError) as exc:
        ModelSessions(info, "fp32", [CPU], allow_cpu_fallback=False)
    message = str(exc.value)
    assert "landmarks.onnx" in message and "sha256" in message and "make models" in message


def test_provider_resolution() -> None:
    assert resolve_providers("auto", [CPU]) == [CPU]
    assert resolve_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers("cpu", [CUDA, CPU]) == [CPU]
    assert resolve_providers("cuda", [CPU]) == [CUDA, CPU]
    assert resolve_providers("OpenVINOExecutionProvider, CPUExecutionProvider", [CPU]) == [
        "OpenVINOExecutionProvider",
        CPU,
    ]


@NO_CUDA_WARNING
@pytest.mark.skipif(HAS_CUDA, reason="checks the failure on a machine without CUDA")
def test_cuda_that_does_not_load_is_an_error_unless_fallback_is_allowed(
    faces: ModelInfo,
) -> None:
    with pytest.raises(ProviderError, match="JLAD_ALLOW_CPU_FALLBACK"):
        ModelSessions(faces, "fp32", [CUDA, CPU], allow_cpu_fallback=False)
    fallback = ModelSessions(faces, "fp32", [CUDA, CPU], allow_cpu_fallback=True)
    assert fallback.provider == CPU


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and an NVIDIA GPU")
def test_cuda_runs_where_available(faces: ModelInfo) -> None:
    sessions = ModelSessions(faces, "fp32", [CUDA, CPU], allow_cpu_fallback=False)
    assert sessions.provider == CUDA


def test_a_batch_of_jobs_equals_each_job_alone(engine: InferenceEngine, faces: ModelInfo) -> None:
    images = model_pixels(faces)
    jobs = [
        InferenceJob("faces", images[[0, 1]], landmarks=[1], pairs=[(0, 1), (1, 0)]),
        InferenceJob("faces", images[[2]], landmarks=[0]),
        InferenceJob("faces", images[[1, 2]], pairs=[(1, 0)]),
    ]
    together = engine.run_batch(jobs)
    alone = [engine.run_batch([job])[0] for job in jobs]
    assert [len(r.landmarks) for r in together] == [1, 1, 0]
    assert [len(r.alignments) for r in together] == [2, 0, 1]
    for batched, single in zip(together, alone, strict=True):
        for a, b in zip(batched.landmarks, single.landmarks, strict=True):
            np.testing.assert_allclose(a.points, b.points, atol=1e-4)
        for a, b in zip(batched.alignments, single.alignments, strict=True):
            np.testing.assert_allclose(a.mapping, b.mapping, atol=1e-4)
            np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-4)
    # Shapes as docs/CONTRACT.md states them.
    k, (h, w) = faces.num_landmarks, faces.grid_size
    lm, al = together[0].landmarks[0], together[0].alignments[0]
    assert lm.points.shape == (k, 2) and lm.confidence.shape == (k,)
    assert lm.heatmaps.shape == (k, h, w)
    assert al.mapping.shape == (2, h, w) and al.confidence.shape == (h, w)
    assert together[0].batch_images == 5


def test_jobs_carry_uint8_pixels_and_anything_else_is_refused(
    engine: InferenceEngine, faces: ModelInfo
) -> None:
    pixels = model_pixels(faces)[:1]
    with pytest.raises(ValueError, match="uint8"):
        engine.run_batch([InferenceJob("faces", model_input(pixels), landmarks=[0])])
    with pytest.raises(ValueError, match="do not fit"):
        engine.run_batch([InferenceJob("faces", pixels[:, :, :8, :8], landmarks=[0])])


def test_a_zooming_landmark_graph_gets_each_image_with_its_features(
    engine: InferenceEngine, faces: ModelInfo
) -> None:
    """The committed `faces` crops each image around its first-pass points (CONTRACT.md,
    `landmark_zoom`): the engine must feed every landmark row its own image."""
    sessions = engine.models["faces"]
    assert sessions.takes("landmarks", "image") and not sessions.takes("align", "image")
    pixels = model_pixels(faces)
    (result,) = engine.run_batch([InferenceJob("faces", pixels, landmarks=[2, 0])])
    images = model_input(pixels)  # what the engine feeds the graphs: pixels / 255
    features = sessions.run("backbone", {"image": images}, 8)["features"]
    rows = [2, 0]
    direct = sessions.run("landmarks", {"features": features[rows], "image": images[rows]}, 8)
    for served, expected in zip(result.landmarks, direct["points"], strict=True):
        np.testing.assert_allclose(served.points, expected, atol=1e-4)
    # the image input is used: another image under the same features moves the points
    swapped = sessions.run("landmarks", {"features": features[rows], "image": images[[1, 1]]}, 8)
    assert np.abs(swapped["points"] - direct["points"]).max() > 0.01


def test_fp16_variant_agrees_with_fp32(model_dir: Path, engine: InferenceEngine) -> None:
    infos = find_models(model_dir, ["faces"])
    half = InferenceEngine.load(
        infos, precision="fp16", providers="cpu", allow_cpu_fallback=False, intra_op_threads=1
    )
    images = model_pixels(infos["faces"])
    job = InferenceJob("faces", images[[0, 1]], landmarks=[0], pairs=[(0, 1)])
    full, reduced = engine.run_batch([job])[0], half.run_batch([job])[0]
    assert reduced.alignments[0].mapping.dtype == np.float32  # cast back by the service
    tolerance = infos["faces"].manifest["parity"]["fp16"]["mapping_cells"]
    _h, w = infos["faces"].grid_size
    # The manifest states the tolerance in cells; the mapping is normalised (2 / w per cell).
    error_cells = np.abs(full.alignments[0].mapping - reduced.alignments[0].mapping) * w / 2
    assert np.median(error_cells) < tolerance


def test_int8_variant_agrees_with_fp32(model_dir: Path, engine: InferenceEngine) -> None:
    """JLAD_PRECISION=int8 serves the quantized graphs (float32 in and out) within the
    manifest's stated tolerances of fp32, on real faces (the CI export calibrates on
    scikit-image samples)."""
    infos = find_models(model_dir, ["faces"])
    int8 = InferenceEngine.load(
        infos, precision="int8", providers="auto", allow_cpu_fallback=False, intra_op_threads=1
    )
    assert int8.describe()[0]["precision"] == "int8"
    assert int8.describe()[0]["provider"] == CPU
    images = model_pixels(infos["faces"])
    job = InferenceJob("faces", images[[0, 1]], landmarks=[0, 1], pairs=[(0, 1)])
    full, quant = engine.run_batch([job])[0], int8.run_batch([job])[0]
    tol = infos["faces"].manifest["parity"]["int8"]
    # Exported here with the default: 7-bit weights unless this CPU has VNNI.
    assert infos["faces"].manifest["quantization"]["reduce_range"] is not cpu_has_vnni()
    _h, w = infos["faces"].grid_size
    error_cells = np.abs(full.alignments[0].mapping - quant.alignments[0].mapping) * w / 2
    assert quant.alignments[0].mapping.dtype == np.float32
    assert np.median(error_cells) <= tol["mapping_cells_median"] * 10
    assert (error_cells.max(axis=0) > 1).mean() <= tol["mapping_moved_share"]
    moved = [
        np.linalg.norm(a.points - b.points, axis=-1) * w / 2
        for a, b in zip(full.landmarks, quant.landmarks, strict=True)
    ]
    within = all(
        np.median(m) <= 1.0 and (m > 2.0).mean() <= tol["points_moved_share"] for m in moved
    )
    assert within, moved


def test_int8_on_an_explicit_gpu_provider_is_refused(model_dir: Path) -> None:
    infos = find_models(model_dir, ["faces"])
    with pytest.raises(ProviderError, match="int8 is for CPUs"):
        InferenceEngine.load(infos, precision="int8", providers="cuda", allow_cpu_fallback=True)


@NO_CUDA_WARNING
def test_readiness_fails_when_the_requested_provider_does_not_load(
    model_dir: Path,
) -> None:
    if HAS_CUDA:
        pytest.skip("needs a machine where CUDA does not load")
    settings = make_settings(model_dir, models=["faces"], default_model="faces", providers="cuda")
    with serve(settings, wait_ready=False) as running:
        deadline = time.monotonic() + 60
        while running.state.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with httpx.Client(base_url=running.url) as client:
            assert client.get("/healthz").status_code == 200
            ready = assert_problem(client.get("/readyz"), 503, "not-ready")
            assert CUDA in ready["detail"] and "JLAD_ALLOW_CPU_FALLBACK" in ready["detail"]
            busy = client.post("/landmarks", files={"image": ("c.png", encode(chelsea()))})
            assert_problem(busy, 503, "not-ready")
            assert "jlad_ready 0.0" in client.get("/metrics").text


def test_thread_setting_reaches_every_session(faces: ModelInfo) -> None:
    sessions = ModelSessions(faces, "fp32", [CPU], allow_cpu_fallback=False, intra_op_threads=1)
    assert sessions.provider == CPU
    for session in sessions.sessions.values():
        assert session.get_session_options().intra_op_num_threads == 1
