"""Helpers for the Redis queue tests: real redis-server processes on free ports, API and
worker processes, Prometheus text parsing, reference landmarks.

Every process started here is stopped by its owner (context managers / fixtures), and
every wait is bounded in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from service.fields import landmarks_to_pixels
from service.imaging import ImageLimits, decode_image, to_model_pixels
from service.jobs import InferenceJob
from service.runtime import InferenceEngine
from tests.service_support import free_port

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = "redis-server"


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    until = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > until:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class TlsFiles:
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1 (openssl), the test's own CA."""
    cert, key = directory / "redis.crt", directory / "redis.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return TlsFiles(cert, key)


@dataclass
class RedisServer:
    """A throw-away redis-server on loopback: no persistence, its own port."""

    directory: Path
    port: int = field(default_factory=free_port)
    password: str | None = None
    tls: TlsFiles | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """URL without the password (tests pass it as a setting or put it in themselves)."""
        scheme = "rediss" if self.tls else "redis"
        query = f"?ssl_ca_certs={self.tls.cert}" if self.tls else ""
        return f"{scheme}://127.0.0.1:{self.port}/0{query}"

    def client(self) -> redis.Redis:
        kwargs: dict[str, Any] = {"socket_timeout": 5, "password": self.password}
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls.cert))
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self) -> None:
        command = [
            REDIS_SERVER,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
        ]
        if self.tls:
            command += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls.cert),
                "--tls-key-file",
                str(self.tls.key),
                "--tls-ca-cert-file",
                str(self.tls.cert),
                "--tls-auth-clients",
                "no",
            ]
        else:
            command += ["--port", str(self.port)]
        if self.password:
            command += ["--requirepass", self.password]
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = self.client()

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, "redis died"
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.TimeoutError):
                return False

        wait_for(answers, 10, f"redis-server on port {self.port}")
        client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


@contextmanager
def redis_server(directory: Path, **kwargs: Any) -> Iterator[RedisServer]:
    server = RedisServer(directory, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- service processes ---------------------------------------------------------------------


def queue_environment(model_dir: Path, redis_url: str, **settings: str) -> dict[str, str]:
    """Environment of an API or worker process using the Redis queue on `redis_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JLAD_")}
    env.update(
        {
            "JLAD_MODEL_DIR": str(model_dir),
            "JLAD_MODELS": "faces",
            "JLAD_DEFAULT_MODEL": "faces",
            "JLAD_QUEUE": "redis",
            "JLAD_REDIS_URL": redis_url,
            "JLAD_HOST": "127.0.0.1",
            "JLAD_INTRA_OP_THREADS": "1",
            "JLAD_SHUTDOWN_GRACE_S": "20",
            "JLAD_LOG_LEVEL": "info",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update({f"JLAD_{k.upper()}": v for k, v in settings.items()})
    return env


@dataclass
class ServiceProcess:
    """`python -m service` or `python -m service.worker` on its own port."""

    name: str
    module: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    log_file: BinaryIO

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 5) -> httpx.Response:
        return httpx.get(self.url + path, timeout=timeout)

    def is_ready(self) -> bool:
        assert self.process.poll() is None, f"{self.name} exited:\n{self.log()[-3000:]}"
        try:
            return self.get("/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 90) -> None:
        wait_for(self.is_ready, timeout_s, f"{self.name} ready", interval_s=0.1)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics").text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, wait (then SIGKILL); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log_file.close()
        return int(self.process.returncode)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log_file.close()


def start_process(
    module: str, name: str, env: dict[str, str], directory: Path, port: int | None = None
) -> ServiceProcess:
    port = port or free_port()
    log_path = directory / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**env, "JLAD_PORT": str(port)},
        # A file, not a pipe: nobody reads a pipe while the test runs, and a full one blocks.
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return ServiceProcess(name, module, port, log_path, process, log_file)


# -- metrics and results -------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as {'name{label="v",...}': value} (labels sorted)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def reference_landmarks(engine: InferenceEngine, model: str, image: bytes) -> np.ndarray[Any, Any]:
    """(K, 2) landmarks in image pixels, computed in this process without any queue."""
    rgb = decode_image(image, ImageLimits(max_pixels=10**8, min_side=1))
    height, width = engine.models[model].info.input_size
    job = InferenceJob(model, to_model_pixels(rgb, height, width)[None], landmarks=[0])
    (result,) = engine.run_batch([job])
    return landmarks_to_pixels(result.landmarks[0].points, rgb.shape[1], rgb.shape[0])


def landmarks_of(response: httpx.Response) -> np.ndarray[Any, Any]:
    return np.array([[p["x"], p["y"]] for p in response.json()["landmarks"]])


def load_engine(model_dir: Path, model: str = "faces") -> InferenceEngine:
    from service.runtime import find_models

    return InferenceEngine.load(
        find_models(model_dir, [model]),
        precision="fp32",
        providers="cpu",
        allow_cpu_fallback=False,
        intra_op_threads=1,
    )
