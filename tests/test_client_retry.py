"""Retries, backoff and problem+json errors of the client, against a real (tiny) HTTP server.

The server is the standard library's `ThreadingHTTPServer` on a free port, scripted with a
queue of answers: it lets each test say exactly what the service answers (429 then 200,
503 with an HTTP-date Retry-After, a problem document...) and records what it received.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from jlad_client import (
    NO_RETRY,
    AsyncJladClient,
    JladClient,
    ProblemError,
    RetryPolicy,
    TransportError,
)
from jlad_client.client import parse_retry_after

from tests.service_support import free_port

MODELS_BODY = {
    "default_model": "objects",
    "models": [
        {
            "name": "objects",
            "version": "1",
            "description": "test",
            "precision": "fp32",
            "provider": "CPUExecutionProvider",
            "input_size": {"width": 256, "height": 256},
            "grid_size": {"width": 32, "height": 32},
            "num_landmarks": 10,
            "default": True,
            "manifest": {"schema": "jlad.manifest/1"},
        }
    ],
}


@dataclass
class Answer:
    status: int
    body: dict[str, object]
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass
class Script:
    """Answers to give, in order (the last one repeats), and what was received."""

    answers: list[Answer] = field(default_factory=list)
    received: list[tuple[float, str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_answer(self) -> Answer:
        with self.lock:
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            with script.lock:
                script.received.append(
                    (time.monotonic(), self.command, self.path, dict(self.headers.items()))
                )
            answer = script.next_answer()
            payload = json.dumps(answer.body).encode()
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(payload)))
            for key, value in answer.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _answer
        do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _problem(status: int, kind: str, title: str, detail: str) -> dict[str, object]:
    return {
        "type": f"https://jlad.dev/problems/{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": "/models",
        "request_id": "abc123",
    }


QUEUE_FULL = Answer(
    429,
    _problem(429, "queue-full", "Too many requests waiting", "3 jobs already waiting"),
    {"Retry-After": "1"},
    "application/problem+json",
)


def test_429_is_retried_after_retry_after_seconds(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [QUEUE_FULL, Answer(200, MODELS_BODY)]
    with JladClient(url, api_key="k1") as client:
        started = time.monotonic()
        models = client.models()
        elapsed = time.monotonic() - started
    assert [m.name for m in models] == ["objects"]
    assert models[0].is_default and models[0].input_size is not None
    assert models[0].provider == "CPUExecutionProvider"
    assert len(script.received) == 2
    gap = script.received[1][0] - script.received[0][0]
    assert gap >= 0.95, f"retried after {gap:.2f} s, Retry-After said 1 s"
    assert elapsed < 5
    assert all(r[3].get("X-API-Key") == "k1" for r in script.received)


def test_503_without_retry_after_backs_off_exponentially(server: tuple[str, Script]) -> None:
    url, script = server
    unavailable = Answer(
        503,
        _problem(503, "not-ready", "Service not ready", "warming up"),
        {},
        "application/problem+json",
    )
    script.answers = [unavailable, unavailable, unavailable, Answer(200, MODELS_BODY)]
    policy = RetryPolicy(max_retries=3, backoff_s=0.1, jitter=0.0)
    with JladClient(url, retry=policy) as client:
        client.models()
    times = [r[0] for r in script.received]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    for gap, expected in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert expected * 0.9 <= gap <= expected + 0.5, gaps


def test_http_date_retry_after_is_honoured(server: tuple[str, Script]) -> None:
    url, script = server
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    script.answers = [
        Answer(503, _problem(503, "not-ready", "Service not ready", "x"), {"Retry-After": when}),
        Answer(200, MODELS_BODY),
    ]
    with JladClient(url) as client:
        client.models()
    gap = script.received[1][0] - script.received[0][0]
    # The client must wait until the date: at least the time left when the first answer
    # came (a loaded machine can spend a while before that first request). The date has
    # one-second resolution, so it was 2 to 3 s ahead when written.
    wall_first = time.time() - (time.monotonic() - script.received[0][0])
    left = parsedate_to_datetime(when).timestamp() - wall_first
    assert left > 0.5, "the machine was too slow to test this"
    assert left - 0.1 <= gap <= 4.0


def test_retries_run_out_and_raise_the_problem(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [QUEUE_FULL]
    policy = RetryPolicy(max_retries=2, max_retry_after_s=5)
    with JladClient(url, retry=policy) as client, pytest.raises(ProblemError) as caught:
        client.models()
    assert len(script.received) == 3
    error = caught.value
    assert error.status == 429
    assert error.type == "https://jlad.dev/problems/queue-full"
    assert error.kind == "queue-full"
    assert error.title == "Too many requests waiting"
    assert error.detail == "3 jobs already waiting"
    assert error.instance == "/models"
    assert error.extensions == {"request_id": "abc123"}
    assert error.retry_after == 1.0


def test_too_long_retry_after_is_not_waited_for(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [
        Answer(429, _problem(429, "queue-full", "Busy", "x"), {"Retry-After": "3600"}),
        Answer(200, MODELS_BODY),
    ]
    with JladClient(url) as client, pytest.raises(ProblemError) as caught:
        client.models()
    assert caught.value.retry_after == 3600
    assert len(script.received) == 1


def test_no_retry_policy_and_non_retryable_status(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [QUEUE_FULL]
    with JladClient(url, retry=NO_RETRY) as client, pytest.raises(ProblemError):
        client.models()
    assert len(script.received) == 1
    script.received.clear()
    script.answers = [
        Answer(404, _problem(404, "unknown-model", "Unknown model", "no model 'cats'"))
    ]
    with JladClient(url) as client, pytest.raises(ProblemError) as caught:
        client.models()
    assert len(script.received) == 1  # 404 is never retried
    assert caught.value.kind == "unknown-model"
    assert "no model 'cats'" in str(caught.value)


def test_error_without_problem_body_still_raises_problem_error(
    server: tuple[str, Script],
) -> None:
    url, script = server
    script.answers = [Answer(502, {"oops": 1}, content_type="application/json")]
    with JladClient(url) as client, pytest.raises(ProblemError) as caught:
        client.health()
    assert caught.value.status == 502
    assert caught.value.type == "about:blank"
    assert caught.value.extensions == {"oops": 1}


def test_ready_reports_503_without_raising(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [Answer(503, _problem(503, "not-ready", "Service not ready", "loading"))]
    with JladClient(url) as client:
        status = client.ready()
    assert not status.ready and status.status_code == 503
    assert status.body["detail"] == "loading"
    assert len(script.received) == 1


def test_async_client_retries_429(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [QUEUE_FULL, Answer(200, MODELS_BODY)]

    async def run() -> list[str]:
        async with AsyncJladClient(url, api_key="k2", deadline_ms=5000) as client:
            return [m.name for m in await client.models()]

    assert asyncio.run(run()) == ["objects"]
    assert len(script.received) == 2
    assert script.received[1][0] - script.received[0][0] >= 0.95
    assert script.received[0][3].get("X-API-Key") == "k2"
    assert script.received[0][3].get("X-Deadline-Ms") == "5000"


def test_unreachable_service_raises_transport_error_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    policy = RetryPolicy(max_retries=2, backoff_s=0.05, jitter=0.0)
    started = time.monotonic()
    with JladClient(url, retry=policy, timeout=2) as client, pytest.raises(TransportError):
        client.health()
    assert time.monotonic() - started >= 0.05 + 0.1


def test_environment_gives_url_and_key(
    server: tuple[str, Script], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, script = server
    script.answers = [Answer(200, {"status": "ok"})]
    monkeypatch.setenv("JLAD_URL", url)
    monkeypatch.setenv("JLAD_API_KEY", "from-env")
    with JladClient() as client:
        assert client.health() == {"status": "ok"}
    assert script.received[0][3].get("X-API-Key") == "from-env"


def test_parse_retry_after_forms() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
