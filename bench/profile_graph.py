"""Where one served graph spends its time: ONNX Runtime's own profiler, summed per operator
type and per node, over several runs at one batch size.

Inputs are those of the raw loop (`bench.raw_onnx`): random pictures, and for the align and
landmark graphs the same precision's backbone output on them.

    python -m bench.profile_graph --model-dir models --model objects --precision int8 \
        --graph align --batch 4 --runs 10 --out runs/bench/profile-align-int8.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from numpy.typing import NDArray
from tqdm import tqdm

from bench.common import declared_inputs, machine_info, write_json
from bench.raw_onnx import RawGraphs
from service.runtime import Session, find_models, session_options

log = logging.getLogger("bench.profile_graph")


def graph_feed(graphs: RawGraphs, graph: str, batch: int) -> dict[str, NDArray[Any]]:
    """Inputs of `graph` for `batch` images or pairs, as the raw loop makes them."""
    images = graphs.images(2 * batch)
    if graph == "backbone":
        return {"image": images[:batch]}
    features = graphs.sessions["backbone"].run(None, {"image": images})[0]
    if graph == "align":
        return {"source_features": features[:batch], "target_features": features[batch:]}
    return {"features": features[:batch], "image": images[:batch]}


def profile_graph(path: Path, feed: dict[str, NDArray[Any]], runs: int) -> dict[str, Any]:
    """Mean milliseconds per run of each operator type and of the 15 dearest nodes."""
    options = session_options()
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = Session(path, options, ["CPUExecutionProvider"])
        inputs = declared_inputs(session.inner, feed)
        session.run(None, inputs)  # warm-up, not counted
        for _ in tqdm(range(runs), desc=path.name, unit="run"):
            session.run(None, inputs)
        trace = json.loads(Path(session.inner.end_profiling()).read_text())
    by_type: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    total = 0.0
    seen_runs = 0
    for event in trace:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            seen_runs += 1
            if seen_runs > 1:
                total += event["dur"]
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if seen_runs < 1:  # a run's nodes are logged before it: these are the warm-up's
            continue
        op = event["args"].get("op_name", "?")
        by_type[op] += event["dur"]
        by_node[f"{event['name'].removesuffix('_kernel_time')} ({op})"] += event["dur"]
    return {
        "runs": runs,
        "run_ms": total * 1e-3 / runs,
        "op_types_ms": _per_run_ms(by_type, runs),
        "top_nodes_ms": dict(list(_per_run_ms(by_node, runs).items())[:15]),
    }


def _per_run_ms(microseconds: dict[str, float], runs: int) -> dict[str, float]:
    """Totals in microseconds over `runs` runs -> ms per run, dearest first."""
    per_run = ((k, v * 1e-3 / runs) for k, v in microseconds.items())
    return dict(sorted(per_run, key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="objects")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    parser.add_argument("--graph", default="align", choices=["backbone", "align", "landmarks"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    graphs = RawGraphs(args.model_dir, args.model, args.precision, "cpu", threads=0)
    feed = graph_feed(graphs, args.graph, args.batch)
    path, _ = find_models(args.model_dir, [args.model])[args.model].graph_path(
        args.precision, args.graph
    )
    result = profile_graph(path, feed, args.runs)
    result.update(model=args.model, precision=args.precision, graph=args.graph, batch=args.batch)
    print(f"{args.graph} {args.precision} batch {args.batch}: {result['run_ms']:.2f} ms per run")
    for name, ms in result["op_types_ms"].items():
        print(f"  {name:28s} {ms:8.2f} ms")
    print("dearest nodes:")
    for name, ms in result["top_nodes_ms"].items():
        print(f"  {name:60s} {ms:8.2f} ms")
    if args.out is not None:
        write_json(args.out, {"machine": machine_info(), **result})


if __name__ == "__main__":
    main()
