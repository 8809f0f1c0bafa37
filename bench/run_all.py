"""Every benchmark of docs/BENCH.md in one run, with the issue's targets checked on it.

1. The raw ONNX Runtime loop (`bench.raw_onnx`) at batch sizes 1..16, and the same loop with
   ONNX Runtime's thread spinning off, alternately (what the service would gain).
2. The service in process (`python -m service`, batching on): concurrency sweeps of
   /landmarks and /correspond with binary (`application/x-npz`) and JSON answers, the raw
   loop run right before and after the first and last level of each (the targets compare
   with these brackets); then open loops at 150 % and 80 % of the saturation throughput.
3. The Redis queue (`JLAD_QUEUE=redis`, a private redis-server, one `python -m
   service.worker`): one API process, then two (requests alternate between them), between
   two saturation levels of an in-process API started beside them.
4. The service with batching off (`JLAD_MAX_BATCH_SIZE=1`).

Every process is started on a free loopback port and stopped at the end, also on errors and
Ctrl-C/SIGTERM. Writes `results.json`, `report.md`, `throughput.png`, `p99.png` and the
processes' logs under `--out`, and prints the targets with pass/miss.

    python -m bench.run_all --out runs/bench            # full run (~7 min on 2 CPU cores)
    python -m bench.run_all --out /tmp/b --quick        # smoke run (~1.5 min)
    python -m bench.run_all --out runs/bench --profile  # + py-spy profiles (extra levels)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

from bench import ceiling, pyspy, targets
from bench.common import machine_info, parse_int_list, write_json
from bench.loadgen import LevelResult, Payload, Target, build_payload, fixed_rate, sweep
from bench.raw_onnx import RawGraphs, measure, measure_all, raw_result, spinning_comparison
from bench.report import targets_table, write_report
from bench.services import Stack

log = logging.getLogger("bench.run_all")

SCENARIOS = ("raw", "local", "nobatch", "redis", "load")
LOCAL_SWEEPS: tuple[tuple[str, str], ...] = (
    ("landmarks", "npz"),
    ("landmarks", "json"),
    ("correspond", "npz"),
    ("correspond", "json"),
)


@dataclass
class Config:
    """What one run measures and how long; `quick()` shrinks it to a smoke test."""

    model_dir: Path = Path("models")
    model: str = "objects"
    precision: str = "fp32"
    providers: str = "cpu"
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 16
    inference_nice: int | None = None  # None: the service's own default (JLAD_INFERENCE_NICE)
    image_size: str = "256x256"
    image_format: str = "jpeg"
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    pair_concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    short_concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    warmup_s: float = 1.5
    seconds: float = 6.0
    max_requests: int = 20_000
    overload: float = 1.5
    moderate: float = 0.8
    load_seconds: float = 8.0
    load_warmup_max_s: float = 12.0
    load_deadline_ms: float = 10_000.0
    arrivals: str = "uniform"
    raw_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    raw_pair_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    raw_seconds: float = 2.0
    raw_min_iterations: int = 2
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    profile: bool = False
    ready_timeout_s: float = 180.0
    quick: bool = False

    def quick_version(self) -> Config:
        """A smoke run: every code path, a fraction of a second per level."""
        return dataclasses.replace(
            self,
            concurrency=[1, 2],
            pair_concurrency=[1, 2],
            short_concurrency=[1, 2],
            warmup_s=0.2,
            seconds=1.0,
            max_requests=40,
            load_seconds=1.5,
            load_warmup_max_s=1.0,
            raw_batches=[1, 2],
            raw_pair_batches=[1],
            raw_seconds=0.1,
            raw_min_iterations=1,
            max_batch_size=2,
            max_queue=2,
            quick=True,
        )

    @property
    def size_hw(self) -> tuple[int, int]:
        width, height = (int(v) for v in self.image_size.lower().split("x"))
        return height, width

    def settings(self, **overrides: str) -> dict[str, str]:
        """JLAD_* settings of the service processes."""
        values = {
            "JLAD_MODEL_DIR": str(self.model_dir.resolve()),
            "JLAD_MODELS": self.model,
            "JLAD_DEFAULT_MODEL": self.model,
            "JLAD_PRECISION": self.precision,
            "JLAD_PROVIDERS": self.providers,
            "JLAD_INTRA_OP_THREADS": str(self.threads),
            "JLAD_MAX_BATCH_SIZE": str(self.max_batch_size),
            "JLAD_MAX_WAIT_MS": f"{self.max_wait_ms:g}",
            "JLAD_MAX_QUEUE": str(self.max_queue),
            "JLAD_LOG_LEVEL": "warning",
            "JLAD_SHUTDOWN_GRACE_S": "5",
        }
        if self.inference_nice is not None:
            values["JLAD_INFERENCE_NICE"] = str(self.inference_nice)
        values.update(overrides)
        return values


@dataclass
class Run:
    """The figures gathered so far (what results.json holds)."""

    config: Config
    out: Path
    command: str
    machine: dict[str, Any] = field(default_factory=machine_info)
    raw: dict[str, Any] = field(default_factory=lambda: {"points": []})
    scenarios: list[dict[str, Any]] = field(default_factory=list)
    load: list[dict[str, Any]] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    graphs: RawGraphs | None = None  # kept open for the raw references beside each sweep
    processes: list[dict[str, Any]] = field(default_factory=list)

    @contextmanager
    def stack(self, name: str) -> Iterator[Stack]:
        """The processes of one phase (logs under `out/logs/name`); once they are stopped,
        their pids and exit codes are recorded."""
        stack = Stack(self.out / "logs" / name, self.config.ready_timeout_s)
        try:
            with stack:
                yield stack
        finally:
            self.processes += [
                {
                    "name": f"{name}/{p.name}",
                    "pid": p.pid,
                    "returncode": p.process.returncode if p.process else None,
                    "clean_exit": p.clean_exit,
                }
                for p in stack.processes
            ]

    def payload(self, endpoint: str, response: str) -> Payload:
        cfg = self.config
        return build_payload(
            endpoint, response, size=cfg.size_hw, image_format=cfg.image_format, model=cfg.model
        )

    def find(self, name: str, endpoint: str, response: str) -> dict[str, Any] | None:
        return next(
            (
                s
                for s in self.scenarios
                if s["name"] == name and s["endpoint"] == endpoint and s["response"] == response
            ),
            None,
        )

    def raw_bracket(self, endpoint: str, batch: int, label: str) -> list[dict[str, Any]]:
        """One raw measurement of `endpoint` at `batch`, labelled (empty without the raw
        phase)."""
        if self.graphs is None:
            return []
        cfg = self.config
        point = measure(
            self.graphs,
            endpoint,
            batch,
            min_seconds=cfg.raw_seconds,
            min_iterations=cfg.raw_min_iterations,
        )
        return [{"label": label, **asdict(point)}]

    def sweep(
        self,
        name: str,
        target: Target,
        endpoint: str,
        response: str,
        concurrencies: list[int],
        *,
        bracket_raw: bool = False,
        **about: Any,
    ) -> dict[str, Any]:
        """A concurrency sweep, level by level. With `bracket_raw`, the raw loop runs right
        before and right after the first level (at batch 1) and the last level (at the full
        batch size), while the service idles: the targets compare each level with the mean
        of its two brackets, taken under the same background load (the machine is shared,
        and that load drifts by tens of per cent within minutes)."""
        cfg = self.config
        payload = self.payload(endpoint, response)
        full = targets.jobs_per_batch(endpoint, cfg.max_batch_size)
        reference: list[dict[str, Any]] = []
        levels: list[LevelResult] = []
        for i, c in enumerate(concurrencies):
            brackets = [1] if i == 0 else []
            brackets += [full] if i == len(concurrencies) - 1 else []
            for batch in brackets if bracket_raw else []:
                reference += self.raw_bracket(endpoint, batch, f"before c={c}")
            levels += asyncio.run(
                sweep(
                    target,
                    payload,
                    [c],
                    warmup_s=cfg.warmup_s,
                    duration_s=cfg.seconds,
                    max_requests=cfg.max_requests,
                    label=f"{name} {endpoint}/{response}",
                )
            )
            for batch in brackets if bracket_raw else []:
                reference += self.raw_bracket(endpoint, batch, f"after c={c}")
        doc = {
            "name": name,
            "endpoint": endpoint,
            "response": response,
            **about,
            "raw_reference": reference,
            "levels": [asdict(lv) for lv in levels],
        }
        self.scenarios.append(doc)
        return doc

    def document(self) -> dict[str, Any]:
        """Everything measured so far, as results.json holds it."""
        checks = [c.as_dict() for c in self.checks()]
        return {
            "command": self.command,
            "quick": self.config.quick,
            "machine": self.machine,
            "load_average_end": list(os.getloadavg()),
            "config": {
                **{k: v for k, v in asdict(self.config).items() if k != "model_dir"},
                "model_dir": str(self.config.model_dir),
            },
            "raw": self.raw,
            "scenarios": self.scenarios,
            "load": self.load,
            "targets": checks,
            "profiles": self.profiles,
            "processes": self.processes,
            "failures": self.failures,
        }

    def checks(self) -> list[targets.Check]:
        cfg = self.config
        found: list[targets.Check] = []
        if not self.raw["points"]:
            return found
        for endpoint, response in LOCAL_SWEEPS:
            scenario = self.find("in-process", endpoint, response)
            if scenario is not None:
                found.append(targets.throughput_check(scenario, self.raw, cfg.max_batch_size))
                found.append(targets.latency_check(scenario, self.raw))
                found.append(targets.in_run_overhead_check(scenario))
        local = self.find("in-process", "landmarks", "npz")
        for item in self.load:
            if item["fraction"] > 1:
                found.extend(targets.overload_checks(item["level"]))
            elif local is not None:
                found.append(
                    targets.moderate_load_check(
                        item["level"], local, self.raw, cfg.max_batch_size, cfg.max_wait_ms
                    )
                )
        # The in-process levels run right before and after the Redis ones, else the sweep's.
        bracket = self.find("in-process-bracket", "landmarks", "npz") or local
        for name in ("redis-1api", "redis-2api"):
            redis_scenario = self.find(name, "landmarks", "npz")
            if bracket is not None and redis_scenario is not None:
                found.append(targets.redis_check(redis_scenario, bracket))
        return found


# -- phases ------------------------------------------------------------------------------


def run_raw(run: Run) -> None:
    cfg = run.config
    batches = sorted({*cfg.raw_batches, 1, cfg.max_batch_size})
    full_pairs = targets.jobs_per_batch("correspond", cfg.max_batch_size)
    pairs = sorted({*cfg.raw_pair_batches, 1, full_pairs})
    graphs = RawGraphs(cfg.model_dir, cfg.model, cfg.precision, cfg.providers, cfg.threads)
    points = measure_all(
        graphs,
        {"landmarks": batches, "correspond": pairs},
        min_seconds=cfg.raw_seconds,
        min_iterations=cfg.raw_min_iterations,
    )
    run.raw = raw_result(graphs, points, cfg.threads)
    run.graphs = graphs
    if graphs.provider == "CPUExecutionProvider" and cfg.threads != 1:
        still = RawGraphs(
            cfg.model_dir, cfg.model, cfg.precision, cfg.providers, cfg.threads, spinning=False
        )
        run.raw["spinning"] = spinning_comparison(
            graphs,
            still,
            {"landmarks": sorted({1, cfg.max_batch_size}), "correspond": [1, full_pairs]},
            min_seconds=cfg.raw_seconds / 2,
        )


def load_warmup_s(cfg: Config, fraction: float, saturation_rps: float) -> float:
    """Seconds for the queue to reach its steady state: above saturation, long enough to
    fill `max_queue` with the excess arrivals (capped)."""
    if fraction <= 1:
        return cfg.warmup_s
    excess = (fraction - 1) * saturation_rps
    return min(cfg.load_warmup_max_s, max(cfg.warmup_s, 1.2 * cfg.max_queue / excess))


def run_load(run: Run, target: Target) -> None:
    """Open loops of /landmarks (npz) at `overload` and `moderate` x saturation."""
    cfg = run.config
    local = run.find("in-process", "landmarks", "npz")
    best = targets.saturation(local["levels"]) if local else None
    if best is None or best["throughput_rps"] <= 0:
        run.failures.append("load: no saturation throughput measured, open loops skipped")
        return
    saturation_rps = best["throughput_rps"]
    payload = run.payload("landmarks", "npz")
    for fraction in (cfg.overload, cfg.moderate):
        rate = fraction * saturation_rps
        warmup = load_warmup_s(cfg, fraction, saturation_rps)
        level: LevelResult = asyncio.run(
            fixed_rate(
                target,
                payload,
                rate,
                warmup_s=warmup,
                duration_s=cfg.load_seconds,
                max_requests=int(rate * (warmup + cfg.load_seconds)) + 10,
                deadline_ms=cfg.load_deadline_ms,
                arrivals=cfg.arrivals,
                label=f"{fraction:.0%} load",
            )
        )
        run.load.append(
            {
                "name": f"{fraction:.0%} of saturation ({cfg.arrivals} arrivals)",
                "fraction": fraction,
                "saturation_rps": saturation_rps,
                "warmup_s": warmup,
                "level": asdict(level),
            }
        )


def profile_level(run: Run, processes: dict[str, int], target: Target, during: str) -> None:
    """py-spy on `processes` (name -> pid) during one extra, unmeasured closed-loop level of
    /landmarks (npz) at the highest concurrency."""
    cfg = run.config
    seconds = cfg.warmup_s + cfg.seconds
    recorders = {
        name: (pyspy.start_recording(pid, seconds, run.out / "profiles" / f"{name}.txt"), pid)
        for name, pid in processes.items()
    }
    asyncio.run(
        sweep(
            target,
            run.payload("landmarks", "npz"),
            [max(cfg.concurrency)],
            warmup_s=0,
            duration_s=seconds,
            max_requests=cfg.max_requests,
            label="profiled",
        )
    )
    for name, (recorder, _pid) in recorders.items():
        _, stderr = recorder.communicate(timeout=60)
        path = run.out / "profiles" / f"{name}.txt"
        if recorder.returncode != 0 or not path.is_file():
            run.failures.append(
                f"py-spy on {name} failed: {stderr.decode(errors='replace')[-500:]}"
            )
            continue
        run.profiles.append(
            {
                "process": name,
                "during": during,
                "path": str(path),
                **pyspy.top_frames(path.read_text()),
            }
        )


def run_local(run: Run, with_load: bool) -> None:
    cfg = run.config
    with run.stack("in-process") as stack:
        api, url = stack.api("api", cfg.settings())
        target = Target([url], [url])
        about: dict[str, Any] = {"queue": "local", "batching": True, "apis": 1}
        for endpoint, response in LOCAL_SWEEPS:
            concurrencies = cfg.concurrency if endpoint == "landmarks" else cfg.pair_concurrency
            doc = run.sweep(
                "in-process", target, endpoint, response, concurrencies, bracket_raw=True, **about
            )
            if 1 in concurrencies and shutil.which("wrk"):
                # c=1 once more with a client that costs (almost) nothing: targets.py
                doc["wrk_c1"] = ceiling.level(
                    url, url, run.payload(endpoint, response), 1, cfg.seconds, cfg.warmup_s
                )
        if with_load:
            run_load(run, target)
        if cfg.profile:
            profile_level(run, {"api-in-process": api.pid}, target, "in-process /landmarks npz")


def run_nobatch(run: Run) -> None:
    cfg = run.config
    with run.stack("no-batching") as stack:
        _, url = stack.api("api", cfg.settings(JLAD_MAX_BATCH_SIZE="1"))
        target = Target([url], [url])
        about: dict[str, Any] = {"queue": "local", "batching": False, "apis": 1}
        run.sweep("no-batching", target, "landmarks", "npz", cfg.short_concurrency, **about)


def run_redis(run: Run) -> None:
    """Redis queue with one, then two API processes and one worker. An in-process API runs
    beside them (idle meanwhile) for a saturation level right before and right after, the
    in-process reference of the Redis target under the same background load."""
    cfg = run.config
    top = max(cfg.short_concurrency)
    with run.stack("redis") as stack:
        redis_url = stack.redis()
        settings = cfg.settings(JLAD_QUEUE="redis", JLAD_REDIS_URL=redis_url)
        worker, worker_url = stack.worker("worker", settings)
        api1, url1 = stack.api("api-1", settings)
        _, url_local = stack.api("api-in-process", cfg.settings())
        local = Target([url_local], [url_local])
        about: dict[str, Any] = {"queue": "redis", "batching": True, "workers": 1}
        before = run.sweep("in-process-bracket", local, "landmarks", "npz", [top], apis=1)
        run.sweep(
            "redis-1api",
            Target([url1], [worker_url]),
            "landmarks",
            "npz",
            cfg.short_concurrency,
            apis=1,
            **about,
        )
        _, url2 = stack.api("api-2", settings)
        both = Target([url1, url2], [worker_url])
        run.sweep("redis-2api", both, "landmarks", "npz", cfg.short_concurrency, apis=2, **about)
        after = run.sweep("in-process-bracket", local, "landmarks", "npz", [top], apis=1)
        # One scenario with both bracket levels, so the report and plots show it once.
        run.scenarios.remove(after)
        before["levels"] += after["levels"]
        before["queue"] = "local"
        if cfg.profile:
            processes = {"redis-worker": worker.pid, "redis-api-1": api1.pid}
            profile_level(run, processes, both, "Redis queue, 2 APIs, /landmarks npz")


def run_everything(run: Run) -> dict[str, Any]:
    cfg = run.config
    # Redis right after in-process: the two are compared, and background load drifts.
    phases = [p for p in ("raw", "local", "redis", "nobatch") if p in cfg.scenarios]
    if "load" in cfg.scenarios and "local" not in phases:
        phases.append("local")
    for phase in tqdm(phases, desc="benchmarks", unit="phase"):
        started = time.monotonic()
        try:
            if phase == "raw":
                run_raw(run)
            elif phase == "local":
                run_local(run, with_load="load" in cfg.scenarios)
            elif phase == "nobatch":
                run_nobatch(run)
            elif phase == "redis":
                run_redis(run)
        except Exception as exc:
            # One broken phase (e.g. no redis-server) must not lose the others' figures.
            log.exception("phase %s failed", phase)
            run.failures.append(f"{phase}: {type(exc).__name__}: {exc}")
        log.info("phase %s took %.0f s", phase, time.monotonic() - started)
        write_json(run.out / "results.json", run.document())
    document = run.document()
    write_json(run.out / "results.json", document)
    write_report(document, run.out)
    return document


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the stacks, which stop their processes


def parse_args(argv: list[str] | None) -> tuple[Config, Path]:
    """The run's configuration: the defaults (or --quick's), then every option given."""
    defaults = Config()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--out", type=Path, default=Path("runs/bench"))
    add("--quick", action="store_true", help="smoke run of every path; figures meaningless")
    add("--model-dir", type=Path, help=f"model repository (default {defaults.model_dir})")
    add("--model", help=f"model to benchmark (default {defaults.model})")
    add("--precision", choices=["fp32", "fp16", "int8"], help="graph variant (default fp32)")
    add("--providers", help="as JLAD_PROVIDERS: cpu (default), cuda or auto")
    add("--threads", type=int, help=f"intra-op threads, 0 = ORT's (default {defaults.threads})")
    add("--max-batch-size", type=int, help=f"default {defaults.max_batch_size}")
    add("--max-wait-ms", type=float, help=f"default {defaults.max_wait_ms:g}")
    add("--max-queue", type=int, help=f"default {defaults.max_queue}")
    add(
        "--inference-nice",
        type=int,
        help="JLAD_INFERENCE_NICE of the services (default: theirs)",
    )
    add("--concurrency", type=parse_int_list, help="landmarks levels (default 1,2,4,8,16)")
    add("--pair-concurrency", type=parse_int_list, help="correspond levels (default 1,2,4,8)")
    add("--short-concurrency", type=parse_int_list, help="no-batch/Redis levels (1,4,16)")
    add("--warmup", type=float, dest="warmup_s", help="warm-up seconds per level")
    add("--seconds", type=float, help="measured seconds per level")
    add("--max-requests", type=int, help="most requests per level")
    add("--load-seconds", type=float, help="measured seconds per open loop")
    add("--load-deadline-ms", type=float, help="X-Deadline-Ms of the open loops")
    add("--arrivals", choices=["uniform", "poisson"], help="open-loop arrivals")
    add("--raw-batches", type=parse_int_list, help="landmarks batch sizes of the raw loop")
    add("--raw-pair-batches", type=parse_int_list, help="correspond pair batches, raw loop")
    add("--raw-seconds", type=float, help="least seconds per raw batch size")
    add("--image-size", help="WxH of the uploaded synthetic images (default 256x256)")
    add("--image-format", choices=["jpeg", "png"], help="upload format (default jpeg)")
    add("--scenarios", help=f"comma-separated subset of {', '.join(SCENARIOS)} (default all)")
    add("--profile", action="store_true", help="py-spy the processes in an extra level")
    args = vars(parser.parse_args(argv))
    out: Path = args.pop("out")
    cfg = defaults.quick_version() if args.pop("quick") else defaults
    scenarios = args.pop("scenarios")
    if scenarios is not None:
        chosen = [s.strip() for s in scenarios.split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(SCENARIOS))
        if unknown:
            parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
        cfg = dataclasses.replace(cfg, scenarios=chosen)
    given = {k: v for k, v in args.items() if v is not None and v is not False}
    return dataclasses.replace(cfg, **given), out


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    cfg, out = parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    command = shlex.join(["python", "-m", "bench.run_all", *arguments])
    run = Run(cfg, out, command)
    log.info("machine: %s", run.machine)
    document = run_everything(run)
    print(targets_table(document))
    for failure in document["failures"]:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(f"results: {out / 'results.json'}, report: {out / 'report.md'}")
    return 1 if document["failures"] else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    sys.exit(main())
