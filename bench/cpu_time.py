"""CPU seconds spent by groups of processes over a measured run, from /proc (Linux).

`bench.ceiling` uses it to say where the cores went per request (API processes, queue
workers, Redis, the load generator): on a machine whose cores are all busy, a process that
costs more per request takes throughput from every other, so these figures decide what
scales (docs/BENCH.md, ceiling).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_PROC = Path("/proc")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one live process (0.0 if it is gone)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    # fields after the command name, which may itself hold spaces and parentheses
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it (uvicorn's worker processes, say)."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def finished_children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have exited and been waited for (the
    load generator, run by `subprocess.run`)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """CPU seconds per named group of process trees between `start()` and `stop()`; the
    group `load_generator` counts this process's children that exited in between. A process
    that exits within the window counts nothing (its time is no longer readable)."""

    groups: Mapping[str, Iterable[int]]
    _pids: dict[str, list[int]] = field(default_factory=dict)
    _before: dict[int, float] = field(default_factory=dict)
    _children_before: float = 0.0

    def start(self) -> None:
        self._pids = {
            name: [d for p in roots for d in descendants(p)] for name, roots in self.groups.items()
        }
        self._before = {p: process_cpu_seconds(p) for pids in self._pids.values() for p in pids}
        self._children_before = finished_children_cpu_seconds()

    def stop(self) -> dict[str, float]:
        """CPU seconds of each group since `start()`."""
        seconds = {}
        for name, pids in self._pids.items():
            after = {p: process_cpu_seconds(p) for p in pids}
            seconds[name] = sum(max(0.0, after[p] - self._before[p]) for p in pids if after[p])
        seconds["load_generator"] = finished_children_cpu_seconds() - self._children_before
        return seconds


def per_request_ms(cpu_seconds: Mapping[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each group, and their total."""
    if requests <= 0:
        return {}
    out = {name: 1000 * s / requests for name, s in cpu_seconds.items()}
    out["total"] = sum(out.values())
    return out
