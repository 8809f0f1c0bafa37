"""Typed HTTP clients for the jlad service: `JladClient` (sync) and `AsyncJladClient`.

Both speak the API of docs/CONTRACT.md over httpx, send the API key as `X-API-Key`, retry
429 and 503 answers (and failed connections) with exponential backoff that honours
`Retry-After`, and raise every error answer as a `ProblemError` carrying its problem+json
fields. A request is described once (`_Call`: what to send and how to read the answer) and
executed by either client, so the two cannot drift apart.

    from jlad_client import JladClient

    with JladClient("http://127.0.0.1:8000", api_key="...") as jlad:
        result = jlad.propagate("frame0.png", "mask0.png", ["frame1.png", "frame2.png"])
        result.masks[0]  # (H1, W1) labels
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

import httpx

from jlad_client._version import __version__
from jlad_client.errors import ProblemError, TransportError
from jlad_client.images import (
    EncodedFile,
    ImageInput,
    MaskInput,
    encode_image,
    encode_mask,
    image_size,
)
from jlad_client.results import (
    CorrespondenceResult,
    LandmarksResult,
    ModelInfo,
    PropagationResult,
    ReadyStatus,
    Size,
    parse_correspondence,
    parse_correspondence_npz,
    parse_landmarks,
    parse_models,
    parse_propagation,
    parse_propagation_npz,
)

log = logging.getLogger("jlad_client")

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_HEADER = "X-API-Key"
DEADLINE_HEADER = "X-Deadline-Ms"
NPZ_MEDIA_TYPE = "application/x-npz"

Resolution = Literal["grid", "source", "target"]
View = Literal["flow", "confidence", "warped", "matches", "landmarks"]
LandmarksView = Literal["landmarks", "heatmaps"]
Refine = Literal["none", "colour"]


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    Retried: answers with a status in `statuses` (429 queue full, 503 not ready by default)
    and connections that failed before the request reached the service. Never retried: read
    timeouts (the service may still be working on it) and every other error. The wait before
    retry n (0-based) is the answer's `Retry-After` when it has one, else
    `backoff_s * 2**n` with up to `jitter` of it randomised, capped at `max_backoff_s`. A
    `Retry-After` longer than `max_retry_after_s` is not waited for: the error is raised.
    """

    max_retries: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 20.0
    jitter: float = 0.5
    max_retry_after_s: float = 60.0
    statuses: frozenset[int] = frozenset({429, 503})

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` when the service gave no `Retry-After`."""
        base = min(self.backoff_s * 2.0**attempt, self.max_backoff_s)
        return float(base * (1.0 - self.jitter * random.random()))

    def delay_after_response(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this answer, or None to not retry it."""
        if response.status_code not in self.statuses or attempt >= self.max_retries:
            return None
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is None:
            return self.backoff(attempt)
        if retry_after > self.max_retry_after_s:
            return None
        return retry_after

    def delay_after_error(self, error: httpx.TransportError, attempt: int) -> float | None:
        """Seconds to wait before retrying after a transport error, or None to give up."""
        retryable = isinstance(
            error, httpx.ConnectError | httpx.ConnectTimeout | httpx.RemoteProtocolError
        )
        if not retryable or attempt >= self.max_retries:
            return None
        return self.backoff(attempt)


NO_RETRY = RetryPolicy(max_retries=0)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds or an HTTP date; None if absent or
    unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def problem_from_response(response: httpx.Response) -> ProblemError:
    """The `ProblemError` an error answer stands for (its body when it is problem+json)."""
    document: dict[str, Any] | None = None
    try:
        parsed = response.json()
        if isinstance(parsed, dict):
            document = parsed
    except (ValueError, UnicodeDecodeError):
        document = None
    if document is None:
        text = response.text[:500] if response.content else ""
        document = {"detail": text} if text else None
    return ProblemError.from_problem(
        response.status_code,
        document,
        fallback_title=response.reason_phrase,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        request_id=response.headers.get("X-Request-ID"),
    )


def _json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as error:
        raise ProblemError(
            type="about:blank",
            title="Unreadable answer",
            status=response.status_code,
            detail=f"expected JSON, got {response.headers.get('content-type')}",
            request_id=response.headers.get("X-Request-ID"),
        ) from error


@dataclass
class _Call(Generic[T]):
    """One request: what to send, and how to turn the (successful) answer into a result."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    data: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    retry: bool = True
    accept_error: bool = False  # hand error answers to `parse` instead of raising

    def send_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": self.headers}
        if self.files:
            kwargs["files"] = self.files
            kwargs["data"] = self.data
        elif self.data:
            kwargs["data"] = self.data
        return kwargs


def _file_field(name: str, encoded: EncodedFile) -> tuple[str, tuple[str, bytes, str]]:
    return name, (encoded.filename, encoded.content, encoded.content_type)


def _options(**values: Any) -> dict[str, str]:
    """Form fields of the options that are set: JSON for lists, plain text otherwise."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, list | tuple):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


class _ClientBase:
    """Configuration and request building shared by both clients."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        *,
        model: str | None,
        timeout: float | httpx.Timeout,
        retry: RetryPolicy,
        deadline_ms: int | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("JLAD_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("JLAD_API_KEY")
        self.model = model
        self.retry = retry
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.headers = {"User-Agent": f"jlad-client/{__version__}", **dict(headers or {})}
        if key:
            self.headers[API_KEY_HEADER] = key
        if deadline_ms is not None:
            self.headers[DEADLINE_HEADER] = str(int(deadline_ms))

    # -- request builders (pure: no I/O besides reading the caller's files) --

    def _landmarks_call(self, image: ImageInput, model: str | None) -> _Call[LandmarksResult]:
        return _Call(
            "POST",
            "/landmarks",
            lambda r: parse_landmarks(_json_body(r)),
            data=_options(model=model or self.model),
            files=[_file_field("image", encode_image(image, "image"))],
        )

    def _correspond_call(
        self,
        source: ImageInput,
        target: ImageInput,
        *,
        model: str | None,
        resolution: Resolution,
        dtype: Literal["float16", "float32"],
        points: Sequence[Sequence[float]] | None,
        binary: bool,
    ) -> _Call[CorrespondenceResult]:
        src, tgt = encode_image(source, "source"), encode_image(target, "target")
        if binary:
            source_size = Size(*image_size(src.content))
            target_size = Size(*image_size(tgt.content))

            def parse(r: httpx.Response) -> CorrespondenceResult:
                return parse_correspondence_npz(r.content, resolution, source_size, target_size)
        else:

            def parse(r: httpx.Response) -> CorrespondenceResult:
                return parse_correspondence(_json_body(r), resolution)

        return _Call(
            "POST",
            "/correspond",
            parse,
            data=_options(
                model=model or self.model,
                resolution=resolution,
                dtype=dtype,
                points=[list(map(float, p)) for p in points] if points is not None else None,
            ),
            files=[_file_field("source", src), _file_field("target", tgt)],
            headers={"Accept": NPZ_MEDIA_TYPE} if binary else {"Accept": "application/json"},
        )

    def _render_call(
        self,
        path: str,
        images: Sequence[tuple[str, ImageInput]],
        *,
        view: str | None,
        model: str | None,
    ) -> _Call[bytes]:
        return _Call(
            "POST",
            path,
            lambda r: r.content,
            data=_options(model=model or self.model, view=view),
            files=[_file_field(name, encode_image(img, name)) for name, img in images],
            headers={"Accept": "image/png"},
        )

    def _propagate_call(
        self,
        source: ImageInput,
        mask: MaskInput,
        targets: Sequence[ImageInput],
        *,
        model: str | None,
        min_confidence: float | None,
        keep_if_neighbours_agree: bool | None,
        binary: bool,
        refine: Refine | None = None,
    ) -> _Call[PropagationResult]:
        if not targets:
            raise ValueError("propagate needs at least one target")
        files = [
            _file_field("source", encode_image(source, "source")),
            _file_field("mask", encode_mask(mask, "mask")),
        ]
        files += [
            _file_field("targets", encode_image(t, f"target{i}")) for i, t in enumerate(targets)
        ]
        if binary:

            def parse(r: httpx.Response) -> PropagationResult:
                return parse_propagation_npz(r.content)
        else:

            def parse(r: httpx.Response) -> PropagationResult:
                return parse_propagation(_json_body(r))

        return _Call(
            "POST",
            "/propagate",
            parse,
            data=_options(
                model=model or self.model,
                min_confidence=min_confidence,
                keep_if_neighbours_agree=keep_if_neighbours_agree,
                refine=refine,
            ),
            files=files,
            headers={"Accept": NPZ_MEDIA_TYPE} if binary else {"Accept": "application/json"},
        )

    @staticmethod
    def _models_call() -> _Call[list[ModelInfo]]:
        return _Call("GET", "/models", lambda r: parse_models(_json_body(r)))

    @staticmethod
    def _health_call() -> _Call[dict[str, Any]]:
        return _Call("GET", "/healthz", lambda r: dict(_json_body(r)))

    @staticmethod
    def _ready_call() -> _Call[ReadyStatus]:
        def parse(r: httpx.Response) -> ReadyStatus:
            try:
                body = r.json()
            except ValueError:
                body = {}
            return ReadyStatus(r.status_code == 200, r.status_code, body if body else {})

        return _Call("GET", "/readyz", parse, retry=False, accept_error=True)

    # -- answer handling shared by both clients --

    def _finish(self, call: _Call[T], response: httpx.Response) -> T:
        if response.status_code >= 400 and not call.accept_error:
            raise problem_from_response(response)
        return call.parse(response)

    def _retry_delay(
        self, call: _Call[Any], response: httpx.Response, attempt: int
    ) -> float | None:
        if not call.retry:
            return None
        delay = self.retry.delay_after_response(response, attempt)
        if delay is not None:
            log.info(
                "%s %s answered %d; retry %d/%d in %.2f s",
                call.method,
                call.path,
                response.status_code,
                attempt + 1,
                self.retry.max_retries,
                delay,
            )
        return delay

    def _error_delay(self, call: _Call[Any], error: httpx.TransportError, attempt: int) -> float:
        delay = self.retry.delay_after_error(error, attempt) if call.retry else None
        if delay is None:
            raise TransportError(
                f"{call.method} {self.base_url}{call.path} failed: {error!r}"
            ) from error
        log.info("%s %s failed (%r); retry in %.2f s", call.method, call.path, error, delay)
        return delay


class JladClient(_ClientBase):
    """Synchronous client of the jlad service.

    Args:
        base_url: service root (default: `$JLAD_URL`, else http://127.0.0.1:8000).
        api_key: sent as `X-API-Key` (default: `$JLAD_API_KEY`; none when unset).
        model: model name used when a call does not name one (default: the service's).
        timeout: seconds per request (or an `httpx.Timeout`).
        retry: the retry policy (`NO_RETRY` to disable).
        deadline_ms: per-request deadline asked of the service (`X-Deadline-Ms`).
        headers: extra headers for every request.
        transport: an httpx transport (`AsyncJladClient` takes `httpx.ASGITransport(app)` to
            talk to an in-process app).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float | httpx.Timeout = 120.0,
        retry: RetryPolicy | None = None,
        deadline_ms: int | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            model=model,
            timeout=timeout,
            retry=retry or RetryPolicy(),
            deadline_ms=deadline_ms,
            headers=headers,
        )
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> JladClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **call.send_kwargs())
            except httpx.TransportError as error:
                time.sleep(self._error_delay(call, error, attempt))
                attempt += 1
                continue
            delay = self._retry_delay(call, response, attempt)
            if delay is None:
                return self._finish(call, response)
            time.sleep(delay)
            attempt += 1

    def landmarks(self, image: ImageInput, *, model: str | None = None) -> LandmarksResult:
        """`POST /landmarks`: the K landmarks of one image, in its pixels."""
        return self._run(self._landmarks_call(image, model))

    def correspond(
        self,
        source: ImageInput,
        target: ImageInput,
        *,
        model: str | None = None,
        resolution: Resolution = "grid",
        dtype: Literal["float16", "float32"] = "float32",
        points: Sequence[Sequence[float]] | None = None,
        binary: bool = False,
    ) -> CorrespondenceResult:
        """`POST /correspond`: dense flow and confidence from `source` to `target`.

        `resolution` picks the field's grid: the model's cells (`grid`), every source pixel
        (`source`), or every target pixel (`target`, a backward field for warping). `points`
        (N, 2) source pixels get their target matches in `result.matches`. `binary=True`
        fetches the arrays as `.npz` (lossless, smaller; no matches nor timings).
        """
        call = self._correspond_call(
            source,
            target,
            model=model,
            resolution=resolution,
            dtype=dtype,
            points=points,
            binary=binary,
        )
        return self._run(call)

    def correspond_png(
        self, source: ImageInput, target: ImageInput, *, view: View, model: str | None = None
    ) -> bytes:
        """`POST /correspond` with `Accept: image/png`: a picture (`flow`, `confidence`,
        `warped`, `matches`) as PNG bytes."""
        images = [("source", source), ("target", target)]
        return self._run(self._render_call("/correspond", images, view=view, model=model))

    def landmarks_png(
        self, image: ImageInput, *, view: LandmarksView = "landmarks", model: str | None = None
    ) -> bytes:
        """`POST /landmarks` with `Accept: image/png`: the landmarks drawn on the image, or
        the summed heat maps (`view="heatmaps"`)."""
        call = self._render_call("/landmarks", [("image", image)], view=view, model=model)
        return self._run(call)

    def propagate(
        self,
        source: ImageInput,
        mask: MaskInput,
        targets: Sequence[ImageInput],
        *,
        model: str | None = None,
        min_confidence: float | None = None,
        keep_if_neighbours_agree: bool | None = None,
        binary: bool = False,
        refine: Refine | None = None,
    ) -> PropagationResult:
        """`POST /propagate`: carry `mask` (labels of `source`) onto every target.

        The service computes the source's features once for all the targets of one call, so
        send many targets together. Pixels whose match confidence is below `min_confidence`
        become background, unless `keep_if_neighbours_agree` and the source neighbourhood of
        the match carries one label (service defaults when None; see `jlad_client.masks`).
        `refine="colour"`: boundaries moved onto the target's colours
        (`jlad_client.masks.refine_by_colour`; for frames of one video).
        """
        call = self._propagate_call(
            source,
            mask,
            targets,
            model=model,
            min_confidence=min_confidence,
            keep_if_neighbours_agree=keep_if_neighbours_agree,
            binary=binary,
            refine=refine,
        )
        return self._run(call)

    def models(self) -> list[ModelInfo]:
        """`GET /models`: the served models with their manifests."""
        return self._run(self._models_call())

    def health(self) -> dict[str, Any]:
        """`GET /healthz`: raises when the service is not alive."""
        return self._run(self._health_call())

    def ready(self) -> ReadyStatus:
        """`GET /readyz`: whether the service is ready (never raises for a 503)."""
        return self._run(self._ready_call())

    def wait_until_ready(self, timeout_s: float = 60.0, interval_s: float = 0.25) -> ReadyStatus:
        """Poll `/readyz` until it answers 200; raises `TransportError` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last: ReadyStatus | None = None
        while time.monotonic() < deadline:
            try:
                last = self.ready()
                if last.ready:
                    return last
            except TransportError:
                pass
            time.sleep(interval_s)
        raise TransportError(f"{self.base_url} not ready after {timeout_s} s (last: {last})")


class AsyncJladClient(_ClientBase):
    """Asynchronous client of the jlad service; the same methods as `JladClient`, awaited.

    Files are read and images encoded in a worker thread so the event loop stays free.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float | httpx.Timeout = 120.0,
        retry: RetryPolicy | None = None,
        deadline_ms: int | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            model=model,
            timeout=timeout,
            retry=retry or RetryPolicy(),
            deadline_ms=deadline_ms,
            headers=headers,
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncJladClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, **call.send_kwargs())
            except httpx.TransportError as error:
                await asyncio.sleep(self._error_delay(call, error, attempt))
                attempt += 1
                continue
            delay = self._retry_delay(call, response, attempt)
            if delay is None:
                return self._finish(call, response)
            await asyncio.sleep(delay)
            attempt += 1

    async def landmarks(self, image: ImageInput, *, model: str | None = None) -> LandmarksResult:
        """`POST /landmarks` (see `JladClient.landmarks`)."""
        call = await asyncio.to_thread(self._landmarks_call, image, model)
        return await self._run(call)

    async def correspond(
        self,
        source: ImageInput,
        target: ImageInput,
        *,
        model: str | None = None,
        resolution: Resolution = "grid",
        dtype: Literal["float16", "float32"] = "float32",
        points: Sequence[Sequence[float]] | None = None,
        binary: bool = False,
    ) -> CorrespondenceResult:
        """`POST /correspond` (see `JladClient.correspond`)."""
        call = await asyncio.to_thread(
            lambda: self._correspond_call(
                source,
                target,
                model=model,
                resolution=resolution,
                dtype=dtype,
                points=points,
                binary=binary,
            )
        )
        return await self._run(call)

    async def correspond_png(
        self, source: ImageInput, target: ImageInput, *, view: View, model: str | None = None
    ) -> bytes:
        """`POST /correspond` as PNG (see `JladClient.correspond_png`)."""
        images = [("source", source), ("target", target)]
        call = await asyncio.to_thread(
            lambda: self._render_call("/correspond", images, view=view, model=model)
        )
        return await self._run(call)

    async def landmarks_png(
        self, image: ImageInput, *, view: LandmarksView = "landmarks", model: str | None = None
    ) -> bytes:
        """`POST /landmarks` as PNG (see `JladClient.landmarks_png`)."""
        call = await asyncio.to_thread(
            lambda: self._render_call("/landmarks", [("image", image)], view=view, model=model)
        )
        return await self._run(call)

    async def propagate(
        self,
        source: ImageInput,
        mask: MaskInput,
        targets: Sequence[ImageInput],
        *,
        model: str | None = None,
        min_confidence: float | None = None,
        keep_if_neighbours_agree: bool | None = None,
        binary: bool = False,
        refine: Refine | None = None,
    ) -> PropagationResult:
        """`POST /propagate` (see `JladClient.propagate`)."""
        call = await asyncio.to_thread(
            lambda: self._propagate_call(
                source,
                mask,
                targets,
                model=model,
                min_confidence=min_confidence,
                keep_if_neighbours_agree=keep_if_neighbours_agree,
                binary=binary,
                refine=refine,
            )
        )
        return await self._run(call)

    async def models(self) -> list[ModelInfo]:
        """`GET /models`."""
        return await self._run(self._models_call())

    async def health(self) -> dict[str, Any]:
        """`GET /healthz`."""
        return await self._run(self._health_call())

    async def ready(self) -> ReadyStatus:
        """`GET /readyz` (never raises for a 503)."""
        return await self._run(self._ready_call())

    async def wait_until_ready(
        self, timeout_s: float = 60.0, interval_s: float = 0.25
    ) -> ReadyStatus:
        """Poll `/readyz` until it answers 200; raises `TransportError` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last: ReadyStatus | None = None
        while time.monotonic() < deadline:
            try:
                last = await self.ready()
                if last.ready:
                    return last
            except TransportError:
                pass
            await asyncio.sleep(interval_s)
        raise TransportError(f"{self.base_url} not ready after {timeout_s} s (last: {last})")
