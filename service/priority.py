"""Model runs at a lower CPU priority than request handling (Linux nice values per thread).

On a CPU-only host the ONNX Runtime threads keep every core busy whenever a batch runs; the
event loop that parses requests, answers 429 and writes responses then waits for a core like
any other thread, and under load its answers queue behind whole batches (issue 16's 429 tail).
A higher nice value on the threads that run the models tells the kernel to hand a core to the
event loop as soon as it wakes, while the models still get every cycle it leaves idle.

Linux keeps nice values per thread (setpriority(2) on a thread id), and threads inherit the
value of the thread that creates them: ONNX Runtime's intra-op pool threads are created with
the session, so sessions are created in a thread that lowered its own priority first
(`call_at_lower_priority`). An unprivileged thread may raise its nice value but never lower it
again, which is why that thread is a fresh one rather than the caller. Where the platform has
no per-thread nice values (or refuses), the threads simply keep the caller's priority.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

MAX_NICE = 19


def thread_nice(native_id: int | None = None) -> int | None:
    """The nice value of a thread of this process (default: the calling one); None where
    unknown."""
    tid = threading.get_native_id() if native_id is None else native_id
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError):
        return None


def lower_current_thread(increment: int) -> int | None:
    """Raise the calling thread's nice value by `increment` (capped at 19); returns its nice
    value afterwards (unchanged where the platform refuses; None where unknown)."""
    current = thread_nice()
    if increment <= 0 or current is None:
        return current
    target = min(MAX_NICE, current + increment)
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), target)
    except (AttributeError, OSError) as exc:
        log.warning("could not lower the inference threads' priority: %s", exc)
        return current
    return target


def call_at_lower_priority(call: Callable[[], T], increment: int) -> T:
    """`call()` run in a fresh thread whose nice value is `increment` above the caller's, so
    that the threads it starts inherit that value; its result or exception is passed on."""
    if increment <= 0:
        return call()
    outcome: dict[str, T] = {}
    failure: list[BaseException] = []

    def body() -> None:
        lower_current_thread(increment)
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=body, name="jlad-load", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome["value"]
