"""Cross-cutting ASGI middleware: request ids, access logs, metrics, body size limit.

Pure ASGI (no BaseHTTPMiddleware) so request bodies stream through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_id_var
from service.metrics import ServiceMetrics
from service.problems import BAD_REQUEST, INTERNAL_ERROR, UPLOAD_TOO_LARGE, Problem, problem_body

log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "X-Request-ID"
# Echo a caller's id only if it is a short token; anything else could poison the logs.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class RequestContextMiddleware:
    """Gives every request an id (echoed or generated) and logs and counts its answer.

    It is also the last line of defence: an unexpected exception becomes a 500
    problem+json that still carries the request id.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming if _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            if status == 0:
                status = 500
                body = problem_body(
                    INTERNAL_ERROR,
                    "the service failed unexpectedly; quote the request id when reporting it",
                    scope.get("path"),
                    request_id=request_id,
                )
                await _send_problem(send_with_id, 500, body)
        finally:
            elapsed = time.perf_counter() - started
            route = _route_label(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(elapsed)
            log.info(
                "%s %s %d",
                scope.get("method"),
                scope.get("path"),
                status,
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                },
            )
            request_id_var.reset(token)


async def _send_problem(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodyTooLarge(Problem):
    def __init__(self, limit: int) -> None:
        super().__init__(
            UPLOAD_TOO_LARGE,
            f"the request body exceeds {limit} bytes (JLAD_MAX_UPLOAD_BYTES); send smaller or "
            "fewer images",
            extra={"max_bytes": limit},
        )


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes`: at once by Content-Length, else while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            problem: Problem | None = None
            if not declared.isdigit():
                problem = Problem(BAD_REQUEST, "Content-Length is not a number")
            elif int(declared) > self.max_bytes:
                problem = BodyTooLarge(self.max_bytes)
            if problem is not None:
                body = problem_body(
                    problem.kind,
                    problem.detail,
                    scope.get("path"),
                    request_id=scope.get("state", {}).get("request_id"),
                    **problem.extra,
                )
                await _send_problem(send, problem.kind.status, body)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class RootPathMiddleware:
    """Tells the app it is mounted under `root_path` (JLAD_ROOT_PATH) behind a proxy.

    Requests reach the routes whether or not the proxy strips the prefix, and the OpenAPI
    document and /docs point at the prefixed URLs.
    """

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.root_path:
            scope["root_path"] = self.root_path
        await self.app(scope, receive, send)
