"""Sampling profiles of benchmark processes with py-spy, and the hottest functions of one.

`py-spy record --format raw` writes collapsed stacks (`frame;frame;... count`), which
`flamegraph.pl` or https://www.speedscope.app open as a flame graph; `top_frames` ranks the
functions by the share of samples they end in (self) and, for the service's own files, by
the share they appear in (inclusive).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_LINE_NUMBER = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """The py-spy executable beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.is_file():
        return str(beside)
    return shutil.which("py-spy")


def start_recording(
    pid: int, seconds: float, out: Path, rate: int = 100
) -> subprocess.Popen[bytes]:
    """Start `py-spy record` on `pid` for `seconds` (without pausing it: --nonblocking),
    writing collapsed stacks to `out`; wait on the returned process."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frame_name(frame: str) -> str:
    """`run_batch (service/runtime.py:280)` -> `run_batch (service/runtime.py)`."""
    return _LINE_NUMBER.sub(")", frame.strip())


def top_frames(collapsed: str, limit: int = 15, focus: str = "service/") -> dict[str, Any]:
    """The `limit` functions with the most samples of their own (`top`), and the `limit`
    functions of files under `focus` that most samples pass through (`focus`); shares in
    percent of all samples."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        match = _LINE.match(line.strip())
        if not match:
            continue
        count = int(match["count"])
        frames = [_frame_name(f) for f in match["stack"].split(";") if f.strip()]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def row(frame: str) -> dict[str, Any]:
        return {
            "frame": frame,
            "inclusive": 100.0 * inclusive[frame] / total,
            "self": 100.0 * own.get(frame, 0) / total,
        }

    if not total:
        return {"samples": 0, "top": [], "focus": []}
    focused = [(f, n) for f, n in inclusive.most_common() if focus in f][:limit]
    return {
        "samples": total,
        "top": [row(frame) for frame, _ in own.most_common(limit)],
        "focus": [row(frame) for frame, _ in focused],
    }
