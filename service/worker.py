"""`python -m service.worker`: an inference worker of the Redis queue (`JLAD_QUEUE=redis`).

A worker owns the ONNX Runtime sessions (`service.runtime`, the same code the in-process
batcher runs) and loops: take back jobs a silent worker left behind (`XAUTOCLAIM` after
`JLAD_REDIS_CLAIM_IDLE_MS`), read new ones through the consumer group (`XREADGROUP`) until
`JLAD_MAX_BATCH_SIZE` images are gathered or `JLAD_MAX_WAIT_MS` passed since the first,
run them as one batch, and in one transaction write each result to the reply stream of the
API process waiting for it, acknowledge and delete the entries. Jobs whose deadline passed
are acknowledged without running (they take no batch slot); a job delivered more than
`JLAD_REDIS_MAX_DELIVERIES` times is answered with an error (dead-lettered), never dropped.

While a batch runs, the worker renews its claim on the batch's entries so that a slow batch
is not taken over. On SIGTERM it reads nothing new, finishes and acknowledges what it holds
(within `JLAD_SHUTDOWN_GRACE_S`), leaves the consumer group and exits 0.

For its probes it answers `GET /healthz`, `GET /readyz` and `GET /metrics` on
`JLAD_HOST:JLAD_PORT`, like the API.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import redis

from service.heap import freeze_startup_heap
from service.jobs import InferenceJob, InferenceResult
from service.logs import configure_logging
from service.metrics import ServiceMetrics
from service.priority import lower_current_thread
from service.problems import NOT_FOUND, NOT_READY, PROBLEM_MEDIA_TYPE, problem_body
from service.redis_codec import PayloadError, decode_job, encode_result
from service.redis_support import (
    DEAD_LETTER_MAXLEN,
    DEAD_LETTER_TTL_S,
    F_DEADLINE,
    F_DETAIL,
    F_ENQUEUED,
    F_IMAGES,
    F_JOB,
    F_PAYLOAD,
    F_REPLY,
    F_REQUEST,
    F_STATUS,
    F_WORKER,
    REPLY_DEAD,
    REPLY_FAILED,
    REPLY_OK,
    UNREACHABLE,
    QueueKeys,
    QueueMetrics,
    StreamEntries,
    StreamState,
    is_busy_group,
    is_missing_group,
    read_entries,
    redacted_url,
    reply_maxlen,
    reply_ttl_s,
    sync_client,
)
from service.runtime import ModelLoadError, find_models, load_engine
from service.settings import Settings

log = logging.getLogger("service.worker")

BatchRunner = Callable[[Sequence[InferenceJob]], list[InferenceResult]]
# An idle worker's blocking read (returns at once when a job arrives); with Redis's 100 ms
# timeout granularity it bounds how fast an idle worker notices SIGTERM (~0.6 s).
IDLE_BLOCK_MS = 500
STATE_INTERVAL_S = 2.0  # stream state for the metrics, and clean-up of departed workers
CONSUMER_TTL_MS = 300_000  # a consumer silent this long, holding nothing, has gone


class WorkerAbandoned(RuntimeError):
    """The shutdown grace period ended while a batch was still running."""


@dataclass
class Delivery:
    """One stream entry this worker holds: a job to run, or why it cannot be run."""

    entry_id: bytes
    job_id: str
    reply_key: str
    request_id: str
    deadline: float
    enqueued: float
    images: int
    job: InferenceJob | None
    problem: str | None = None
    deliveries: int = 1

    @classmethod
    def parse(cls, entry_id: bytes, fields: dict[bytes, bytes]) -> Delivery:
        """Read an entry the API added; never raises (a bad entry gets a `problem`)."""

        def text(name: bytes) -> str:
            return fields.get(name, b"").decode(errors="replace")

        delivery = cls(entry_id, text(F_JOB), text(F_REPLY), text(F_REQUEST), 0.0, 0.0, 1, None)
        try:
            delivery.deadline = float(text(F_DEADLINE))
            delivery.enqueued = float(text(F_ENQUEUED))
            delivery.images = max(1, int(text(F_IMAGES)))
            delivery.job = decode_job(
                fields.get(F_PAYLOAD, b""),
                deadline=delivery.deadline,
                request_id=delivery.request_id,
            )
        except (ValueError, PayloadError) as exc:
            delivery.deadline = math.inf  # unreadable, but still owed an answer
            delivery.problem = f"the queued job is unreadable: {exc}"
        return delivery

    def expired(self, now: float) -> bool:
        return self.deadline <= now


class Worker:
    """Reads jobs from the stream through the consumer group, runs and answers them.

    `runner(jobs)` returns one result per job, in order (`InferenceEngine.run_batch`);
    `models`, when given, are the model names it can run (others get an error reply).
    The steps are public so that tests can drive one batch at a time: `collect_batch`
    then `process`; `run` loops over them until `stop` is set.
    """

    def __init__(
        self,
        settings: Settings,
        runner: BatchRunner,
        metrics: ServiceMetrics,
        *,
        consumer: str | None = None,
        models: Collection[str] | None = None,
    ) -> None:
        self.settings = settings
        self.keys = QueueKeys.from_settings(settings)
        self.runner = runner
        self.models = None if models is None else frozenset(models)
        self.metrics = metrics
        self.queue_metrics = QueueMetrics(metrics.registry)
        self.consumer = consumer or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.client = sync_client(
            settings, read_timeout_s=IDLE_BLOCK_MS / 1000 + settings.redis_timeout_ms / 1000
        )
        self.healthy = False
        self.last_error: str | None = "not connected to Redis yet"
        self.batches_run = 0
        self._executor = ThreadPoolExecutor(
            1,
            thread_name_prefix="jlad-worker-infer",
            initializer=lower_current_thread,
            initargs=(settings.inference_nice,),
        )
        self._carry: list[Delivery] = []  # read but not yet run (did not fit the batch)
        self._claim_cursor = b"0-0"
        self._claimed_at = 0.0
        self._state_read_at = 0.0
        self._run_id: str | None = None
        self._stop: threading.Event | None = None
        self._give_up_at: float | None = None

    # -- public steps ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.healthy and not (self._stop is not None and self._stop.is_set())

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "redis-worker",
            "consumer": self.consumer,
            "redis": redacted_url(self.settings.redis_url),
            "stream": self.keys.stream,
            "group": self.keys.group,
            "max_batch_size": self.settings.max_batch_size,
            "max_wait_ms": self.settings.max_wait_ms,
            "batches_run": self.batches_run,
            "last_error": None if self.healthy else self.last_error,
        }

    def connect(self) -> None:
        """Check Redis answers, notice a restart, make sure the consumer group exists."""
        try:
            run_id = str(self.client.info("server").get("run_id", ""))
        except redis.ResponseError:  # INFO not allowed by an ACL: no restart detection
            run_id = str(self.client.ping())
        if self._run_id is not None and run_id != self._run_id:
            log.warning("Redis restarted empty; forgetting %d held jobs", len(self._carry))
            self._carry.clear()
            self._claim_cursor = b"0-0"
        self._run_id = run_id
        try:
            self.client.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not is_busy_group(exc):
                raise
        if not self.healthy:
            log.info(
                "worker %s reading %s (group %s) at %s",
                self.consumer,
                self.keys.stream,
                self.keys.group,
                redacted_url(self.settings.redis_url),
            )
        self.healthy = True
        self.last_error = None
        self.queue_metrics.redis_up.set(1)

    def collect_batch(self, stop: threading.Event | None = None) -> list[Delivery]:
        """The next batch: held-over and taken-over jobs first, then new ones.

        Jobs already queued gather for up to max_wait_ms more, until max_batch_size images
        are gathered. With none queued it waits up to IDLE_BLOCK_MS for one (returns [] if
        none came); jobs that find the worker idle like this run at once, as in the
        in-process batcher (`service.batching`): waiting for company would add max_wait_ms
        to every request of a client that sends one at a time. Expired and unreadable
        entries are finished on the way and take no room.
        """
        capacity = self.settings.max_batch_size
        batch: list[Delivery] = []
        held, self._carry = self._carry, []
        if time.monotonic() - self._claimed_at >= self._claim_interval_s():
            held += self._take_over_abandoned()
        images = self._fill(batch, 0, held)
        gather_until = time.monotonic() + self.settings.max_wait_ms / 1000 if batch else None
        idle = False
        while images < capacity and not (stop is not None and stop.is_set()):
            if gather_until is None:
                fresh = self._read_new(capacity - images, None)
                idle = not fresh
                if idle:
                    fresh = self._read_new(capacity - images, IDLE_BLOCK_MS)
                    if not fresh:
                        break
            else:
                # Redis checks BLOCK timeouts only on its cron tick (every 100 ms at the
                # default hz 10), so a short BLOCK would overshoot max_wait: poll instead.
                remaining = gather_until - time.monotonic()
                if remaining <= 0:
                    break
                fresh = self._read_new(capacity - images, None)
                if not fresh:
                    time.sleep(min(remaining, self._gather_poll_s()))
            images = self._fill(batch, images, fresh)
            if batch and idle:
                break  # it found the worker idle: no waiting for company
            if batch and gather_until is None:
                gather_until = time.monotonic() + self.settings.max_wait_ms / 1000
        return batch

    def process(self, batch: list[Delivery]) -> None:
        """Run `batch` and answer every job of it; expired jobs are finished unrun."""
        if not batch:
            return
        now = time.time()
        expired = [d for d in batch if d.expired(now)]
        live = [d for d in batch if not d.expired(now)]
        if expired:
            self._finish(expired)
            self.queue_metrics.expired.inc(len(expired))
        if not live:
            return
        for delivery in live:
            self.queue_metrics.wait_seconds.observe(max(0.0, now - delivery.enqueued))
        self.queue_metrics.batch_sources.observe(len({d.reply_key for d in live}))
        outcomes: list[InferenceResult | str] = [self._refusal(d) for d in live]
        runnable = [i for i, d in enumerate(live) if not outcomes[i]]
        if runnable:
            started = time.monotonic()
            for i, outcome in zip(runnable, self._run([live[i] for i in runnable]), strict=True):
                outcomes[i] = outcome
            self._observe_batch([live[i] for i in runnable], time.monotonic() - started)
            self.batches_run += 1
        replies = []
        for delivery, outcome in zip(live, outcomes, strict=True):
            if isinstance(outcome, InferenceResult):
                outcome.timings_ms["queue_ms"] = max(0.0, now - delivery.enqueued) * 1000
                fields = {F_STATUS: REPLY_OK, F_PAYLOAD: encode_result(outcome)}
            else:
                self.queue_metrics.failed.inc()
                fields = {F_STATUS: REPLY_FAILED, F_DETAIL: outcome.encode()}
            replies.append((delivery, fields))
        self._finish(live, replies)

    def run(self, stop: threading.Event) -> None:
        """Collect and process batches until `stop` is set, then finish what is held."""
        self._stop = stop
        backoff = 0.1
        while not stop.is_set():
            try:
                if not self.healthy:
                    self.connect()
                    backoff = 0.1
                self.process(self.collect_batch(stop))
                self._housekeeping()
            except WorkerAbandoned:
                raise
            except redis.ResponseError as exc:
                self._mark_down(exc)
                if not is_missing_group(exc):  # NOGROUP: connect() recreates it at once
                    log.exception("worker: Redis refused a command")
                    stop.wait(1.0)
            except UNREACHABLE as exc:
                self._mark_down(exc)
                stop.wait(backoff)
                backoff = min(1.0, backoff * 2)
        self._finish_held()
        self._leave_group()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -- reading --------------------------------------------------------------------------

    def _claim_interval_s(self) -> float:
        return min(5.0, max(0.1, self.settings.redis_claim_idle_ms / 2000))

    def _gather_poll_s(self) -> float:
        return min(0.01, max(0.001, self.settings.max_wait_ms / 10_000))

    def _read_new(self, count: int, block_ms: int | None) -> list[Delivery]:
        answer = self.client.xreadgroup(
            self.keys.group, self.consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        return [Delivery.parse(entry_id, fields) for entry_id, fields in read_entries(answer)]

    def _take_over_abandoned(self) -> list[Delivery]:
        """Claim entries left unacknowledged for claim_idle_ms; dead-letter worn-out ones."""
        self._claimed_at = time.monotonic()
        answer: Any = self.client.xautoclaim(
            self.keys.stream,
            self.keys.group,
            self.consumer,
            min_idle_time=self.settings.redis_claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.settings.max_batch_size,
        )
        # [next cursor, claimed entries, ids of entries deleted meanwhile (Redis >= 7)]
        self._claim_cursor = answer[0]
        entries: StreamEntries = [(entry_id, fields) for entry_id, fields in answer[1] if fields]
        if not entries:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self.keys.stream, self.keys.group, entry_id, entry_id, 1)
        counts = pipe.execute()
        taken, worn_out = [], []
        for (entry_id, fields), pending in zip(entries, counts, strict=True):
            delivery = Delivery.parse(entry_id, fields)
            delivery.deliveries = int(pending[0]["times_delivered"]) if pending else 1
            if delivery.deliveries > self.settings.redis_max_deliveries:
                worn_out.append(delivery)
            else:
                taken.append(delivery)
        self.queue_metrics.claimed.inc(len(entries))
        self.queue_metrics.retried.inc(len(taken))
        log.warning(
            "took over %d jobs from silent workers (%d dead-lettered)", len(entries), len(worn_out)
        )
        if worn_out:
            limit = self.settings.redis_max_deliveries
            self._dead_letter(
                worn_out,
                f"gave up after {limit} attempts: the workers running this job stopped "
                "before answering",
                "deliveries",
            )
        return taken

    def _fill(self, batch: list[Delivery], images: int, candidates: list[Delivery]) -> int:
        """Move candidates into `batch` while they fit; returns the batch's image count."""
        now = time.time()
        expired = [d for d in candidates if d.problem is None and d.expired(now)]
        unreadable = [d for d in candidates if d.problem is not None]
        if expired:
            self._finish(expired)
            self.queue_metrics.expired.inc(len(expired))
        if unreadable:
            for delivery in unreadable:
                log.error("dead-lettering entry %r: %s", delivery.entry_id, delivery.problem)
                self._dead_letter([delivery], delivery.problem or "unreadable", "unreadable")
        for delivery in candidates:
            if delivery.problem is not None or delivery.expired(now):
                continue
            if not batch or images + delivery.images <= self.settings.max_batch_size:
                batch.append(delivery)
                images += delivery.images
            else:
                self._carry.append(delivery)
        return images

    # -- running --------------------------------------------------------------------------

    def _refusal(self, delivery: Delivery) -> str:
        """Why this worker cannot run the job ('' if it can)."""
        model = delivery.job.model if delivery.job is not None else "?"
        if self.models is None or model in self.models:
            return ""
        return (
            f"worker {self.consumer} does not serve model '{model}' (it serves "
            f"{', '.join(sorted(self.models))}); every worker must serve every model the API does"
        )

    def _run(self, live: list[Delivery]) -> list[InferenceResult | str]:
        """One result or error message per delivery; a failed batch is retried job by job
        so that one bad job fails alone."""
        jobs = [d.job for d in live if d.job is not None]
        try:
            results = self._run_renewing_claims(jobs, [d.entry_id for d in live])
            if len(results) != len(jobs):
                raise RuntimeError(f"runner returned {len(results)} results for {len(jobs)} jobs")
        except WorkerAbandoned:
            raise
        except Exception as exc:
            if len(live) == 1:
                log.exception("job %s failed", live[0].request_id or live[0].job_id)
                return [f"{type(exc).__name__}: {exc}"]
            log.warning("batch of %d jobs failed (%s); running them one by one", len(live), exc)
            return [self._run([d])[0] for d in live]
        images = sum(j.num_images for j in jobs)
        for result in results:
            result.batch_jobs = len(jobs)
            result.batch_images = images
        return list(results)

    def _run_renewing_claims(
        self, jobs: list[InferenceJob], entry_ids: list[bytes]
    ) -> list[InferenceResult]:
        """`runner(jobs)` on the inference thread; meanwhile keep the entries claimed."""
        future = self._executor.submit(self.runner, jobs)
        renew_s = max(0.05, self.settings.redis_claim_idle_ms / 3000)
        while True:
            try:
                return future.result(timeout=renew_s)
            except FutureTimeout:
                pass
            if self._stop is not None and self._stop.is_set():
                grace = self.settings.shutdown_grace_s
                self._give_up_at = self._give_up_at or time.monotonic() + grace
                if time.monotonic() > self._give_up_at:
                    raise WorkerAbandoned(f"batch still running after {grace} s of grace")
            try:
                # JUSTID: resets the entries' idle time without counting a delivery.
                self.client.xclaim(
                    self.keys.stream,
                    self.keys.group,
                    self.consumer,
                    min_idle_time=0,
                    message_ids=[*entry_ids, *(d.entry_id for d in self._carry)],
                    justid=True,
                )
            except redis.RedisError as exc:
                log.warning("could not renew the claim on the running batch: %s", exc)

    def _observe_batch(self, live: list[Delivery], seconds: float) -> None:
        by_model: dict[str, list[InferenceJob]] = {}
        for delivery in live:
            if delivery.job is not None:
                by_model.setdefault(delivery.job.model, []).append(delivery.job)
        for model, jobs in by_model.items():
            self.metrics.observe_batch(model, len(jobs), sum(j.num_images for j in jobs), seconds)

    # -- answering ------------------------------------------------------------------------

    def _finish(
        self,
        done: Sequence[Delivery],
        replies: Sequence[tuple[Delivery, dict[bytes, bytes]]] = (),
        dead: Sequence[tuple[Delivery, str]] = (),
    ) -> None:
        """In one transaction: write the replies (and dead-letter records), then acknowledge
        and delete the entries. A worker dying before this leaves them to be taken over."""
        pipe = self.client.pipeline(transaction=True)
        reply_keys: dict[str, None] = {}
        for delivery, fields in replies:
            if not delivery.reply_key:
                continue
            reply_keys[delivery.reply_key] = None
            reply: dict[bytes, bytes | str] = {
                F_JOB: delivery.job_id,
                F_WORKER: self.consumer,
                **fields,
            }
            pipe.xadd(
                delivery.reply_key,
                reply,  # type: ignore[arg-type]
                maxlen=reply_maxlen(self.settings),
                approximate=True,
            )
        # once per reply stream: a batch's replies mostly go to a few API processes
        for key in reply_keys:
            pipe.expire(key, reply_ttl_s(self.settings))
        for delivery, reason in dead:
            record = {
                F_JOB: delivery.job_id,
                F_REQUEST: delivery.request_id,
                F_REPLY: delivery.reply_key,
                b"entry": delivery.entry_id,
                b"deliveries": str(delivery.deliveries),
                F_DETAIL: reason,
                F_WORKER: self.consumer,
                b"time": repr(time.time()),
            }
            pipe.xadd(
                self.keys.dead_letters,
                record,  # type: ignore[arg-type]
                maxlen=DEAD_LETTER_MAXLEN,
                approximate=True,
            )
            pipe.expire(self.keys.dead_letters, DEAD_LETTER_TTL_S)
        ids = [d.entry_id for d in done]
        pipe.xack(self.keys.stream, self.keys.group, *ids)
        pipe.xdel(self.keys.stream, *ids)
        pipe.execute()

    def _dead_letter(self, deliveries: list[Delivery], reason: str, kind: str) -> None:
        fields = {F_STATUS: REPLY_DEAD, F_DETAIL: reason.encode()}
        self._finish(
            deliveries, [(d, fields) for d in deliveries], [(d, reason) for d in deliveries]
        )
        self.queue_metrics.dead_lettered.labels(kind).inc(len(deliveries))

    # -- upkeep and shutdown --------------------------------------------------------------

    def _housekeeping(self) -> None:
        """Every few seconds: the stream's state for the metrics; forget departed workers."""
        if time.monotonic() - self._state_read_at < STATE_INTERVAL_S:
            return
        self._state_read_at = time.monotonic()
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.keys.stream)
        pipe.xinfo_groups(self.keys.stream)
        pipe.xinfo_consumers(self.keys.stream, self.keys.group)
        length, groups, consumers = pipe.execute()
        state = StreamState.parse(length, groups, self.keys.group)
        self.queue_metrics.observe_state(state)
        self.metrics.queue_depth.set(state.lag)
        for consumer in consumers:
            name = consumer["name"].decode()
            # A consumer holding nothing and silent for minutes was a worker that died;
            # deleting one that holds entries would orphan them, so those are kept.
            gone = consumer["pending"] == 0 and consumer["idle"] > CONSUMER_TTL_MS
            if gone and name != self.consumer:
                self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, name)
                log.info("removed departed worker %s from the group", name)

    def _finish_held(self) -> None:
        """On shutdown: run what was read but not yet run (held over from the last batch)."""
        while self._carry and self.healthy:
            batch: list[Delivery] = []
            held, self._carry = self._carry, []
            self._fill(batch, 0, held)
            try:
                self.process(batch)
            except (*UNREACHABLE, redis.RedisError) as exc:
                log.warning("could not finish held jobs on shutdown (%s); others will", exc)
                return

    def _leave_group(self) -> None:
        """Remove this consumer from the group if it holds nothing (else others claim)."""
        try:
            held = self.client.xpending_range(
                self.keys.stream, self.keys.group, "-", "+", 1, consumername=self.consumer
            )
            if not held:
                self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, self.consumer)
        except (*UNREACHABLE, redis.RedisError) as exc:
            log.info("could not leave the consumer group (%s)", exc)

    def _mark_down(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if self.healthy:
            log.warning("worker: Redis unreachable (%s)", message)
        self.healthy = False
        self.last_error = message
        self.queue_metrics.redis_up.set(0)


# -- probes -------------------------------------------------------------------------------


class ProbeServer:
    """`/healthz`, `/readyz` and `/metrics` on a small threaded HTTP server."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: ServiceMetrics,
        readiness: Callable[[], tuple[bool, str, dict[str, Any]]],
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        handler = self._handler_class()
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="jlad-worker-probes", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, "application/json", {"status": "ok"})
                elif path == "/readyz":
                    ready, reason, details = probes.readiness()
                    if ready:
                        self._send(200, "application/json", {"status": "ready", **details})
                    else:
                        body = problem_body(NOT_READY, reason, path, **details)
                        self._send(503, PROBLEM_MEDIA_TYPE, body, {"Retry-After": "5"})
                elif path == "/metrics":
                    self._send_bytes(200, probes.metrics.content_type, probes.metrics.render())
                else:
                    detail = f"no route GET {path}; a worker answers /healthz, /readyz, /metrics"
                    self._send(404, PROBLEM_MEDIA_TYPE, problem_body(NOT_FOUND, detail, path))

            def _send(
                self,
                status: int,
                media_type: str,
                body: dict[str, Any],
                headers: dict[str, str] | None = None,
            ) -> None:
                self._send_bytes(status, media_type, json.dumps(body).encode(), headers)

            def _send_bytes(
                self,
                status: int,
                media_type: str,
                data: bytes,
                headers: dict[str, str] | None = None,
            ) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the logs

        return Handler


# -- entry point --------------------------------------------------------------------------


def main() -> int:
    settings = Settings()
    configure_logging(settings.log_level)
    metrics = ServiceMetrics()
    stop = threading.Event()
    holder: dict[str, Worker] = {}

    def readiness() -> tuple[bool, str, dict[str, Any]]:
        worker = holder.get("worker")
        if stop.is_set():
            return False, "the worker is shutting down", {}
        if worker is None:
            return False, "models are still loading and warming up", {}
        if not worker.ready:
            reason = f"Redis unreachable ({worker.last_error}); retrying"
            return False, reason, {"worker": worker.describe()}
        return True, "", {"worker": worker.describe()}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    probes = ProbeServer(settings.host, settings.port, metrics, readiness)
    probes.start()
    log.info("worker probes on http://%s:%d", settings.host, probes.port)
    try:
        engine = load_engine(find_models(settings.model_dir, settings.models), settings, metrics)
    except ModelLoadError as exc:
        log.error("cannot load the models: %s", exc)
        probes.stop()
        return 1
    worker = Worker(settings, engine.run_batch, metrics, models=list(engine.models))
    freeze_startup_heap()
    holder["worker"] = worker
    metrics.ready.set(1)
    try:
        worker.run(stop)
        log.info("stopped after %d batches", worker.batches_run)
    except WorkerAbandoned as exc:
        log.error("%s; its jobs will be taken over by another worker", exc)
        logging.shutdown()
        # The inference thread is still busy and would be joined at exit: leave at once.
        os._exit(1)
    finally:
        metrics.ready.set(0)
        probes.stop()
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
