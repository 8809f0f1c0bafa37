"""The model-running threads run at a lower CPU priority than request handling
(service/priority.py): real ONNX Runtime sessions, a real batcher, nice values read back
from /proc."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service.batching import Batcher
from service.jobs import InferenceJob, InferenceResult
from service.priority import MAX_NICE, call_at_lower_priority, thread_nice
from service.runtime import InferenceEngine, find_models

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's"
)


def thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def expected(increment: int) -> int:
    base = thread_nice()
    assert base is not None
    return min(MAX_NICE, base + increment)


def test_call_runs_lower_and_its_threads_inherit_it() -> None:
    before = thread_nice()
    seen: dict[str, int | None] = {}

    def work() -> str:
        seen["call"] = thread_nice()
        child = threading.Thread(target=lambda: seen.update(child=thread_nice()))
        child.start()
        child.join()
        return "done"

    assert call_at_lower_priority(work, 3) == "done"
    assert seen == {"call": expected(3), "child": expected(3)}
    assert thread_nice() == before  # the caller keeps its priority


def test_call_passes_exceptions_on_and_zero_changes_nothing() -> None:
    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        call_at_lower_priority(fail, 2)
    assert call_at_lower_priority(thread_nice, 0) == thread_nice()


def test_engine_pool_threads_run_at_the_lower_priority(model_dir: Path) -> None:
    infos = find_models(model_dir, ["faces"])
    before = thread_ids()
    engine = InferenceEngine.load(
        infos,
        precision="fp32",
        providers="cpu",
        allow_cpu_fallback=False,
        intra_op_threads=2,
        nice=4,
    )
    niceness = {t: thread_nice(t) for t in thread_ids() - before}
    # A short-lived thread of something else in the process (started during the load) may
    # end before its nice value is read; the sessions' pool threads live with the engine.
    alive = {t: n for t, n in niceness.items() if n is not None or t in thread_ids()}
    # ONNX Runtime starts one pool thread per session beside the caller (3 graphs)
    assert len(alive) >= 3, niceness
    assert set(alive.values()) == {expected(4)}, niceness
    assert engine.models["faces"].sessions["backbone"] is not None


@pytest.mark.anyio
async def test_batcher_runs_jobs_in_a_lower_priority_thread() -> None:
    seen: list[int | None] = []

    def runner(jobs: Sequence[InferenceJob]) -> list[InferenceResult]:
        seen.append(thread_nice())
        return [InferenceResult([], [], {}, batch_images=1) for _ in jobs]

    batcher = Batcher(runner, max_batch_size=2, max_wait_s=0.0, max_queue=4, inference_nice=5)
    await batcher.start()
    try:
        job = InferenceJob("m", np.zeros((1, 3, 8, 8), np.uint8), landmarks=[0])
        await batcher.submit(job)
    finally:
        await batcher.close(1.0)
    assert seen == [expected(5)]
