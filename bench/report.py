"""Turn a results document (`results.json` of `bench.run_all`) into a markdown report and PNG
plots: throughput and p99 latency against concurrency, one panel per endpoint.

    python -m bench.report runs/bench/results.json     # rewrites report.md and the PNGs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.raw_onnx import RawPoint, raw_table
from bench.targets import jobs_per_batch, raw_point

ENDPOINTS = ("landmarks", "correspond")


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _statuses(statuses: dict[str, int]) -> str:
    errors = {k: v for k, v in statuses.items() if k != "200"}
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0"


def machine_lines(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    gpus = ", ".join(m.get("gpus") or []) or "none"
    return [
        f"- measured: {m['measured_at']} on `{m['hostname']}`; {m['nproc']} cores "
        f"({m['cpu_model']}), GPUs: {gpus}",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in m['load_average'])}; "
        f"at end: {', '.join(f'{x:.2f}' for x in results.get('load_average_end', []))}",
        f"- Python {m['python']}, ONNX Runtime {m['onnxruntime']} "
        f"({', '.join(m['onnxruntime_providers'])})",
    ]


def service_table(results: dict[str, Any]) -> str:
    lines = [
        "| scenario | endpoint | answer | concurrency | req/s | images/s | p50 ms | p95 ms | "
        "p99 ms | avg batch (images) | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in results["scenarios"]:
        for lv in sc["levels"]:
            lines.append(
                f"| {sc['name']} | {sc['endpoint']} | {sc['response']} | {lv['concurrency']} | "
                f"{lv['throughput_rps']:.2f} | {lv['images_per_s']:.2f} | "
                f"{_f(lv['latency']['p50_ms'])} | {_f(lv['latency']['p95_ms'])} | "
                f"{_f(lv['latency']['p99_ms'])} | {_f(lv['batch'].get('avg_images'), 2)} | "
                f"{_statuses(lv['statuses'])} |"
            )
    return "\n".join(lines)


BREAKDOWN = (
    "decode_ms",
    "dispatch_ms",
    "backbone_ms",
    "heads_ms",
    "postprocess_ms",
    "total_ms",
    "outside_handler_ms",
)


def breakdown_table(results: dict[str, Any]) -> str:
    """Medians of the service's own timings in its JSON answers, per level."""
    lines = [
        "| scenario | endpoint | concurrency | client p50 | " + " | ".join(BREAKDOWN) + " |",
        "|---|---|---:|---:|" + "---:|" * len(BREAKDOWN),
    ]
    for sc in results["scenarios"]:
        for lv in sc["levels"]:
            server = lv.get("server_ms") or {}
            if not server:
                continue
            cells = " | ".join(_f(server.get(k)) for k in BREAKDOWN)
            lines.append(
                f"| {sc['name']} | {sc['endpoint']} | {lv['concurrency']} | "
                f"{_f(lv['latency']['p50_ms'])} | {cells} |"
            )
    return "\n".join(lines) if len(lines) > 2 else "(no JSON answers)"


def spinning_table(results: dict[str, Any]) -> str:
    rows = results["raw"].get("spinning") or []
    if not rows:
        return "(not measured)"
    lines = [
        "| endpoint | batch | items/s, spinning (ORT default, the raw loop) | items/s, no spinning "
        "| speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['endpoint']} | {r['batch']} | {r['spinning_items_per_s']:.2f} | "
        f"{r['no_spinning_items_per_s']:.2f} | {r['speed_up']:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines)


def paired_raw_table(results: dict[str, Any]) -> str:
    """The raw figures measured right before each sweep that has them."""
    points, labels = [], []
    for sc in results["scenarios"]:
        for p in sc.get("raw_reference", []):
            points.append(RawPoint(**{k: v for k, v in p.items() if k != "label"}))
            labels.append(f"{p['label']} of {sc['name']} {sc['endpoint']}/{sc['response']}")
    return raw_table(points, labels) if points else "(none)"


def load_table(results: dict[str, Any]) -> str:
    lines = [
        "| load | offered req/s | 200/s | p50 ms | p99 ms | 429 p50 ms | 429 p99 ms | "
        "deadline ms | accepted in deadline | statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for item in results.get("load", []):
        lv = item["level"]
        lines.append(
            f"| {item['name']} | {lv['offered_rps']:.2f} | {lv['throughput_rps']:.2f} | "
            f"{_f(lv['latency']['p50_ms'])} | {_f(lv['latency']['p99_ms'])} | "
            f"{_f(lv['rejected_latency']['p50_ms'])} | {_f(lv['rejected_latency']['p99_ms'])} | "
            f"{_f(lv['deadline_ms'], 0)} | {lv['deadline_met']}/{lv['accepted']} | "
            f"{lv['statuses']} |"
        )
    return "\n".join(lines)


def targets_table(results: dict[str, Any]) -> str:
    lines = ["| target | measured | limit | result | how |", "|---|---:|---:|---|---|"]
    for check in results.get("targets", []):
        verdict = {True: "pass", False: "**miss**", None: "not measured"}[check["passed"]]
        measured = check["measured"]
        shown = "-" if measured is None else f"{measured:.3g} {check['unit']}"
        lines.append(
            f"| {check['name']} | {shown} | {check['comparison']} {check['limit']:.3g} | "
            f"{verdict} | {check['detail']} |"
        )
    return "\n".join(lines)


def profile_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for profile in results.get("profiles", []):
        lines.append(
            f"\n`{profile['process']}` during {profile['during']} ({profile['samples']} samples; "
            f"collapsed stacks in `{profile['path']}`)\n"
        )
        for key, title in (("top", "most samples of their own"), ("focus", "service code")):
            lines += [f"| {title} | inclusive % | self % |", "|---|---:|---:|"]
            lines += [
                f"| `{row['frame']}` | {row['inclusive']:.1f} | {row['self']:.1f} |"
                for row in profile.get(key, [])
            ]
            lines.append("")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole report: machine, settings, raw table, service table, load, targets."""
    cfg = results["config"]
    raw = results["raw"]
    points = [RawPoint(**p) for p in raw["points"]]
    parts = [
        f"# jlad benchmark{' (quick run: figures are not meaningful)' if results['quick'] else ''}",
        "",
        f"Command: `{results['command']}`",
        "",
        *machine_lines(results),
        f"- model `{raw.get('model', cfg['model'])}` {raw.get('precision', cfg['precision'])} "
        f"on {raw.get('provider', cfg['providers'])}, "
        f"{cfg['threads'] or 'default'} intra-op threads; service JLAD_MAX_BATCH_SIZE="
        f"{cfg['max_batch_size']}, JLAD_MAX_WAIT_MS={cfg['max_wait_ms']:g}, JLAD_MAX_QUEUE="
        f"{cfg['max_queue']}; {cfg['image_size']} {cfg['image_format']} uploads; "
        f"{cfg['warmup_s']:g} s warm-up + {cfg['seconds']:g} s measured per level",
        "",
        "## Raw ONNX Runtime loop (pre-decoded inputs)",
        "",
        "items = images for landmarks, (source, target) pairs for correspond; latency per batch.",
        "",
        raw_table(points),
        "",
        "The same loop with ONNX Runtime's idle intra-op threads spinning (its default, kept by "
        "the raw loop) and with `session.intra_op.allow_spinning=0` (as the service runs), "
        "alternately:",
        "",
        spinning_table(results),
        "",
        "## Service, closed loop (concurrency sweep)",
        "",
        "req/s: 200 answers per second (one request = one image for landmarks, one pair for "
        "correspond); latencies of 200 answers; avg batch from the service's /metrics.",
        "",
        service_table(results),
        "",
        "Where the time goes (medians in ms, from the `timings_ms` of JSON answers): "
        "`dispatch_ms` = time waiting in the batcher + hand-offs (wait_ms - backbone - heads), "
        "`outside_handler_ms` = client latency - the handler's total_ms (HTTP, middleware, "
        "serialisation, event-loop queueing).",
        "",
        breakdown_table(results),
        "",
        "Raw loop run again right before and after the first and the last level of each "
        "in-process sweep (the targets compare with the mean of these brackets, taken under "
        "the same background load):",
        "",
        paired_raw_table(results),
        "",
        "## Service, open loop (fixed arrival rate)",
        "",
        load_table(results),
        "",
        "## Targets (ratios of this run)",
        "",
        targets_table(results),
    ]
    if results.get("profiles"):
        parts += ["", "## Profiles", *profile_lines(results)]
    if results.get("failures"):
        parts += ["", "## Failed phases", ""]
        parts += [f"- `{failure.splitlines()[0]}`" for failure in results["failures"]]
    return "\n".join(parts) + "\n"


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """`throughput.png` and `p99.png` against concurrency, a panel per endpoint; the raw
    loop at the full batch size is drawn as a dashed line on the throughput panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written = []
    batch_size = results["config"]["max_batch_size"]
    for key, ylabel, filename in (
        ("throughput", "answers per second (200)", "throughput.png"),
        ("p99", "p99 latency (ms)", "p99.png"),
    ):
        fig, axes = plt.subplots(1, len(ENDPOINTS), figsize=(6 * len(ENDPOINTS), 4.5))
        for ax, endpoint in zip(axes, ENDPOINTS, strict=True):
            for sc in results["scenarios"]:
                if sc["endpoint"] != endpoint or not sc["levels"]:
                    continue
                xs = [lv["concurrency"] for lv in sc["levels"]]
                if len(set(xs)) < 2:
                    continue  # bracketing levels at one concurrency: in the table only
                if key == "throughput":
                    ys = [lv["throughput_rps"] for lv in sc["levels"]]
                else:
                    ys = [lv["latency"]["p99_ms"] or float("nan") for lv in sc["levels"]]
                ax.plot(xs, ys, marker="o", label=f"{sc['name']} ({sc['response']})")
            if key == "throughput":
                batch = jobs_per_batch(endpoint, batch_size)
                reference = raw_point(results["raw"], endpoint, batch)
                if reference is not None:
                    ax.axhline(
                        reference["items_per_s"],
                        linestyle="--",
                        color="grey",
                        label=f"raw ONNX Runtime, batch {batch}",
                    )
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.set_xlabel("concurrency (closed-loop clients)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"/{endpoint}")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(
            f"jlad on {results['machine']['cpu_model']} ({results['machine']['nproc']} cores)"
        )
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """report.md and the plots under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.md"
    report.write_text(markdown(results))
    return [report, *plots(results, out_dir)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    for path in write_report(results, args.results.parent):
        print(path)


if __name__ == "__main__":
    main()
