"""The dynamic batcher, driven by a plain function as the engine (no model needed)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from service.batching import Batcher
from service.jobs import (
    DeadlineExceeded,
    Dispatcher,
    InferenceFailed,
    InferenceJob,
    InferenceResult,
    LandmarkOutput,
    QueueFull,
    ShuttingDown,
)
from service.metrics import ServiceMetrics

pytestmark = pytest.mark.anyio


def job(tag: float, model: str = "m", images: int = 1, deadline_s: float = 10.0) -> InferenceJob:
    """A job whose images are filled with `tag`, so results can be traced back to it."""
    return InferenceJob(
        model,
        np.full((images, 3, 2, 2), tag, np.float32),
        landmarks=list(range(images)),
        deadline=time.time() + deadline_s,
    )


class EchoEngine:
    """Returns each job's tag as its landmark; records the batches it saw."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[list[tuple[str, float, int]]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, jobs: Sequence[InferenceJob]) -> list[InferenceResult]:
        self.release.wait(5)
        self.batches.append([(j.model, float(j.images[0, 0, 0, 0]), j.num_images) for j in jobs])
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("engine exploded")
        return [
            InferenceResult(
                [
                    LandmarkOutput(
                        np.full((1, 2), j.images[0, 0, 0, 0], np.float32),
                        np.ones(1, np.float32),
                        np.zeros((1, 1, 1), np.float32),
                    )
                ],
                [],
            )
            for j in jobs
        ]


def tag_of(result: InferenceResult) -> float:
    return float(result.landmarks[0].points[0, 0])


def make(engine: EchoEngine, **kwargs: float) -> Batcher:
    options = {"max_batch_size": 8, "max_wait_s": 0.05, "max_queue": 64, **kwargs}
    return Batcher(
        engine,
        max_batch_size=int(options["max_batch_size"]),
        max_wait_s=float(options["max_wait_s"]),
        max_queue=int(options["max_queue"]),
        metrics=ServiceMetrics(),
    )


def test_batcher_is_a_dispatcher() -> None:
    assert isinstance(make(EchoEngine()), Dispatcher)


async def test_concurrent_jobs_share_batches_and_get_their_own_results() -> None:
    engine = EchoEngine(delay_s=0.01)
    batcher = make(engine)
    await batcher.start()
    results = await asyncio.gather(*(batcher.submit(job(i)) for i in range(20)))
    await batcher.close(1)
    assert [tag_of(r) for r in results] == list(range(20))
    assert max(len(b) for b in engine.batches) > 1
    assert all(sum(n for _, _, n in b) <= 8 for b in engine.batches)
    assert all(r.batch_jobs >= 1 for r in results)
    assert sum(len(b) for b in engine.batches) == 20


async def test_a_job_that_finds_the_batcher_idle_does_not_wait_for_companions() -> None:
    engine = EchoEngine()
    batcher = make(engine, max_wait_s=1.0)
    await batcher.start()
    result = await asyncio.wait_for(batcher.submit(job(0)), timeout=0.5)  # < the window
    assert tag_of(result) == 0
    # Dense traffic still batches: a burst arriving together shares the window.
    burst = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit(job(i)) for i in range(1, 5))), timeout=10.0
    )
    await batcher.close(1)
    assert [tag_of(r) for r in burst] == [1, 2, 3, 4]
    assert [len(b) for b in engine.batches] == [1, 4]


async def test_a_one_at_a_time_client_never_waits_for_companions() -> None:
    # Each job arrives right after the previous one was answered, well inside the window:
    # the batcher is idle every time, so none waits (the rule used to be "no arrival in the
    # last max_wait_s", and every other job of a fast model's client waited it out).
    engine = EchoEngine()
    batcher = make(engine, max_wait_s=1.0)
    await batcher.start()
    for i in range(3):
        result = await asyncio.wait_for(batcher.submit(job(i)), timeout=0.5)
        assert tag_of(result) == i
    await batcher.close(1)
    assert [len(b) for b in engine.batches] == [1, 1, 1]


async def test_batches_hold_one_model_only() -> None:
    engine = EchoEngine()
    batcher = make(engine, max_wait_s=0.1)
    await batcher.start()
    jobs = [job(i, model="a" if i % 2 else "b") for i in range(10)]
    results = await asyncio.gather(*(batcher.submit(j) for j in jobs))
    await batcher.close(1)
    assert [tag_of(r) for r in results] == list(range(10))
    assert all(len({m for m, _, _ in b}) == 1 for b in engine.batches)


async def test_a_job_larger_than_the_batch_runs_alone() -> None:
    engine = EchoEngine()
    batcher = make(engine, max_batch_size=4)
    await batcher.start()
    big, small = await asyncio.gather(batcher.submit(job(1, images=6)), batcher.submit(job(2)))
    await batcher.close(1)
    assert tag_of(big) == 1 and tag_of(small) == 2
    assert [(1.0, 6)] in [[(t, n) for _, t, n in b] for b in engine.batches]


async def test_full_queue_answers_queue_full_with_a_retry_hint() -> None:
    engine = EchoEngine()
    engine.release.clear()  # hold the first batch so the queue fills up
    batcher = make(engine, max_batch_size=1, max_queue=2, max_wait_s=0)
    await batcher.start()
    first = asyncio.create_task(batcher.submit(job(0)))
    await asyncio.sleep(0.05)  # the first job is now running (blocked)
    queued = [asyncio.create_task(batcher.submit(job(i))) for i in (1, 2)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull) as exc:
        await batcher.submit(job(3))
    assert exc.value.retry_after_s >= 1
    engine.release.set()
    results = await asyncio.gather(first, *queued)
    await batcher.close(1)
    assert [tag_of(r) for r in results] == [0, 1, 2]


async def test_deadline_passes_while_waiting() -> None:
    engine = EchoEngine(delay_s=0.3)
    batcher = make(engine, max_batch_size=1, max_wait_s=0)
    await batcher.start()
    slow = asyncio.create_task(batcher.submit(job(0)))
    await asyncio.sleep(0.02)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(job(1, deadline_s=0.1))
    assert tag_of(await slow) == 0
    await batcher.close(1)
    # The expired job never reached the engine.
    assert [t for b in engine.batches for _, t, _ in b] == [0.0]


async def test_expired_job_is_refused_at_once() -> None:
    batcher = make(EchoEngine())
    await batcher.start()
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(job(0, deadline_s=-1))
    await batcher.close(1)


async def test_engine_failure_fails_every_job_of_the_batch() -> None:
    batcher = make(EchoEngine(fail=True), max_wait_s=0.05)
    await batcher.start()
    outcomes = await asyncio.gather(
        *(batcher.submit(job(i)) for i in range(3)), return_exceptions=True
    )
    await batcher.close(1)
    assert all(isinstance(o, InferenceFailed) for o in outcomes)
    assert "engine exploded" in str(outcomes[0])


async def test_close_drains_queued_jobs_then_refuses_new_ones() -> None:
    engine = EchoEngine(delay_s=0.05)
    batcher = make(engine, max_batch_size=1, max_wait_s=0)
    await batcher.start()
    tasks = [asyncio.create_task(batcher.submit(job(i))) for i in range(4)]
    await asyncio.sleep(0.01)
    await batcher.close(5)
    assert [tag_of(await t) for t in tasks] == [0, 1, 2, 3]
    with pytest.raises(ShuttingDown):
        await batcher.submit(job(9))
    assert not batcher.ready


async def test_close_after_grace_fails_what_is_left() -> None:
    engine = EchoEngine(delay_s=0.3)
    batcher = make(engine, max_batch_size=1, max_wait_s=0)
    await batcher.start()
    tasks = [asyncio.create_task(batcher.submit(job(i))) for i in range(3)]
    await asyncio.sleep(0.01)
    await batcher.close(0.1)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert any(isinstance(o, ShuttingDown) for o in outcomes)
    assert all(isinstance(o, ShuttingDown | InferenceResult) for o in outcomes)


async def test_metrics_record_batch_sizes() -> None:
    metrics = ServiceMetrics()
    engine = EchoEngine(delay_s=0.02)
    batcher = Batcher(engine, max_batch_size=4, max_wait_s=0.05, max_queue=64, metrics=metrics)
    await batcher.start()
    await asyncio.gather(*(batcher.submit(job(i)) for i in range(8)))
    await batcher.close(1)
    text = metrics.render().decode()
    count = sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("jlad_batch_size_jobs_count")
    )
    assert count == len(engine.batches)
    assert 'jlad_batch_size_jobs_bucket{le="1.0",model="m"}' in text
