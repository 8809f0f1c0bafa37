"""Helpers for the service tests: a real uvicorn server on a free port, test images."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image
from skimage import data

from service.app import create_app, uvicorn_config
from service.batching import Batcher
from service.settings import Settings
from service.state import ServiceState

PROBLEM_PREFIX = "https://jlad.dev/problems/"


def service_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: the exported models, small thread counts (2-core CI)."""
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "host": "127.0.0.1",
        "port": 0,
        "intra_op_threads": 1,
        "log_level": "warning",
        "shutdown_grace_s": 5,
    }
    values.update(overrides)
    # Read no JLAD_* from the developer's environment: the test states every setting it needs.
    return Settings(_env_prefix="JLAD_TEST_SERVER_", **values)


@dataclass
class RunningServer:
    url: str
    app: FastAPI
    server: uvicorn.Server

    @property
    def state(self) -> ServiceState:
        state: ServiceState = self.app.state.jlad
        return state

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


@contextmanager
def serve(
    settings: Settings, *, wait_ready: bool = True, timeout_s: float = 90
) -> Iterator[RunningServer]:
    """Run the app on uvicorn in a thread, on a free port, until the block ends."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(settings, app))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = RunningServer(f"http://127.0.0.1:{port}", app, server)
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        if wait_ready:
            wait_until_ready(running, deadline)
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until_ready(running: RunningServer, deadline: float) -> None:
    with running.client() as client:
        while True:
            if client.get("/readyz").status_code == 200:
                return
            if running.state.error:
                raise RuntimeError(f"service failed to load: {running.state.error}")
            if time.monotonic() > deadline:
                raise RuntimeError("service not ready in time")
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- images ------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with (far too little) pixel data."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def encode(array: np.ndarray[Any, Any], fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def astronaut() -> np.ndarray[Any, Any]:
    """(512, 512, 3) uint8."""
    return np.asarray(data.astronaut())


def chelsea() -> np.ndarray[Any, Any]:
    """(300, 451, 3) uint8."""
    return np.asarray(data.chelsea())


def coffee() -> np.ndarray[Any, Any]:
    """(400, 600, 3) uint8."""
    return np.asarray(data.coffee())


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    """The response is problem+json of `kind` with `status`; returns the document."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_PREFIX + kind, body
    assert body["status"] == status
    assert body["title"] and body["detail"]
    return body


@contextmanager
def inference_held(server: RunningServer) -> Iterator[None]:
    """Keep the in-process batcher's inference thread busy until the block ends.

    The next job then becomes a batch that cannot start, and the jobs after it wait in the
    queue, as they do behind a long batch (a job that finds the batcher idle runs at once:
    service.batching). A real thread held on an event; nothing is mocked.
    """
    dispatcher = server.state.dispatcher
    assert isinstance(dispatcher, Batcher) and dispatcher._executor is not None
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(60)

    held = dispatcher._executor.submit(hold)
    assert started.wait(10), "the inference thread never took the hold"
    try:
        yield
    finally:
        release.set()
        held.result(timeout=10)
