"""The issue's performance targets, checked on figures of one run (docs/BENCH.md).

Every target is a ratio or a difference of two figures measured in the same run, so a slower
or busier machine moves both sides: raw ONNX Runtime loop vs service, in-process vs Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# The limits of the issue.
MIN_THROUGHPUT_RATIO = {"npz": 0.85, "json": 0.75}
MAX_LATENCY_OVERHEAD_MS = {"npz": 5.0, "json": 8.0}  # issue 16 (was 12 ms for JSON)
MAX_REJECT_MS = 10.0
MIN_REDIS_RATIO = 0.85


@dataclass
class Check:
    """One target: the measured figure against its limit."""

    name: str
    measured: float | None
    limit: float
    comparison: str  # ">=" or "<="
    unit: str
    detail: str

    @property
    def passed(self) -> bool | None:
        """None when the figure could not be measured."""
        if self.measured is None:
            return None
        if self.comparison == ">=":
            return self.measured >= self.limit
        return self.measured <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": self.measured,
            "comparison": self.comparison,
            "limit": self.limit,
            "unit": self.unit,
            "passed": self.passed,
            "detail": self.detail,
        }


def saturation(levels: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The level with the highest throughput of 200 answers (None for no level)."""
    return max(levels, key=lambda lv: lv["throughput_rps"], default=None)


def raw_point(raw: dict[str, Any], endpoint: str, batch: int) -> dict[str, Any] | None:
    """The raw measurement of `endpoint` at `batch` jobs per run, if it was measured."""
    for point in raw["points"]:
        if point["endpoint"] == endpoint and point["batch"] == batch:
            return dict(point)
    return None


def reference_point(
    scenario: dict[str, Any], raw: dict[str, Any], batch: int
) -> dict[str, Any] | None:
    """The raw figure to compare `scenario` with: the mean of the raw runs that bracketed
    its levels (`raw_reference`: same background load) when there are any, else the raw
    table's. `spread` gives the bracketing runs' (min, max) items/s."""
    paired = [
        p
        for p in scenario.get("raw_reference", [])
        if p["endpoint"] == scenario["endpoint"] and p["batch"] == batch
    ]
    if not paired:
        return raw_point(raw, scenario["endpoint"], batch)
    rates = [p["items_per_s"] for p in paired]
    return {
        "endpoint": scenario["endpoint"],
        "batch": batch,
        "items_per_s": sum(rates) / len(rates),
        "latency": {"p50_ms": sum(p["latency"]["p50_ms"] for p in paired) / len(paired)},
        "spread": (min(rates), max(rates)),
        "runs": len(paired),
    }


def _spread(reference: dict[str, Any]) -> str:
    if "spread" not in reference:
        return ""
    low, high = reference["spread"]
    return f" (mean of {reference['runs']} bracketing runs, {low:.2f}..{high:.2f}/s)"


def jobs_per_batch(endpoint: str, max_batch_size: int) -> int:
    """Jobs of `endpoint` in a full batch of `max_batch_size` images (a pair is 2 images)."""
    return max(1, max_batch_size // (1 if endpoint == "landmarks" else 2))


def throughput_check(scenario: dict[str, Any], raw: dict[str, Any], max_batch_size: int) -> Check:
    """Service throughput at saturation / raw loop throughput at the full batch size."""
    endpoint, response = scenario["endpoint"], scenario["response"]
    batch = jobs_per_batch(endpoint, max_batch_size)
    best = saturation(scenario["levels"])
    reference = reference_point(scenario, raw, batch)
    measured = None
    detail = "not measured"
    if best is not None and reference is not None and reference["items_per_s"] > 0:
        measured = best["throughput_rps"] / reference["items_per_s"]
        detail = (
            f"{best['throughput_rps']:.2f} req/s at concurrency {best['concurrency']} (avg batch "
            f"{_fmt(best['batch'].get('avg_images'))} images) vs raw "
            f"{reference['items_per_s']:.2f}/s at batch {batch}{_spread(reference)}"
        )
    return Check(
        f"throughput {endpoint} {response} / raw",
        measured,
        MIN_THROUGHPUT_RATIO[response],
        ">=",
        "ratio",
        detail,
    )


def latency_check(scenario: dict[str, Any], raw: dict[str, Any]) -> Check:
    """Median latency at concurrency 1 minus the raw loop's median batch-1 latency."""
    endpoint, response = scenario["endpoint"], scenario["response"]
    single = next((lv for lv in scenario["levels"] if lv["concurrency"] == 1), None)
    reference = reference_point(scenario, raw, 1)
    measured = None
    detail = "not measured"
    if single is not None and reference is not None and single["latency"]["p50_ms"] is not None:
        measured = single["latency"]["p50_ms"] - reference["latency"]["p50_ms"]
        detail = (
            f"service p50 {single['latency']['p50_ms']:.1f} ms vs raw batch-1 p50 "
            f"{reference['latency']['p50_ms']:.1f} ms{_spread(reference)}"
        )
    return Check(
        f"c=1 p50 overhead {endpoint} {response}",
        measured,
        MAX_LATENCY_OVERHEAD_MS[response],
        "<=",
        "ms",
        detail,
    )


def in_run_overhead_check(scenario: dict[str, Any]) -> Check:
    """Mean latency at concurrency 1 minus the mean time the service spent running those
    very requests' batches (its `jlad_batch_duration_seconds`): the same overhead as
    `latency_check`, but from one set of requests, so background load cannot drift between
    the two figures.

    Measured with wrk (one connection; `scenario["wrk_c1"]`, from `bench.ceiling.level`)
    where the run had it: the Python client's own time per request (building the request,
    reading the answer: ~0.8 ms with the null model, ~1.5 ms with the real one, measured
    against wrk in one process) is not the service's. Its figure is kept in the detail."""
    endpoint, response = scenario["endpoint"], scenario["response"]
    single = next((lv for lv in scenario["levels"] if lv["concurrency"] == 1), None)
    measured = None
    detail = "not measured"
    if single is not None and single["latency"]["mean_ms"] is not None:
        compute = single["batch"].get("avg_ms")
        if compute is not None:
            measured = single["latency"]["mean_ms"] - compute
            detail = (
                f"mean latency {single['latency']['mean_ms']:.1f} ms vs mean batch run "
                f"{compute:.1f} ms inside the service ({single['batch']['batches']:.0f} batches)"
            )
    wrk = scenario.get("wrk_c1") or {}
    if wrk.get("overhead_ms") is not None:
        python_client = "not measured" if measured is None else f"{measured:.2f} ms"
        measured = wrk["overhead_ms"]
        detail = (
            f"wrk, 1 connection: mean latency {wrk['mean_us'] / 1000:.1f} ms vs mean batch "
            f"run {wrk['batch_mean_ms']:.1f} ms inside the service ({wrk['requests']} "
            f"requests); the Python client at c=1: {python_client} ({detail})"
        )
    return Check(
        f"c=1 in-run overhead {endpoint} {response}",
        measured,
        MAX_LATENCY_OVERHEAD_MS[response],
        "<=",
        "ms",
        detail,
    )


def overload_checks(level: dict[str, Any]) -> list[Check]:
    """At 150 % of saturation: 429s come fast, and accepted requests meet their deadline."""
    reject = level["rejected_latency"]["p99_ms"]
    rejected = level["statuses"].get("429", 0)
    accepted = level["accepted"]
    met = level["deadline_met"] / accepted if accepted else None
    return [
        Check(
            "150 % load: 429 p99 latency",
            reject,
            MAX_REJECT_MS,
            "<=",
            "ms",
            f"{rejected} answers 429 of {sum(level['statuses'].values())}; 429 p50 "
            f"{_fmt(level['rejected_latency']['p50_ms'])} ms, max "
            f"{_fmt(level['rejected_latency']['max_ms'])} ms",
        ),
        Check(
            "150 % load: accepted meet deadline",
            met,
            1.0,
            ">=",
            "fraction",
            f"{level['deadline_met']} of {accepted} accepted answered 200 within "
            f"{_fmt(level['deadline_ms'])} ms; statuses {level['statuses']}",
        ),
    ]


def moderate_load_check(
    level: dict[str, Any],
    scenario: dict[str, Any],
    raw: dict[str, Any],
    max_batch_size: int,
    max_wait_ms: float,
) -> Check:
    """At 80 % of saturation of `scenario`: p99 below 2 x (max batching wait + full-batch
    compute of the raw loop)."""
    reference = reference_point(scenario, raw, jobs_per_batch(scenario["endpoint"], max_batch_size))
    limit = float("nan")
    measured = None
    detail = "raw full-batch latency not measured"
    if reference is not None:
        measured = level["latency"]["p99_ms"]
        compute = reference["latency"]["p50_ms"]
        limit = 2 * (max_wait_ms + compute)
        detail = (
            f"2 x ({max_wait_ms:g} ms wait + {compute:.1f} ms raw batch-{max_batch_size} "
            f"compute); statuses {level['statuses']}, avg batch "
            f"{_fmt(level['batch'].get('avg_images'))}"
        )
    return Check("80 % load: p99 latency", measured, limit, "<=", "ms", detail)


def redis_check(redis_scenario: dict[str, Any], local_scenario: dict[str, Any]) -> Check:
    """Redis-queue throughput at saturation / in-process throughput at saturation (the
    mean of `local_scenario`'s levels at its top concurrency: the bracketing runs)."""
    best_redis = saturation(redis_scenario["levels"])
    top = max((lv["concurrency"] for lv in local_scenario["levels"]), default=None)
    local_rates = [
        lv["throughput_rps"] for lv in local_scenario["levels"] if lv["concurrency"] == top
    ]
    measured = None
    detail = "not measured"
    if best_redis is not None and local_rates and sum(local_rates) > 0:
        local_rps = sum(local_rates) / len(local_rates)
        measured = best_redis["throughput_rps"] / local_rps
        detail = (
            f"{best_redis['throughput_rps']:.2f} req/s at concurrency "
            f"{best_redis['concurrency']} vs {local_rps:.2f} req/s in process at concurrency "
            f"{top} ({', '.join(f'{r:.2f}' for r in local_rates)})"
        )
    return Check(
        f"{redis_scenario['name']} / in-process at saturation",
        measured,
        MIN_REDIS_RATIO,
        ">=",
        "ratio",
        detail,
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
