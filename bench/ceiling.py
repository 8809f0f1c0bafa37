"""The service's own ceiling: requests/s of the API when the model costs nothing (the
`null` model of bench/null_model.py), and the per-request overhead at concurrency 1.

    python -m bench.ceiling --out runs/bench/ceiling               # ~4 min on 2 cores
    python -m bench.ceiling --out runs/bench/ceiling --profile     # + py-spy of the API

The load generator is `wrk` (Debian package `wrk`: C, one event-loop thread, a fraction
of a core at these rates), sending the same pre-encoded multipart request (256x256 JPEG
uploads, bench/loadgen.py's `build_payload`) over keep-alive connections; `wrk` is the
only client, so the Python API processes are what saturates. Scenarios, in order:

1. `local`: one API process (`python -m service`, JLAD_QUEUE=local, batching on, the null
   model): per endpoint / answer format (landmarks npz, landmarks JSON, correspond npz), a
   level at concurrency 1 (latency; overhead = mean latency - mean batch run time from the
   process's own /metrics) and closed-loop levels at `--concurrency` (best = saturation).
2. `redis`: a private redis-server, `--workers` queue workers (default 1: on two cores a
   second worker only splits the batches, 1.16-1.24x against 1.27-1.30x with one in
   alternating runs, docs/BENCH.md), and the API with
   JLAD_API_PROCESSES=1, then 2, then 1 again (the bracket): landmarks npz at c=1 (the
   queue's own latency) and at saturation; target: 2 processes >= 1.6x the mean of the
   two 1-process runs. Then, beside it, what two CPU-bound Python processes do on this
   host against one (bench/host_scaling.py): the ceiling of any two-process figure here.

Targets (issue 16): one API process >= 300 req/s for landmarks npz; two >= 1.6x one.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import machine_info, parse_int_list, write_json
from bench.cpu_time import CpuMeter, per_request_ms
from bench.host_scaling import two_process_scaling
from bench.loadgen import Payload, build_payload, require_loopback
from bench.null_model import NAME, write_null_repository
from bench.pyspy import start_recording, top_frames
from bench.services import Stack

log = logging.getLogger("bench.ceiling")

ONE_PROCESS_TARGET_RPS = 300.0
SCALING_TARGET = 1.6
CASES = (("landmarks", "npz"), ("landmarks", "json"), ("correspond", "npz"))

# Read the body and headers from the environment (wrk's Lua has no arguments); print one
# JSON line at the end with the figures wrk keeps (latencies in microseconds).
WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("JLAD_WRK_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("JLAD_WRK_CONTENT_TYPE")
wrk.headers["Accept"] = os.getenv("JLAD_WRK_ACCEPT")
done = function(summary, latency, requests)
  io.write(string.format(
    "JLAD_WRK {\"requests\": %d, \"duration_us\": %d, \"status_errors\": %d, " ..
    "\"connect_errors\": %d, \"read_errors\": %d, \"timeouts\": %d, \"mean_us\": %.1f, " ..
    "\"p50_us\": %d, \"p90_us\": %d, \"p99_us\": %d, \"max_us\": %d}\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.timeout, latency.mean, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_binary() -> str:
    binary = shutil.which("wrk")
    if binary is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    return binary


def parse_wrk(output: str) -> dict[str, Any]:
    """The JLAD_WRK line of wrk's output, with `ok_rps` = non-error answers per second."""
    match = re.search(r"^JLAD_WRK (\{.*\})$", output, re.MULTILINE)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{output[-2000:]}")
    figures: dict[str, Any] = json.loads(match.group(1))
    errors = sum(figures[k] for k in ("status_errors", "connect_errors", "read_errors"))
    figures["ok"] = figures["requests"] - errors - figures["timeouts"]
    figures["ok_rps"] = figures["ok"] / (figures["duration_us"] / 1e6)
    return figures


def run_wrk(url: str, payload: Payload, *, connections: int, seconds: float) -> dict[str, Any]:
    """One closed-loop level: `connections` keep-alive connections for `seconds`."""
    require_loopback(url)
    # the body and the script are scratch (the script is WRK_SCRIPT above): not in the results
    with tempfile.TemporaryDirectory(prefix="jlad-wrk-") as work:
        body = Path(work) / "body"
        body.write_bytes(payload.body)
        script = Path(work) / "post.lua"
        script.write_text(WRK_SCRIPT)
        # wrk takes whole seconds
        argv = [wrk_binary(), "-t", "1", "-c", str(connections)]
        argv += ["-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script)]
        env = {
            "JLAD_WRK_BODY": str(body),
            "JLAD_WRK_CONTENT_TYPE": payload.headers["content-type"],
            "JLAD_WRK_ACCEPT": payload.headers["accept"],
            "PATH": "/usr/bin:/bin",
        }
        done = subprocess.run(
            [*argv, url + payload.path],
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    figures = parse_wrk(done.stdout)
    figures["connections"] = connections
    return figures


def batch_seconds(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of `jlad_batch_duration_seconds` over every model of one process."""
    text = httpx.get(metrics_url + "/metrics", timeout=10, trust_env=False).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("jlad_batch_duration_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("jlad_batch_duration_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def redis_command_stats(redis_url: str) -> dict[str, tuple[int, int]]:
    """(calls, microseconds) of every command Redis has run, from `INFO commandstats`."""
    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
    }


def command_cost_per_request(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]], requests: int
) -> dict[str, dict[str, float]]:
    """Per command run between two `redis_command_stats`: calls and Redis-side microseconds
    per request, dearest first (how the Lua admission script's cost was found)."""
    rows = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0 and requests > 0:
            rows[name] = {
                "calls_per_request": (calls - calls0) / requests,
                "usec_per_request": (usec - usec0) / requests,
            }
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["usec_per_request"]))


def level(
    url: str,
    metrics_url: str,
    payload: Payload,
    connections: int,
    seconds: float,
    warmup_s: float,
    cpu_groups: Mapping[str, Iterable[int]] | None = None,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """A warm-up run, then the measured run; adds the mean batch run time of the measured
    run (from the process's /metrics) and the overhead = mean latency - that; with
    `cpu_groups` (name -> process ids) each group's CPU milliseconds per request, and with
    `redis_url` what each Redis command cost per request."""
    run_wrk(url, payload, connections=connections, seconds=warmup_s)
    meter = CpuMeter(cpu_groups or {})
    before = batch_seconds(metrics_url)
    commands = redis_command_stats(redis_url) if redis_url else {}
    meter.start()
    figures = run_wrk(url, payload, connections=connections, seconds=seconds)
    cpu = meter.stop()
    after = batch_seconds(metrics_url)
    if cpu_groups:
        figures["cpu_ms_per_request"] = per_request_ms(cpu, figures["requests"])
    if redis_url:
        figures["redis_commands"] = command_cost_per_request(
            commands, redis_command_stats(redis_url), figures["requests"]
        )
    batches = after[1] - before[1]
    figures["batch_mean_ms"] = 1000 * (after[0] - before[0]) / batches if batches else None
    if figures["batch_mean_ms"] is not None:
        figures["overhead_ms"] = figures["mean_us"] / 1000 - figures["batch_mean_ms"]
    log.info(
        "%s %s c=%d: %.1f req/s ok, p50 %.1f ms, p99 %.1f ms, errors %d",
        payload.endpoint,
        payload.response,
        connections,
        figures["ok_rps"],
        figures["p50_us"] / 1000,
        figures["p99_us"] / 1000,
        figures["requests"] - figures["ok"],
    )
    return figures


def null_settings(
    model_dir: Path, nice: int | None, max_wait_ms: float | None = None, **extra: str
) -> dict[str, str]:
    settings = {
        "JLAD_MODEL_DIR": str(model_dir),
        "JLAD_MODELS": NAME,
        "JLAD_DEFAULT_MODEL": NAME,
        "JLAD_PROVIDERS": "cpu",
        "JLAD_INTRA_OP_THREADS": "1",
        "JLAD_MAX_QUEUE": "1024",
        "JLAD_LOG_LEVEL": "warning",
    }
    if nice is not None:
        settings["JLAD_INFERENCE_NICE"] = str(nice)
    if max_wait_ms is not None:
        settings["JLAD_MAX_WAIT_MS"] = str(max_wait_ms)
    settings.update(extra)
    return settings


def run_local(args: argparse.Namespace, model_dir: Path, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Stack(out / "logs" / "local") as stack:
        api, url = stack.api(
            "api-local",
            null_settings(model_dir, args.inference_nice, args.max_wait_ms, JLAD_QUEUE="local"),
        )
        for endpoint, response in (c.split("-") for c in args.cases):
            payload = build_payload(endpoint, response)
            key = f"{endpoint}-{response}"
            groups = {"api": [api.pid]}
            one = level(url, url, payload, 1, args.seconds, args.warmup, groups)
            levels = [
                level(url, url, payload, c, args.seconds, args.warmup, groups)
                for c in args.concurrency
            ]
            best = max(levels, key=lambda f: f["ok_rps"])
            results[key] = {"c1": one, "levels": levels, "saturation": best}
            if args.profile and key == "landmarks-npz":
                results[key]["profile"] = profile(api.pid, url, payload, out, best)
    return results


def profile(
    pid: int, url: str, payload: Payload, out: Path, best: dict[str, Any]
) -> dict[str, Any]:
    """py-spy of the API process while wrk holds it at saturation."""
    path = out / "profiles" / "api-landmarks-npz.txt"
    recorder = start_recording(pid, 8, path)
    run_wrk(url, payload, connections=best["connections"], seconds=9)
    recorder.wait(timeout=60)
    try:
        return top_frames(path.read_text(), limit=25)
    except OSError as exc:
        return {"error": str(exc)}


def run_redis(args: argparse.Namespace, model_dir: Path, out: Path) -> dict[str, Any]:
    """API processes 1, 2, 1 in front of `--workers` Redis queue workers, landmarks npz at
    c=1 and at saturation."""
    payload = build_payload("landmarks", "npz")
    runs: list[dict[str, Any]] = []
    with Stack(out / "logs" / "redis") as stack:
        redis_url = stack.redis()
        redis_pids = [p.pid for p in stack.processes if p.name.startswith("redis-")]
        queue = {"JLAD_QUEUE": "redis", "JLAD_REDIS_URL": redis_url}
        workers = [
            stack.worker(
                f"worker-{i}",
                null_settings(model_dir, args.inference_nice, args.max_wait_ms, **queue),
            )
            for i in range(args.workers)
        ]
        # batches are counted on the first worker's /metrics only (the overhead column)
        worker_url = workers[0][1]
        for index, processes in enumerate(args.api_processes):
            with Stack(out / "logs" / "redis" / f"api-{index}-{processes}") as apis:
                settings = null_settings(
                    model_dir,
                    args.inference_nice,
                    args.max_wait_ms,
                    **queue,
                    JLAD_API_PROCESSES=str(processes),
                )
                api, url = apis.api(f"api-{processes}p", settings)
                groups = {
                    "api": [api.pid],
                    "workers": [w.pid for w, _ in workers],
                    "redis": redis_pids,
                }
                # c=1 through the queue: API -> Redis -> worker -> Redis -> API
                one = level(url, worker_url, payload, 1, args.seconds, args.warmup)
                best = max(
                    (
                        level(
                            url,
                            worker_url,
                            payload,
                            c,
                            args.seconds,
                            args.warmup,
                            cpu_groups=groups,
                            redis_url=redis_url,
                        )
                        for c in args.redis_concurrency
                    ),
                    key=lambda f: f["ok_rps"],
                )
                runs.append({"api_processes": processes, "c1": one, "saturation": best})
    ones = [r["saturation"]["ok_rps"] for r in runs if r["api_processes"] == 1]
    twos = [r["saturation"]["ok_rps"] for r in runs if r["api_processes"] == 2]
    ratio = (sum(twos) / len(twos)) / (sum(ones) / len(ones)) if ones and twos else None
    # measured after the services stopped, on the same cores: the most two processes of
    # any software get out of them
    host = two_process_scaling(seconds=args.host_seconds, rounds=2)
    return {"runs": runs, "two_over_one": ratio, "host_two_process_scaling": host}


def _c1_cells(one: dict[str, Any] | None) -> str:
    """The c=1 columns of a report row: p50, mean, batch run and overhead, in ms (empty for
    a Redis run recorded before that level existed)."""
    if one is None:
        return " | | | "
    return (
        f"{one['p50_us'] / 1000:.2f} | {one['mean_us'] / 1000:.2f} | "
        f"{one.get('batch_mean_ms') or 0:.2f} | {one.get('overhead_ms') or 0:.2f}"
    )


def report(results: dict[str, Any]) -> str:
    lines = [
        "| case | c=1 p50 ms | c=1 mean ms | c=1 batch ms | c=1 overhead ms | saturation "
        "req/s (c) | p99 ms at saturation |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in results.get("local", {}).items():
        sat = r["saturation"]
        lines.append(
            f"| {key} | {_c1_cells(r['c1'])} | "
            f"{sat['ok_rps']:.0f} ({sat['connections']}) | {sat['p99_us'] / 1000:.1f} |"
        )
    targets = []
    cpu_lines: list[str] = []
    local = results.get("local", {}).get("landmarks-npz")
    if local:
        rps = local["saturation"]["ok_rps"]
        verdict = "pass" if rps >= ONE_PROCESS_TARGET_RPS else "miss"
        targets.append(
            f"| one API process, landmarks npz | {rps:.0f} req/s | >= "
            f"{ONE_PROCESS_TARGET_RPS:.0f} | {verdict} |"
        )
    redis = results.get("redis")
    if redis:
        for r in redis["runs"]:
            lines.append(
                f"| redis, {r['api_processes']} API process(es), landmarks-npz | "
                f"{_c1_cells(r.get('c1'))} | "
                f"{r['saturation']['ok_rps']:.0f} ({r['saturation']['connections']}) | "
                f"{r['saturation']['p99_us'] / 1000:.1f} |"
            )
        cpu_rows = [r for r in redis["runs"] if r["saturation"].get("cpu_ms_per_request")]
        if cpu_rows:
            names = list(cpu_rows[0]["saturation"]["cpu_ms_per_request"])
            cpu_lines = [
                "| API processes | " + " | ".join(f"{n} CPU ms/request" for n in names) + " |",
                "|---:|" + "---:|" * len(names),
            ]
            for r in cpu_rows:
                cpu = r["saturation"]["cpu_ms_per_request"]
                cpu_lines.append(
                    f"| {r['api_processes']} | " + " | ".join(f"{cpu[n]:.2f}" for n in names) + " |"
                )
            for r in cpu_rows:
                commands = r["saturation"].get("redis_commands") or {}
                top = ", ".join(
                    f"{name} {c['usec_per_request']:.0f} us x {c['calls_per_request']:.2f}"
                    for name, c in list(commands.items())[:5]
                )
                cpu_lines.append(
                    f"\nRedis per request, {r['api_processes']} API process(es): {top}"
                )
        ratio = redis["two_over_one"]
        if ratio is not None:
            verdict = "pass" if ratio >= SCALING_TARGET else "miss"
            targets.append(
                f"| 2 API processes / 1 (Redis queue) | {ratio:.2f} | >= {SCALING_TARGET} | "
                f"{verdict} |"
            )
        host = redis.get("host_two_process_scaling")
        if host:
            targets.append(
                f"| this host: 2 CPU-bound Python processes / 1 (bench.host_scaling) | "
                f"{host['two_over_one']:.2f} | reference | |"
            )
    if targets:
        lines += ["", "| target | measured | limit | result |", "|---|---:|---:|---|", *targets]
    if cpu_lines:
        lines += ["", *cpu_lines]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/ceiling"))
    parser.add_argument("--scenarios", default="local,redis")
    parser.add_argument(
        "--cases",
        type=lambda text: text.split(","),
        default=[f"{e}-{r}" for e, r in CASES],
        help="local scenario: endpoint-answer pairs",
    )
    parser.add_argument("--concurrency", type=parse_int_list, default=[8, 32])
    parser.add_argument("--redis-concurrency", type=parse_int_list, default=[32])
    parser.add_argument("--api-processes", type=parse_int_list, default=[1, 2, 1])
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="queue workers (one null-model worker keeps up with two API processes on two "
        "cores; more only split its batches)",
    )
    parser.add_argument(
        "--inference-nice", type=int, help="JLAD_INFERENCE_NICE of the services (default: theirs)"
    )
    parser.add_argument(
        "--max-wait-ms", type=float, help="JLAD_MAX_WAIT_MS of the services (default: theirs)"
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--host-seconds",
        type=float,
        default=3.0,
        help="redis scenario: seconds of each round of bench.host_scaling",
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--profile", action="store_true", help="py-spy the API (local)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.time()
    model_dir = write_null_repository(args.out / "null-models")
    results: dict[str, Any] = {
        "machine": machine_info(),
        "load_generator": (
            subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True).stdout or "wrk"
        ).splitlines()[0],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    scenarios = args.scenarios.split(",")
    if "local" in scenarios:
        results["local"] = run_local(args, model_dir, args.out)
    if "redis" in scenarios:
        results["redis"] = run_redis(args, model_dir, args.out)
    results["seconds"] = round(time.time() - started, 1)
    table = report(results)
    write_json(args.out / "ceiling.json", results)
    (args.out / "ceiling.md").write_text(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
