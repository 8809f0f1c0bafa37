"""How much work two CPU-bound processes do on this host, against one: the reference for
any two-process scaling figure (bench.ceiling's Redis scenario).

A VM's two vCPUs may be hyperthreads of one physical core, or share their cores with
other guests; then two processes do less than twice the work of one however well the
software scales. `two_process_scaling` runs a pure-Python loop (interpreter-bound, the
kind of work that saturates an API process) in one process, then in two at once,
alternating, and returns the work per second of two over that of one.

    python -m bench.host_scaling --seconds 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

# Counts loop iterations for argv[1] seconds of its own clock; the dict store keeps the
# loop from being pure integer arithmetic (an API process mostly chases pointers).
_LOOP = """
import sys, time
end = time.perf_counter() + float(sys.argv[1])
n, x, table = 0, 1, {}
while time.perf_counter() < end:
    for _ in range(1000):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        table[x & 1023] = x
    n += 1000
print(n)
"""


def loop_iterations(processes: int, seconds: float) -> list[int]:
    """Iterations of the loop done by each of `processes` copies run at the same time."""
    running = [
        subprocess.Popen(
            [sys.executable, "-c", _LOOP, str(seconds)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    counts = []
    for process in running:
        out, _ = process.communicate(timeout=seconds + 60)
        if process.returncode != 0:
            raise RuntimeError(f"the scaling loop exited with {process.returncode}")
        counts.append(int(out))
    return counts


def two_process_scaling(seconds: float = 3.0, rounds: int = 2) -> dict[str, Any]:
    """Work of two concurrent processes over that of one, rounds alternating one / two."""
    one: list[int] = []
    two: list[int] = []
    for _ in range(rounds):
        one.append(sum(loop_iterations(1, seconds)))
        two.append(sum(loop_iterations(2, seconds)))
    return {
        "seconds": seconds,
        "rounds": rounds,
        "one_process": one,
        "two_processes": two,
        "two_over_one": sum(two) / sum(one),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    result = two_process_scaling(args.seconds, args.rounds)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
