"""The in-process dynamic batcher: concurrent requests share one model run.

Jobs wait in a bounded queue. A batch starts with the oldest job and takes the following jobs
of the same model until `max_batch_size` images are gathered or the oldest job has waited
`max_wait_s`; it then runs on one background thread (so the event loop keeps serving) while
the next batch gathers. A job that finds the batcher idle (no job waiting, no batch running)
runs at once: waiting for companions only pays when traffic is dense, and at low load it
would add `max_wait_s` to every request. Idle, not "no arrival in the last `max_wait_s`": a
client that sends its next request as soon as the last one is answered arrives within that
window whenever the model is fast (a GPU, the bench's null model), and half of its requests
waited the whole window (bench.ceiling, c=1). Every accepted job ends in exactly one way: its
result, `DeadlineExceeded`, `InferenceFailed` or `ShuttingDown`; none is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from service.jobs import (
    DeadlineExceeded,
    InferenceFailed,
    InferenceJob,
    InferenceResult,
    QueueFull,
    ShuttingDown,
)
from service.metrics import ServiceMetrics
from service.priority import lower_current_thread

log = logging.getLogger(__name__)

BatchRunner = Callable[[Sequence[InferenceJob]], list[InferenceResult]]


# eq=False: identity comparison. The generated __eq__ would compare the jobs' numpy arrays
# (slow, and ambiguous-truth errors) whenever an entry is looked up in the queue.
# repr=False: the generated __repr__ prints the job's images and the result's arrays.
@dataclass(eq=False, repr=False)
class _Entry:
    job: InferenceJob
    future: asyncio.Future[InferenceResult]
    enqueued: float  # time.monotonic()
    idle_before: bool = False  # it found no job waiting and no batch running


class Batcher:
    """A `Dispatcher` that groups jobs into batches and runs them with `runner`.

    `runner(jobs)` must return one result per job, in order; it runs on a worker thread.
    """

    kind = "local"

    def __init__(
        self,
        runner: BatchRunner,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: ServiceMetrics | None = None,
        inference_nice: int = 0,
    ) -> None:
        self._runner = runner
        self.inference_nice = inference_nice
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._pending: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False
        self._closing = False
        self._running: list[_Entry] = []
        # Moving average of one batch's run time, for Retry-After estimates.
        self._batch_seconds = 0.05
        self.batches_run = 0

    # -- Dispatcher interface -------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        # the thread that calls the runner computes too (ONNX Runtime's calling thread
        # takes a share of each operator): it runs at the pool threads' priority
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="jlad-infer",
            initializer=lower_current_thread,
            initargs=(self.inference_nice,),
        )
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="jlad-batcher")
        self._task.add_done_callback(self._log_loop_exit)

    @property
    def ready(self) -> bool:
        return self._accepting and self._task is not None and not self._task.done()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "accepting": self.ready,
            "queue_depth": len(self._pending),
            "running_jobs": len(self._running),
            "max_queue": self.max_queue,
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait_s * 1000,
            "batches_run": self.batches_run,
        }

    def check_room(self) -> None:
        if len(self._pending) >= self.max_queue:
            self._count_rejection("queue_full")
            raise QueueFull(self.retry_after_s(), f"{len(self._pending)} jobs already waiting")

    async def submit(self, job: InferenceJob) -> InferenceResult:
        if not self.ready:
            raise ShuttingDown("the batcher is not accepting jobs (starting or shutting down)")
        if job.seconds_left() <= 0:
            self._count_rejection("deadline")
            raise DeadlineExceeded("the deadline passed before the job was queued")
        self.check_room()
        now = time.monotonic()
        idle = not self._pending and not self._running
        entry = _Entry(job, asyncio.get_running_loop().create_future(), now, idle)
        self._pending.append(entry)
        self._update_depth()
        self._wakeup.set()
        try:
            # wait_for cancels the future on timeout; the loop skips cancelled entries.
            return await asyncio.wait_for(entry.future, timeout=max(job.seconds_left(), 0.0))
        except TimeoutError:
            self._count_rejection("deadline")
            raise DeadlineExceeded(
                f"no result within the deadline ({len(self._pending)} jobs waiting)"
            ) from None
        finally:
            self._forget(entry)

    async def close(self, grace_s: float) -> None:
        """Stop taking jobs, run those already queued for up to `grace_s`, fail the rest."""
        self._accepting = False
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=grace_s)
            except TimeoutError:
                log.warning("batcher: grace period over, failing %d jobs", self._unfinished())
                self._task.cancel()
        for entry in [*self._pending, *self._running]:
            if not entry.future.done():
                entry.future.set_exception(ShuttingDown("the service shut down"))
        self._pending.clear()
        self._update_depth()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- sizing ---------------------------------------------------------------------------

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely drained one batch's worth."""
        waiting_images = sum(e.job.num_images for e in self._pending)
        batches = waiting_images / self.max_batch_size + 1
        return max(1, math.ceil(batches * self._batch_seconds))

    # -- the loop -------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0]
            await self._gather(first)
            batch = self._take_batch(first.job.model)
            if batch:
                await self._run(batch)

    async def _gather(self, first: _Entry) -> None:
        """Wait until a full batch for `first`'s model is queued or `first` waited enough
        (not at all when `first` found the batcher idle and is still alone)."""
        if first.idle_before and len(self._pending) == 1:
            return
        fire_at = first.enqueued + self.max_wait_s
        while not self._closing and self._queued_images(first.job.model) < self.max_batch_size:
            remaining = fire_at - time.monotonic()
            if remaining <= 0 or first.future.done():
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _queued_images(self, model: str) -> int:
        return sum(
            e.job.num_images for e in self._pending if e.job.model == model and not e.future.done()
        )

    def _take_batch(self, model: str) -> list[_Entry]:
        """Remove and return the oldest live jobs of `model` that fit in one batch.

        Jobs whose deadline already passed are failed here rather than run.
        """
        now = time.time()
        batch: list[_Entry] = []
        images = 0
        kept: deque[_Entry] = deque()
        for entry in self._pending:
            if entry.future.done():
                continue
            if entry.job.seconds_left(now) <= 0:
                self._count_rejection("deadline")
                entry.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            fits = images + entry.job.num_images <= self.max_batch_size
            if entry.job.model == model and (fits or not batch):
                batch.append(entry)
                images += entry.job.num_images
            else:
                kept.append(entry)
        self._pending = kept
        self._update_depth()
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        assert self._executor is not None
        self._running = batch
        jobs = [e.job for e in batch]
        images = sum(j.num_images for j in jobs)
        started = time.monotonic()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._runner, jobs
            )
            if len(results) != len(jobs):
                raise RuntimeError(f"runner returned {len(results)} results for {len(jobs)} jobs")
        except Exception as exc:
            log.exception("batch of %d jobs failed", len(jobs))
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(InferenceFailed(f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self._running = []
            elapsed = time.monotonic() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
            self.batches_run += 1
            if self._metrics is not None:
                self._metrics.observe_batch(jobs[0].model, len(jobs), images, elapsed)
        for entry, result in zip(batch, results, strict=True):
            result.batch_jobs = len(jobs)
            result.batch_images = images
            if entry.future.done():
                self._count_rejection("abandoned")
            else:
                entry.future.set_result(result)

    # -- bookkeeping ----------------------------------------------------------------------

    def _forget(self, entry: _Entry) -> None:
        # Usually the batch loop has taken the entry already. Look before removing: a
        # failed deque.remove formats repr(entry) into its ValueError, which printed the
        # result's arrays and took a fifth of the API's CPU at saturation (bench.ceiling).
        if any(e is entry for e in self._pending):
            self._pending.remove(entry)
            self._update_depth()

    def _unfinished(self) -> int:
        return sum(not e.future.done() for e in [*self._pending, *self._running])

    def _update_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._pending))

    def _count_rejection(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.rejected.labels(reason).inc()

    def _log_loop_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("batcher loop died", exc_info=task.exception())
