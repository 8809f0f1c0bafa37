"""The API's side of the Redis queue (`JLAD_QUEUE=redis`): `RedisDispatcher`.

`submit(job)` adds the job, already decoded and resized, to the shared stream
(`JLAD_REDIS_STREAM`) unless it already holds `JLAD_MAX_QUEUE` jobs (then `QueueFull`, 429);
the workers of the consumer group `JLAD_REDIS_GROUP` (`python -m service.worker`) batch and
run it and write its result to this process's own reply stream, which one background task
reads and hands to the waiting request. Each submission has its own job id, and a job is
answered once: a second reply for it (a job run twice after a worker was presumed dead) is
counted and dropped.

Redis unreachable: `ready` turns false at once (/readyz 503) and submissions fail fast with
`QueueUnavailable` (503); the reply task keeps reconnecting, and when Redis answers again the
dispatcher is ready again. If Redis came back empty (restarted without persistence), the
requests still waiting are answered 503 at once instead of at their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from typing import Any

import anyio
import redis
import redis.asyncio

from service.jobs import (
    DeadlineExceeded,
    InferenceFailed,
    InferenceJob,
    InferenceResult,
    QueueFull,
    ShuttingDown,
)
from service.metrics import ServiceMetrics
from service.redis_codec import PayloadError, decode_result, encode_job
from service.redis_support import (
    F_DEADLINE,
    F_DETAIL,
    F_ENQUEUED,
    F_IMAGES,
    F_JOB,
    F_PAYLOAD,
    F_REPLY,
    F_REQUEST,
    F_STATUS,
    REPLY_OK,
    UNREACHABLE,
    QueueKeys,
    QueueMetrics,
    StreamEntries,
    StreamState,
    async_client,
    is_busy_group,
    read_entries,
    redacted_url,
)
from service.settings import Settings

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # one blocking read of the reply stream
STATE_INTERVAL_S = 2.0  # how often the stream's length and pending count are read
_REMEMBERED_ANSWERS = 4096  # job ids kept to tell a duplicate reply from a late one


class QueueUnavailable(ShuttingDown):
    """Redis cannot be reached, or lost the job: 503, safe to retry."""


class RedisDispatcher:
    """A `Dispatcher` that runs jobs on the workers behind a Redis stream."""

    kind = "redis"

    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.keys = QueueKeys.from_settings(settings)
        self.api_id = uuid.uuid4().hex
        self.reply_key = self.keys.replies(self.api_id)
        self._metrics = metrics or ServiceMetrics()
        self.queue_metrics = QueueMetrics(self._metrics.registry)
        self._client: redis.asyncio.Redis | None = None
        self._reader: redis.asyncio.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[InferenceResult]] = {}
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._accepting = False
        self._closed = False
        self._healthy = False
        self._last_error: str | None = "not connected to Redis yet"
        self._run_id: str | None = None
        self._last_reply_id = b"0-0"
        self._state = StreamState()
        # Moving average of one batch's run time (from replies), for Retry-After estimates.
        self._batch_seconds = 0.2

    # -- Dispatcher interface -------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        timeout_s = self.settings.redis_timeout_ms / 1000
        self._client = async_client(self.settings)
        self._reader = async_client(self.settings, read_timeout_s=READ_BLOCK_MS / 1000 + timeout_s)
        self._accepting = True
        self._task = asyncio.create_task(self._reply_loop(), name="jlad-redis-replies")
        log.info(
            "redis queue: stream %s, group %s, replies %s at %s",
            self.keys.stream,
            self.keys.group,
            self.reply_key,
            redacted_url(self.settings.redis_url),
        )

    @property
    def ready(self) -> bool:
        return (
            self._accepting and self._healthy and self._task is not None and not self._task.done()
        )

    def not_ready_reason(self) -> str:
        if not self._accepting:
            return "the Redis queue is not accepting jobs (starting or shutting down)"
        return (
            f"Redis at {redacted_url(self.settings.redis_url)} is unreachable "
            f"({self._last_error}); retrying"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "accepting": self.ready,
            "redis": redacted_url(self.settings.redis_url),
            "stream": self.keys.stream,
            "group": self.keys.group,
            "reply_stream": self.reply_key,
            "waiting_here": len(self._waiting),
            "queue_length": self._state.length,
            "queue_lag": self._state.lag,
            "queue_pending": self._state.pending,
            "consumers": self._state.consumers,
            "max_queue": self.settings.max_queue,
            "last_error": None if self._healthy else self._last_error,
            **({} if self.ready else {"not_ready_reason": self.not_ready_reason()}),
        }

    def check_room(self) -> None:
        # The stream length known here may be stale (other API processes, workers
        # draining it); the length read with the XADD (`_add`) is the one that decides.
        return

    async def submit(self, job: InferenceJob) -> InferenceResult:
        if not self.ready or self._client is None:
            self._count_rejection("unavailable")
            raise QueueUnavailable(self.not_ready_reason())
        if job.seconds_left() <= 0:
            self._count_rejection("deadline")
            raise DeadlineExceeded("the deadline passed before the job was queued")
        payload = await anyio.to_thread.run_sync(encode_job, job)
        job_id = uuid.uuid4().hex
        future: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        # Registered before the job is added: its reply may arrive before XADD returns.
        self._waiting[job_id] = future
        try:
            queued = await self._add(job_id, job, payload)
            if not queued:
                self._count_rejection("queue_full")
                length = self._state.length
                raise QueueFull(
                    self.retry_after_s(length),
                    f"{length} jobs queued, JLAD_MAX_QUEUE is {self.settings.max_queue}",
                )
            timeout = job.seconds_left()
            try:
                return await asyncio.wait_for(
                    future, timeout=None if math.isinf(timeout) else max(timeout, 0.0)
                )
            except TimeoutError:
                self._count_rejection("deadline")
                raise DeadlineExceeded(
                    f"no result within the deadline ({self._state.length} jobs queued, "
                    f"{self._state.consumers} workers)"
                ) from None
        finally:
            self._waiting.pop(job_id, None)

    async def close(self, grace_s: float) -> None:
        """Stop taking jobs, wait up to `grace_s` for the replies still due, fail the rest."""
        self._accepting = False
        until = time.monotonic() + grace_s
        while self._waiting and time.monotonic() < until and self._task and not self._task.done():
            await asyncio.sleep(0.05)
        self._fail_waiting(ShuttingDown("the service shut down before the result arrived"))
        self._closed = True
        if self._task is not None:
            # A cancellation can get lost inside redis-py (tests saw the loop go on after
            # cancel()); `_closed` ends the loop regardless, and the wait is bounded.
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=READ_BLOCK_MS / 1000 + 1)
        if self._client is not None:
            # Nobody reads this reply stream any more; it would expire anyway.
            with contextlib.suppress(redis.RedisError, OSError):
                await self._client.delete(self.reply_key)
        for client in (self._client, self._reader):
            if client is not None:
                with contextlib.suppress(redis.RedisError, OSError):
                    await client.aclose()

    # -- sizing ---------------------------------------------------------------------------

    def retry_after_s(self, queued: int) -> int:
        """Whole seconds until the workers have likely run `queued` jobs' worth of batches."""
        batches = queued / self.settings.max_batch_size / max(1, self._state.consumers)
        return max(1, math.ceil(batches * self._batch_seconds))

    # -- adding jobs ----------------------------------------------------------------------

    async def _add(self, job_id: str, job: InferenceJob, payload: bytes) -> bool:
        """Add the job to the stream unless it is full; True if added."""
        assert self._client is not None
        fields: dict[bytes, bytes | str] = {
            F_JOB: job_id,
            F_REPLY: self.reply_key,
            F_DEADLINE: repr(job.deadline),
            F_ENQUEUED: repr(time.time()),
            F_REQUEST: job.request_id,
            F_IMAGES: str(job.num_images),
            F_PAYLOAD: payload,
        }
        # The length and the addition in one transaction, and the entry taken back when the
        # stream was already full: a Lua script that refused first took ~0.5 ms of Redis's
        # CPU per job, because every argument it gets (the ~200 KB payload) becomes a Lua
        # string (bench.ceiling, 2 cores: Redis 0.65 -> 0.2 ms per request). Workers read
        # oldest first, so an entry taken back is read only if every entry before it is
        # already held by a worker and another worker waits: then the job runs, its reply
        # is dropped as late, and the client still got its 429. No MAXLEN: trimming would
        # drop queued jobs.
        pipe = self._client.pipeline(transaction=True)
        pipe.xlen(self.keys.stream)
        pipe.xadd(self.keys.stream, fields)  # type: ignore[arg-type]
        try:
            length, entry_id = await pipe.execute()
            if length >= self.settings.max_queue:
                await self._client.xdel(self.keys.stream, entry_id)
        except UNREACHABLE as exc:
            self._mark_down(exc)
            self._count_rejection("unavailable")
            raise QueueUnavailable(self.not_ready_reason()) from None
        except redis.ResponseError as exc:
            # e.g. OOM (maxmemory reached): the queue cannot take the job now.
            self._count_rejection("unavailable")
            raise QueueUnavailable(f"Redis refused the job: {exc}") from None
        queued = int(length) < self.settings.max_queue
        self._state.length = int(length) + 1 if queued else int(length)
        return queued

    # -- replies --------------------------------------------------------------------------

    async def _reply_loop(self) -> None:
        """Read this process's reply stream for as long as the dispatcher lives."""
        assert self._reader is not None and self._client is not None
        backoff = 0.1
        state_read_at = 0.0
        while not self._closed:
            try:
                if not self._healthy:
                    await self._connect()
                    backoff = 0.1
                answer = await self._reader.xread(
                    {self.reply_key: self._last_reply_id}, count=256, block=READ_BLOCK_MS
                )
                entries = read_entries(answer)
                if entries:
                    self._deliver(entries)
                    self._last_reply_id = entries[-1][0]
                    await self._client.xdel(self.reply_key, *(entry_id for entry_id, _ in entries))
                if time.monotonic() - state_read_at >= STATE_INTERVAL_S:
                    await self._read_state()
                    state_read_at = time.monotonic()
            except asyncio.CancelledError:
                raise
            except (*UNREACHABLE, redis.RedisError) as exc:
                if self._closed:
                    return
                self._mark_down(exc)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
            except Exception as exc:
                if self._closed:
                    return
                log.exception("redis queue: reply loop error")
                self._mark_down(exc)
                await asyncio.sleep(1.0)

    async def _connect(self) -> None:
        """Check Redis answers, notice a restart, make sure the consumer group exists."""
        assert self._client is not None
        try:
            run_id = str((await self._client.info("server")).get("run_id", ""))
        except redis.ResponseError:  # INFO not allowed by an ACL: no restart detection
            run_id = str(await self._client.ping())
        if self._run_id is not None and run_id != self._run_id:
            lost = sum(not f.done() for f in self._waiting.values())
            log.warning("redis queue: Redis restarted empty; %d waiting requests lost", lost)
            self._fail_waiting(
                QueueUnavailable("Redis restarted and lost the queued job; retry the request")
            )
            self._last_reply_id = b"0-0"
        self._run_id = run_id
        try:
            await self._client.xgroup_create(
                self.keys.stream, self.keys.group, id="0", mkstream=True
            )
        except redis.ResponseError as exc:
            if not is_busy_group(exc):
                raise
        if not self._healthy:
            log.info("redis queue: connected to %s", redacted_url(self.settings.redis_url))
        self._healthy = True
        self._last_error = None
        self.queue_metrics.redis_up.set(1)

    def _deliver(self, entries: StreamEntries) -> None:
        """Answer the waiting requests the replies in `entries` are for, each once."""
        for _, fields in entries:
            job_id = fields.get(F_JOB, b"").decode(errors="replace")
            future = self._waiting.get(job_id)
            if job_id in self._answered:
                self.queue_metrics.replies.labels("duplicate").inc()
                continue
            if future is None or future.done():
                self.queue_metrics.replies.labels("late").inc()
                continue
            self._remember_answered(job_id)
            self.queue_metrics.replies.labels("delivered").inc()
            status = fields.get(F_STATUS, b"")
            detail = fields.get(F_DETAIL, b"").decode(errors="replace")
            if status != REPLY_OK:
                future.set_exception(InferenceFailed(detail or status.decode(errors="replace")))
                continue
            try:
                result = decode_result(fields.get(F_PAYLOAD, b""))
            except PayloadError as exc:
                future.set_exception(InferenceFailed(f"unreadable reply from a worker: {exc}"))
                continue
            batch_ms = result.timings_ms.get("backbone_ms", 0.0) + result.timings_ms.get(
                "heads_ms", 0.0
            )
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * batch_ms / 1000
            future.set_result(result)

    async def _read_state(self) -> None:
        assert self._client is not None
        length = await self._client.xlen(self.keys.stream)
        try:
            groups = await self._client.xinfo_groups(self.keys.stream)
        except redis.ResponseError:  # the stream vanished (Redis restarted)
            groups = []
        self._state = StreamState.parse(length, groups, self.keys.group)
        self.queue_metrics.observe_state(self._state)
        self._metrics.queue_depth.set(self._state.lag)

    # -- bookkeeping ----------------------------------------------------------------------

    def _mark_down(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if self._healthy:
            log.warning("redis queue: Redis unreachable (%s)", message)
        self._healthy = False
        self._last_error = message
        self.queue_metrics.redis_up.set(0)

    def _fail_waiting(self, exc: Exception) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)

    def _remember_answered(self, job_id: str) -> None:
        self._answered[job_id] = None
        while len(self._answered) > _REMEMBERED_ANSWERS:
            self._answered.popitem(last=False)

    def _count_rejection(self, reason: str) -> None:
        self._metrics.rejected.labels(reason).inc()
