"""Exceptions raised by the jlad client.

Every error answer of the service is an RFC 9457 `application/problem+json` document; the
client raises it as a `ProblemError` carrying its fields (`type`, `title`, `status`,
`detail`, `instance`, and any extension members). Failures to reach the service at all are
`TransportError`s.
"""

from __future__ import annotations

from typing import Any

PROBLEM_TYPE_PREFIX = "https://jlad.dev/problems/"


class JladError(Exception):
    """Base class of every error the client raises."""


class TransportError(JladError):
    """The service could not be reached or did not answer in time (after all retries)."""


class ProblemError(JladError):
    """An HTTP error answer from the service, with its problem+json fields.

    Attributes:
        type: stable URI naming the kind of problem, e.g. `https://jlad.dev/problems/rate-limited`.
        title: short human summary of the kind.
        status: the HTTP status code.
        detail: what went wrong with this request, and what to do about it.
        instance: URI of this occurrence (often the request id), if the service gave one.
        extensions: every other member of the problem document.
        retry_after: seconds from the `Retry-After` header, if any.
        request_id: the `X-Request-ID` response header, if any.
    """

    def __init__(
        self,
        *,
        type: str,
        title: str,
        status: int,
        detail: str | None = None,
        instance: str | None = None,
        extensions: dict[str, Any] | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        self.type = type
        self.title = title
        self.status = status
        self.detail = detail
        self.instance = instance
        self.extensions = dict(extensions or {})
        self.retry_after = retry_after
        self.request_id = request_id
        message = f"{status} {title}"
        if detail:
            message += f": {detail}"
        if request_id:
            message += f" (request {request_id})"
        super().__init__(message)

    @property
    def kind(self) -> str:
        """The last path segment of `type` (`rate-limited`, `unknown-model`, ...)."""
        return self.type.rstrip("/").rsplit("/", 1)[-1]

    @classmethod
    def from_problem(
        cls,
        status: int,
        document: dict[str, Any] | None,
        *,
        fallback_title: str = "",
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> ProblemError:
        """Build from a parsed problem document (or None when the body was not one)."""
        doc = dict(document or {})
        known = {"type", "title", "status", "detail", "instance"}
        raw_status = doc.get("status", status)
        return cls(
            type=str(doc.get("type") or "about:blank"),
            title=str(doc.get("title") or fallback_title or f"HTTP {status}"),
            status=int(raw_status) if isinstance(raw_status, int | str) else status,
            detail=None if doc.get("detail") is None else str(doc["detail"]),
            instance=None if doc.get("instance") is None else str(doc["instance"]),
            extensions={k: v for k, v in doc.items() if k not in known},
            retry_after=retry_after,
            request_id=request_id,
        )
