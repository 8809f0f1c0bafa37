"""The objects a process made while starting up are kept out of Python's garbage collector.

A full (generation 2) collection walks every container object the process holds, and a
serving process holds hundreds of thousands that live as long as it does: FastAPI's routes and
pydantic schemas, ONNX Runtime's and numpy's modules, the models' manifests. Under load those
collections ran every few seconds and stopped the event loop for 51-57 ms each (gc.callbacks
in the API process during bench.run_all's 150 % load, 2-core EPYC: three such pauses in 20 s,
the 429 answers caught behind them made the p99). `gc.freeze()` once the process is ready moves
what exists then into a permanent generation that collections skip; objects made afterwards
(requests, batches) are collected as before, so nothing leaks that would not leak anyway.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then exclude every object alive now from later collections; returns
    how many objects are frozen (the whole frozen set, if called again)."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "froze the startup heap",
        extra={"frozen_objects": frozen, "seconds": round(time.perf_counter() - started, 3)},
    )
    return frozen
