"""`python -m service` as a real process: SIGTERM mid-request drains, then exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from tests.service_support import chelsea, encode, free_port

ROOT = Path(__file__).resolve().parents[1]


def start_service(model_dir: Path, port: int, log: BinaryIO) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("JLAD_")},
        "JLAD_MODEL_DIR": str(model_dir),
        "JLAD_PORT": str(port),
        "JLAD_MODELS": "faces",
        "JLAD_DEFAULT_MODEL": "faces",
        "JLAD_INTRA_OP_THREADS": "1",
        "JLAD_MAX_BATCH_SIZE": "4",
        "JLAD_SHUTDOWN_GRACE_S": "20",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        env=env,
        # A file, not a pipe: nobody reads a pipe while the test runs, and a full one blocks.
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "python -m service exited during start-up"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("python -m service never became ready")


@pytest.fixture
def service(model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = free_port()
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = start_service(model_dir, port, log)
        yield process, f"http://127.0.0.1:{port}", log_path
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_sigterm_finishes_the_request_in_flight_then_exits(
    service: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, url, log_path = service
    wait_ready(url, process)
    image = encode(chelsea())
    # The request is in flight when SIGTERM comes: its upload stops halfway and resumes
    # only once new connections are being refused, so it is decoded, batched and run while
    # the process drains (a job waiting in the batcher at shutdown is drained too:
    # tests/test_service_batching.py).
    request = httpx.Request("POST", url + "/landmarks", files={"image": ("c.png", image)})
    body = request.read()
    headers = {"content-type": request.headers["content-type"], "content-length": str(len(body))}
    half_sent, finish = threading.Event(), threading.Event()

    def slowly() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        half_sent.set()
        finish.wait(30)
        yield body[len(body) // 2 :]

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            httpx.post, url + "/landmarks", content=slowly(), headers=headers, timeout=60
        )
        assert half_sent.wait(20), "the upload never started"
        time.sleep(0.2)  # the server has the headers and half the body
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # New connections are refused while the old request drains.
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/healthz", timeout=2)
        finish.set()
        answer = in_flight.result(timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["landmarks"]) > 0
    code = process.wait(timeout=30)
    # uvicorn re-raises the captured SIGTERM after a clean shutdown.
    assert code in (0, -signal.SIGTERM), code
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    messages = [line["message"] for line in lines]
    assert "ready" in messages and "stopped" in messages
    assert messages.index("stopped") > messages.index("ready")
    # Every line is a JSON log record; request lines carry their request id.
    access = [line for line in lines if line["logger"] == "service.access"]
    assert any(line["path"] == "/landmarks" and line["status"] == 200 for line in access)
    assert all(line["request_id"] for line in access)
