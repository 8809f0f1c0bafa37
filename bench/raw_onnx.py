"""The raw baseline: a plain ONNX Runtime loop over pre-decoded inputs, no HTTP, no batcher.

It runs the same graphs the service runs for each endpoint:

- `landmarks`: `backbone` on B images, then `landmarks` on their features;
- `correspond`: `backbone` on the 2B images of B (source, target) pairs in one run, then
  `align` on the B pairs,

with the service's thread settings (`intra_op_num_threads` = JLAD_INTRA_OP_THREADS, one
inter-op thread) and ONNX Runtime's default thread spinning (the service turns spinning off;
`spinning_comparison` measures what that changes). Per batch size it reports items per
second (images for `landmarks`, pairs for `correspond`) and the per-batch latency
(p50/p95/p99).

    python -m bench.raw_onnx --model-dir models --model objects --batches 1,2,4,8,16 \
        --pair-batches 1,2,4,8 --seconds 2 --out runs/bench/raw
    python -m bench.raw_onnx --model-dir models --compare-precision int8 --rounds 3 \
        --batches 8 --pair-batches 4 --out runs/bench/int8

`--compare-precision P` measures `--precision` (default fp32) and P alternately, `--rounds`
times per batch size (background load drifts; alternating hits both alike), with the
service's session options (no spinning), and reports P's speed-up (target: int8 >= 1.6x
fp32 at landmarks batch 8 and correspond 4 pairs).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tqdm import tqdm

from bench.common import declared_inputs, latency_summary, machine_info, parse_int_list, write_json
from service.runtime import GRAPHS, Session, find_models, resolve_providers, session_options

log = logging.getLogger("bench.raw_onnx")

ENDPOINTS = ("landmarks", "correspond")


@dataclass
class RawPoint:
    """One batch size of one endpoint, measured."""

    endpoint: str
    batch: int  # jobs per run: images for landmarks, (source, target) pairs for correspond
    images: int  # images through the backbone per run
    iterations: int
    seconds: float
    items_per_s: float  # images/s (landmarks) or pairs/s (correspond)
    images_per_s: float
    latency: dict[str, float | None] = field(default_factory=dict)  # per batch, ms


class RawGraphs:
    """The three ONNX Runtime sessions of one exported model, opened as the service opens
    them, and the two graph chains the endpoints run."""

    def __init__(
        self,
        model_dir: Path,
        model: str,
        precision: str,
        providers: str,
        threads: int,
        *,
        spinning: bool = True,
    ) -> None:
        info = find_models(model_dir, [model])[model]
        # The service's options; spinning stays ORT's default in the raw loop so that it is
        # the bare baseline, and the non-spinning variant measures the difference.
        options = session_options(threads, spinning=spinning)
        self.spinning = spinning
        provider_list = resolve_providers(providers, ort.get_available_providers())
        self.sessions = {
            graph: Session(info.graph_path(precision, graph)[0], options, provider_list)
            for graph in GRAPHS
        }
        self.provider = self.sessions["backbone"].get_providers()[0]
        if provider_list[0] != self.provider:
            # A CUDA benchmark silently measured on CPU would be worse than none.
            raise RuntimeError(
                f"{provider_list[0]} was asked for but ONNX Runtime runs {self.provider} "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        self.dtype = (
            np.float16
            if self.sessions["backbone"].get_inputs()[0].type == "tensor(float16)"
            else np.float32
        )
        self.input_size = info.input_size
        self.model = f"{info.name}/{info.version}"
        self.precision = precision

    def images(self, count: int, seed: int = 0) -> NDArray[Any]:
        """`(count, 3, H, W)` pre-decoded model inputs in [0, 1], in the graphs' dtype."""
        h, w = self.input_size
        rng = np.random.default_rng(seed)
        return rng.random((count, 3, h, w), dtype=np.float32).astype(self.dtype)

    def _run(self, graph: str, feed: dict[str, NDArray[Any]]) -> list[NDArray[Any]]:
        outputs: list[NDArray[Any]] = self.sessions[graph].run(None, feed)
        return outputs

    def landmarks(self, images: NDArray[Any]) -> list[NDArray[Any]]:
        """`images (B, 3, H, W)` -> landmark outputs (heatmaps, points, confidence)."""
        features = self._run("backbone", {"image": images})[0]
        feed = declared_inputs(self.sessions["landmarks"], {"features": features, "image": images})
        return self._run("landmarks", feed)

    def correspond(self, images: NDArray[Any]) -> list[NDArray[Any]]:
        """`images (2B, 3, H, W)`, sources at even rows and targets at odd rows (as the
        service stacks them) -> alignment outputs (mapping, log_sigma, confidence)."""
        features = self._run("backbone", {"image": images})[0]
        return self._run(
            "align", {"source_features": features[0::2], "target_features": features[1::2]}
        )


def measure(
    graphs: RawGraphs,
    endpoint: str,
    batch: int,
    *,
    min_seconds: float,
    min_iterations: int = 3,
    max_iterations: int = 1000,
) -> RawPoint:
    """Run `endpoint`'s graphs on batches of `batch` jobs until `min_seconds` passed and at
    least `min_iterations` batches ran (after one unmeasured warm-up batch)."""
    images_per_job = 1 if endpoint == "landmarks" else 2
    run = graphs.landmarks if endpoint == "landmarks" else graphs.correspond
    inputs = graphs.images(batch * images_per_job)
    run(inputs)  # first run of a shape allocates
    durations: list[float] = []
    started = time.perf_counter()
    while len(durations) < max_iterations and (
        len(durations) < min_iterations or time.perf_counter() - started < min_seconds
    ):
        t0 = time.perf_counter()
        run(inputs)
        durations.append(time.perf_counter() - t0)
    total = sum(durations)
    return RawPoint(
        endpoint=endpoint,
        batch=batch,
        images=batch * images_per_job,
        iterations=len(durations),
        seconds=total,
        items_per_s=batch * len(durations) / total,
        images_per_s=batch * images_per_job * len(durations) / total,
        latency=latency_summary(durations),
    )


def measure_all(
    graphs: RawGraphs,
    batches: dict[str, list[int]],
    *,
    min_seconds: float,
    min_iterations: int = 3,
) -> list[RawPoint]:
    """Every (endpoint, batch size) of `batches`, with a progress bar."""
    plan = [(endpoint, b) for endpoint, sizes in batches.items() for b in sizes]
    points = []
    for endpoint, batch in tqdm(plan, desc="raw onnx", unit="batch size"):
        point = measure(
            graphs, endpoint, batch, min_seconds=min_seconds, min_iterations=min_iterations
        )
        log.info(
            "raw %s batch %d: %.2f items/s, p50 %.1f ms per batch",
            endpoint,
            batch,
            point.items_per_s,
            point.latency["p50_ms"],
        )
        points.append(point)
    return points


def spinning_comparison(
    spinning: RawGraphs,
    still: RawGraphs,
    batches: dict[str, list[int]],
    *,
    min_seconds: float,
    rounds: int = 2,
) -> list[dict[str, Any]]:
    """Items/s with ONNX Runtime's intra-op threads spinning (its default, as the raw loop
    runs) and not (`session.intra_op.allow_spinning=0`, as the service runs), measured
    alternately `rounds` times per (endpoint, batch) so that drifting background load hits
    both alike."""
    rows = []
    plan = [(endpoint, b) for endpoint, sizes in batches.items() for b in sizes]
    for endpoint, batch in tqdm(plan, desc="raw spinning on/off", unit="batch size"):
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for graphs in (spinning, still):
                point = measure(graphs, endpoint, batch, min_seconds=min_seconds, min_iterations=1)
                rates[graphs.spinning].append(point.items_per_s)
        on, off = (float(np.mean(rates[k])) for k in (True, False))
        rows.append(
            {
                "endpoint": endpoint,
                "batch": batch,
                "spinning_items_per_s": on,
                "no_spinning_items_per_s": off,
                "speed_up": off / on,
                "rates": {"spinning": rates[True], "no_spinning": rates[False]},
            }
        )
    return rows


INT8_SPEEDUP_TARGET = 1.6


def precision_comparison(
    base: RawGraphs,
    other: RawGraphs,
    batches: dict[str, list[int]],
    *,
    min_seconds: float,
    rounds: int = 3,
) -> list[dict[str, Any]]:
    """Items/s of `base` and `other` (two precisions of one model), measured alternately
    `rounds` times per (endpoint, batch); `speed_up` = other / base (means over rounds)."""
    rows = []
    plan = [(endpoint, b) for endpoint, sizes in batches.items() for b in sizes]
    for endpoint, batch in tqdm(plan, desc=f"{base.precision} vs {other.precision}"):
        rates: dict[str, list[float]] = {base.precision: [], other.precision: []}
        for _ in range(rounds):
            for graphs in (base, other):
                point = measure(graphs, endpoint, batch, min_seconds=min_seconds, min_iterations=2)
                rates[graphs.precision].append(point.items_per_s)
        a, b = (float(np.mean(rates[k])) for k in (base.precision, other.precision))
        rows.append(
            {
                "endpoint": endpoint,
                "batch": batch,
                "base": base.precision,
                "other": other.precision,
                "base_items_per_s": a,
                "other_items_per_s": b,
                "speed_up": b / a,
                "rates": rates,
            }
        )
    return rows


def precision_table(rows: list[dict[str, Any]], target: float | None = None) -> str:
    """Markdown table of `precision_comparison` rows (pass/miss against `target`)."""
    lines = [
        "| endpoint | batch | base items/s | other items/s | speed-up | per round |"
        + (" target |" if target else ""),
        "|---|---:|---:|---:|---:|---|" + ("---|" if target else ""),
    ]
    for r in rows:
        pairs = zip(r["rates"][r["base"]], r["rates"][r["other"]], strict=True)
        rounds = ", ".join(f"{x:.2f}/{y:.2f}" for x, y in pairs)
        verdict = ""
        if target:
            verdict = f" >= {target}: {'pass' if r['speed_up'] >= target else 'miss'} |"
        lines.append(
            f"| {r['endpoint']} | {r['batch']} | {r['base_items_per_s']:.2f} ({r['base']}) | "
            f"{r['other_items_per_s']:.2f} ({r['other']}) | {r['speed_up']:.2f} | {rounds} |"
            + verdict
        )
    return "\n".join(lines)


def raw_table(points: list[RawPoint], labels: list[str] | None = None) -> str:
    """Markdown table of raw points (with a first column of `labels` when given)."""
    first = "| measured | " if labels else "| "
    lines = [
        first + "endpoint | batch | images/run | items/s | images/s | p50 ms | p95 ms | runs |",
        ("|---" if labels else "") + "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, p in enumerate(points):
        lines.append(
            (f"| {labels[i]} " if labels else "")
            + f"| {p.endpoint} | {p.batch} | {p.images} | {p.items_per_s:.2f} | "
            f"{p.images_per_s:.2f} | {p.latency['p50_ms']:.1f} | {p.latency['p95_ms']:.1f} | "
            f"{p.iterations} |"
        )
    return "\n".join(lines)


def raw_result(graphs: RawGraphs, points: list[RawPoint], threads: int) -> dict[str, Any]:
    return {
        "model": graphs.model,
        "precision": graphs.precision,
        "provider": graphs.provider,
        "intra_op_threads": threads,
        "points": [asdict(p) for p in points],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="objects")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    parser.add_argument(
        "--compare-precision",
        choices=["fp32", "fp16", "int8"],
        help="measure this precision against --precision instead (alternating rounds)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --compare-precision")
    parser.add_argument("--providers", default="cpu", help="as JLAD_PROVIDERS: cpu, cuda, auto")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT's)")
    parser.add_argument("--batches", type=parse_int_list, default=[1, 2, 4, 8, 16])
    parser.add_argument("--pair-batches", type=parse_int_list, default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=2.0, help="least time per batch size")
    parser.add_argument("--min-iterations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/raw"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    machine = machine_info()
    if args.compare_precision:
        base, other = (
            RawGraphs(args.model_dir, args.model, p, args.providers, args.threads, spinning=False)
            for p in (args.precision, args.compare_precision)
        )
        rows = precision_comparison(
            base,
            other,
            {"landmarks": args.batches, "correspond": args.pair_batches},
            min_seconds=args.seconds,
            rounds=args.rounds,
        )
        target = (
            INT8_SPEEDUP_TARGET
            if (base.precision, other.precision)
            == (
                "fp32",
                "int8",
            )
            else None
        )
        write_json(
            args.out / "precision.json",
            {"machine": machine, "model": base.model, "threads": args.threads, "rows": rows},
        )
        table = precision_table(rows, target)
        (args.out / "precision.md").write_text(table + "\n")
        print(table)
        return
    graphs = RawGraphs(args.model_dir, args.model, args.precision, args.providers, args.threads)
    points = measure_all(
        graphs,
        {"landmarks": args.batches, "correspond": args.pair_batches},
        min_seconds=args.seconds,
        min_iterations=args.min_iterations,
    )
    write_json(
        args.out / "raw.json", {"machine": machine, **raw_result(graphs, points, args.threads)}
    )
    table = raw_table(points)
    (args.out / "raw.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
