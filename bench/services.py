"""Start and stop what a benchmark talks to: API processes (`python -m service`), Redis
queue workers (`python -m service.worker`) and a private `redis-server`, each on a free
loopback port, each stopped (SIGTERM, then SIGKILL) when its `ExitStack` closes.

Processes get a clean `JLAD_*` environment: only the settings a scenario states, never the
developer's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LOOPBACK = "127.0.0.1"
_LOGGED_ERROR = '"level": "ERROR"'  # the services log one JSON object per line


def free_port() -> int:
    """A TCP port nothing listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class ProcessFailed(RuntimeError):
    """A benchmark process exited or never became ready; the message quotes its log."""


@dataclass
class Managed:
    """One child process with its log file; `stop()` is idempotent."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    forced: bool = False  # it ignored SIGTERM for too long and was killed

    @property
    def clean_exit(self) -> bool:
        """Stopped by SIGTERM in time (uvicorn re-raises the signal after a clean shutdown,
        hence -SIGTERM as well as 0)."""
        code = None if self.process is None else self.process.returncode
        return not self.forced and code in (0, -signal.SIGTERM)

    def start(self) -> Managed:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # A session of its own: a Ctrl-C in the terminal reaches the harness only, which
            # then stops its children in order (the batcher drains, Redis last).
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.forced = True
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def wait_until_ready(process: Managed, url: str, timeout_s: float) -> None:
    """Poll `url` until it answers 200. Fail early when the process exits or logs an error
    (a service whose models fail to load stays alive, answering 503, by design)."""
    until = time.monotonic() + timeout_s
    with httpx.Client(timeout=5, trust_env=False) as client:
        while True:
            if not process.alive():
                raise ProcessFailed(
                    f"{process.name} exited ({process.process and process.process.returncode}) "
                    f"before it was ready; its log ends:\n{process.log_tail()}"
                )
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if _LOGGED_ERROR in process.log_tail(20_000):
                raise ProcessFailed(
                    f"{process.name} logged an error before it was ready; its log ends:\n"
                    f"{process.log_tail()}"
                )
            if time.monotonic() > until:
                raise ProcessFailed(
                    f"{process.name} not ready at {url} after {timeout_s:.0f} s; its log "
                    f"ends:\n{process.log_tail()}"
                )
            time.sleep(0.1)


def clean_environment(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any JLAD_* variable, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JLAD_")}
    env.update(settings)
    return env


@dataclass
class Stack:
    """Processes of one scenario, stopped in reverse start order by `close()`."""

    log_dir: Path
    ready_timeout_s: float = 180.0
    exits: ExitStack = field(default_factory=ExitStack)
    processes: list[Managed] = field(default_factory=list)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.exits.close()

    def _launch(self, name: str, argv: list[str], env: dict[str, str]) -> Managed:
        process = Managed(name, argv, env, self.log_dir / f"{name}.log")
        self.exits.callback(process.stop)
        process.start()
        self.processes.append(process)
        return process

    def redis(self) -> str:
        """A private redis-server without persistence; returns its URL."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ProcessFailed("redis-server is not installed (apt-get install redis-server)")
        port = free_port()
        data_dir = self.log_dir / f"redis-{port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--bind", LOOPBACK, "--port", str(port), "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(data_dir)]
        process = self._launch(f"redis-{port}", argv, clean_environment({}))
        until = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return f"redis://{LOOPBACK}:{port}/0"
            except OSError:
                pass
            if not process.alive() or time.monotonic() > until:
                raise ProcessFailed(f"redis-server did not start:\n{process.log_tail()}")
            time.sleep(0.05)

    def api(self, name: str, settings: Mapping[str, str]) -> tuple[Managed, str]:
        """`python -m service` with `settings` (JLAD_* names) on a free port; returns the
        process and its base URL once /readyz answers 200."""
        port = free_port()
        env = clean_environment({**settings, "JLAD_HOST": LOOPBACK, "JLAD_PORT": str(port)})
        process = self._launch(name, [sys.executable, "-m", "service"], env)
        url = f"http://{LOOPBACK}:{port}"
        wait_until_ready(process, url + "/readyz", self.ready_timeout_s)
        return process, url

    def worker(self, name: str, settings: Mapping[str, str]) -> tuple[Managed, str]:
        """`python -m service.worker` with `settings`; returns the process and the URL of its
        probes (/readyz, /metrics) once ready."""
        port = free_port()
        env = clean_environment({**settings, "JLAD_HOST": LOOPBACK, "JLAD_PORT": str(port)})
        process = self._launch(name, [sys.executable, "-m", "service.worker"], env)
        url = f"http://{LOOPBACK}:{port}"
        wait_until_ready(process, url + "/readyz", self.ready_timeout_s)
        return process, url
