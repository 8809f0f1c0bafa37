"""The benchmark harness works: each bench script in a tiny configuration against the real
exported models, real service processes and a real redis-server. No timing is asserted here
(speed targets are ratios the harness itself reports, docs/BENCH.md)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import pyspy, targets
from bench.loadgen import (
    Payload,
    Sample,
    Target,
    batch_counters,
    batch_delta,
    build_payload,
    closed_loop_throughput,
    fixed_rate,
    require_loopback,
    server_breakdown,
    summarise,
    sweep,
)
from bench.profile_graph import main as profile_main
from bench.raw_onnx import RawGraphs, measure
from bench.run_all import main as run_all_main
from bench.services import Stack

PAYLOAD = Payload("landmarks", "npz", b"", {}, images=1)


# -- pure pieces: known answers ------------------------------------------------------------


def test_loadgen_refuses_anything_but_loopback() -> None:
    assert require_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert require_loopback("http://localhost:1") == "http://localhost:1"
    for url in ("http://10.0.0.5:8000", "https://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            require_loopback(url)


def test_closed_loop_throughput_counts_whole_cycles_per_client() -> None:
    # Two clients, answers in bursts: client 0 does 3 requests in 1.5 s, client 1 does 2 in
    # 2 s (one of them a 429, which is not throughput).
    samples = [
        Sample(0.0, 0.5, 200, 0),
        Sample(0.5, 1.0, 200, 0),
        Sample(1.0, 1.5, 200, 0),
        Sample(0.0, 1.0, 200, 1),
        Sample(1.0, 2.0, 429, 1),
    ]
    assert closed_loop_throughput(samples) == pytest.approx(3 / 1.5 + 1 / 2.0)


def test_summarise_splits_statuses_latencies_and_deadlines() -> None:
    samples = [
        Sample(0.1, 0.2, 200),  # before the window: ignored for latencies
        Sample(1.0, 1.3, 200),
        Sample(1.1, 1.6, 200),
        Sample(1.2, 1.205, 429),
        Sample(1.3, 2.5, 504),
        Sample(1.4, 3.4, 200),  # accepted, answered, but after its 1 s deadline
    ]
    level = summarise(
        samples, PAYLOAD, window=(1.0, 3.0), mode="open", offered_rps=5, deadline_ms=1000
    )
    assert level.statuses == {"200": 3, "429": 1, "504": 1}
    assert level.window_rps == pytest.approx(2 / 2.0)  # 200s completed inside [1, 3]
    assert level.latency["p50_ms"] == pytest.approx(500)
    assert level.rejected_latency["max_ms"] == pytest.approx(5, abs=1e-6)
    assert (level.accepted, level.deadline_met) == (4, 2)
    assert level.errors == 2


def test_server_breakdown_splits_the_latency() -> None:
    timings = {"decode_ms": 2.0, "wait_ms": 110.0, "backbone_ms": 90.0, "heads_ms": 10.0}
    samples = [
        Sample(0.0, 0.130, 200, timings={**timings, "total_ms": 120.0}),
        Sample(1.0, 1.140, 200, timings={**timings, "total_ms": 126.0}),
        Sample(2.0, 2.100, 200),  # an answer without timings (npz) is left out
    ]
    breakdown = server_breakdown(samples)
    assert breakdown["outside_handler_ms"] == pytest.approx(12.0)  # median of 10 and 14
    assert breakdown["dispatch_ms"] == pytest.approx(10.0)
    assert breakdown["total_ms"] == pytest.approx(123.0)
    assert server_breakdown(samples[2:]) == {}


def test_batch_counters_sum_the_batcher_histograms() -> None:
    text = "\n".join(
        [
            "# TYPE jlad_batch_size_images histogram",
            'jlad_batch_size_images_bucket{model="objects",le="+Inf"} 4.0',
            'jlad_batch_size_images_count{model="objects"} 4.0',
            'jlad_batch_size_images_sum{model="objects"} 10.0',
            'jlad_batch_size_images_count{model="faces"} 1.0',
            'jlad_batch_size_images_sum{model="faces"} 2.0',
            "# TYPE jlad_batch_size_jobs histogram",
            'jlad_batch_size_jobs_count{model="objects"} 4.0',
            'jlad_batch_size_jobs_sum{model="objects"} 7.0',
            "# TYPE jlad_batch_duration_seconds histogram",
            'jlad_batch_duration_seconds_count{model="objects"} 4.0',
            'jlad_batch_duration_seconds_sum{model="objects"} 0.5',
            "",
        ]
    )
    counters = batch_counters(text)
    assert counters == {"images_sum": 12.0, "jobs_sum": 7.0, "seconds_sum": 0.5, "batches": 5.0}
    later = {"images_sum": 20.0, "jobs_sum": 11.0, "seconds_sum": 1.5, "batches": 9.0}
    assert batch_delta(counters, later) == {
        "batches": 4.0,
        "avg_images": 2.0,
        "avg_jobs": 1.0,
        "avg_ms": 250.0,
    }


def _level(**overrides: Any) -> dict[str, Any]:
    level: dict[str, Any] = {
        "concurrency": 1,
        "throughput_rps": 1.0,
        "latency": {"p50_ms": 100.0, "p99_ms": 120.0},
        "rejected_latency": {"p50_ms": None, "p99_ms": None, "max_ms": None},
        "statuses": {"200": 10},
        "accepted": 10,
        "deadline_met": 10,
        "deadline_ms": 1000.0,
        "batch": {"avg_images": 1.0},
    }
    level.update(overrides)
    return level


def _raw_point(endpoint: str, batch: int, items_per_s: float, p50_ms: float) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "batch": batch,
        "items_per_s": items_per_s,
        "latency": {"p50_ms": p50_ms},
    }


def test_targets_compare_with_the_paired_raw_figures() -> None:
    raw = {"points": [_raw_point("landmarks", 1, 9.0, 100.0), _raw_point("landmarks", 8, 40, 200)]}
    scenario = {
        "name": "in-process",
        "endpoint": "landmarks",
        "response": "npz",
        # Bracketing runs: these win over the raw table, averaged.
        "raw_reference": [
            _raw_point("landmarks", 1, 10.0, 97.0),
            _raw_point("landmarks", 1, 10.0, 99.0),
            _raw_point("landmarks", 8, 15.0, 350.0),
            _raw_point("landmarks", 8, 25.0, 450.0),
        ],
        "levels": [
            _level(concurrency=1, throughput_rps=9.0, latency={"p50_ms": 104.0, "p99_ms": 1}),
            _level(concurrency=16, throughput_rps=17.5, latency={"p50_ms": 900.0, "p99_ms": 1}),
        ],
    }
    throughput = targets.throughput_check(scenario, raw, max_batch_size=8)
    assert throughput.measured == pytest.approx(17.5 / 20.0)
    assert throughput.passed is True  # 0.875 >= 0.85
    assert "15.00..25.00/s" in throughput.detail
    latency = targets.latency_check(scenario, raw)
    assert latency.measured == pytest.approx(6.0)
    assert latency.passed is False  # 6 ms > 5 ms
    scenario["levels"][0]["latency"]["mean_ms"] = 103.0
    scenario["levels"][0]["batch"] = {"avg_ms": 99.5, "batches": 12}
    in_run = targets.in_run_overhead_check(scenario)
    assert in_run.measured == pytest.approx(3.5)
    assert in_run.passed is True
    # wrk's c=1 level wins where the run had it; the Python client's figure stays in sight
    scenario["wrk_c1"] = {
        "overhead_ms": 2.25,
        "mean_us": 101_750.0,
        "batch_mean_ms": 99.5,
        "requests": 40,
    }
    in_run = targets.in_run_overhead_check(scenario)
    assert in_run.measured == pytest.approx(2.25)
    assert "wrk, 1 connection" in in_run.detail
    assert "the Python client at c=1: 3.50 ms" in in_run.detail

    moderate = targets.moderate_load_check(
        _level(latency={"p50_ms": 300.0, "p99_ms": 800.0}), scenario, raw, 8, 5.0
    )
    assert moderate.limit == pytest.approx(2 * (5.0 + 400.0))
    assert moderate.passed is True

    # A /correspond batch of 8 images is 4 pairs.
    assert targets.jobs_per_batch("correspond", 8) == 4
    assert targets.jobs_per_batch("landmarks", 8) == 8


def test_overload_and_redis_checks() -> None:
    overloaded = _level(
        statuses={"200": 30, "429": 20},
        rejected_latency={"p50_ms": 2.0, "p99_ms": 12.5, "max_ms": 13.0},
        accepted=30,
        deadline_met=29,
    )
    fast, in_deadline = targets.overload_checks(overloaded)
    assert (fast.measured, fast.passed) == (12.5, False)
    assert in_deadline.measured == pytest.approx(29 / 30)
    assert in_deadline.passed is False
    nothing_rejected = targets.overload_checks(_level())[0]
    assert nothing_rejected.passed is None  # no 429 at all: not measured, not a pass

    # The in-process reference: the mean of the levels at its top concurrency.
    local = {
        "name": "in-process-bracket",
        "levels": [
            _level(concurrency=16, throughput_rps=9.0),
            _level(concurrency=16, throughput_rps=11.0),
            _level(concurrency=1, throughput_rps=50.0),
        ],
    }
    redis_levels = [_level(throughput_rps=8.0), _level(throughput_rps=8.6)]
    check = targets.redis_check({"name": "redis-1api", "levels": redis_levels}, local)
    assert check.measured == pytest.approx(0.86)
    assert check.passed is True


def test_top_frames_ranks_self_and_service_time() -> None:
    collapsed = "\n".join(
        [
            "main (service/__main__.py:19);run_batch (service/runtime.py:280);run (ort.py:1) 70",
            "main (service/__main__.py:19);decode (service/imaging.py:40) 20",
            "main (service/__main__.py:20);encode (service/outputs.py:9) 10",
        ]
    )
    profile = pyspy.top_frames(collapsed, limit=3)
    assert profile["samples"] == 100
    assert profile["top"][0] == {"frame": "run (ort.py)", "inclusive": 70.0, "self": 70.0}
    # Line numbers are dropped, so both `main` lines are one function.
    focus = {row["frame"]: row["inclusive"] for row in profile["focus"]}
    assert focus["main (service/__main__.py)"] == 100.0
    assert focus["run_batch (service/runtime.py)"] == 70.0


# -- against the real models and processes -------------------------------------------------


def test_raw_loop_runs_the_endpoint_graphs(model_dir: Path) -> None:
    graphs = RawGraphs(model_dir, "objects", "fp32", "cpu", threads=1)
    h, w = graphs.input_size
    mapping, _, _ = graphs.correspond(graphs.images(4))
    assert mapping.shape == (2, 2, h // 8, w // 8)  # 4 images = 2 (source, target) pairs
    heatmaps, points, _ = graphs.landmarks(graphs.images(3))
    assert points.shape[:1] == (3,) and points.shape[2] == 2
    assert np.allclose(heatmaps.reshape(3, points.shape[1], -1).sum(-1), 1, atol=1e-3)

    point = measure(graphs, "correspond", 2, min_seconds=0, min_iterations=2)
    assert (point.batch, point.images, point.iterations) == (2, 4, 2)
    assert point.items_per_s > 0 and point.images_per_s == pytest.approx(2 * point.items_per_s)
    assert point.latency["p50_ms"] is not None and point.latency["p50_ms"] > 0


def test_profile_graph_sums_node_times_per_operator_type(model_dir: Path, tmp_path: Path) -> None:
    """The int8 align graph of a real export, profiled: its cross-similarity shows up as
    the integer product, every time is per run, and the file records what was measured."""
    out = tmp_path / "profile.json"
    args = ["--model-dir", str(model_dir), "--precision", "int8", "--graph", "align"]
    profile_main([*args, "--batch", "2", "--runs", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert (record["graph"], record["precision"], record["batch"], record["runs"]) == (
        "align",
        "int8",
        2,
        3,
    )
    ops = record["op_types_ms"]
    assert "MatMulIntegerToFloat" in ops and "AveragePool" in ops
    assert list(ops.values()) == sorted(ops.values(), reverse=True)
    # the nodes run inside the runs: their per-run sum cannot exceed a run's time by much
    assert 0 < sum(ops.values()) <= record["run_ms"] * 1.2
    assert len(record["top_nodes_ms"]) == 15
    assert not list(Path.cwd().glob("onnxruntime_profile_*.json"))  # no stray profiles


def test_loadgen_against_a_service_process(model_dir: Path, tmp_path: Path) -> None:
    settings = {
        "JLAD_MODEL_DIR": str(model_dir),
        "JLAD_MODELS": "objects",
        "JLAD_INTRA_OP_THREADS": "1",
        "JLAD_MAX_BATCH_SIZE": "2",
        "JLAD_MAX_QUEUE": "1",
        "JLAD_LOG_LEVEL": "warning",
    }
    with Stack(tmp_path / "logs") as stack:
        api, url = stack.api("api", settings)
        target = Target([url], [url])
        json_levels = asyncio.run(
            sweep(
                target,
                build_payload("correspond", "json", size=(64, 80)),
                [1],  # one at a time: a queue of one is never full
                warmup_s=0,
                duration_s=60,  # ended by max_requests
                max_requests=3,
            )
        )
        # Far over capacity with a queue of one: the service must refuse with 429. 400/s, not
        # 40/s: on a quiet machine this service keeps up with 40/s (batches of 2, ~26 ms).
        overloaded = asyncio.run(
            fixed_rate(
                target,
                build_payload("landmarks", "npz", image_format="png"),
                rate=400,
                warmup_s=0,
                duration_s=0.5,
                max_requests=40,
                deadline_ms=20_000,
            )
        )
    assert not api.alive() and api.clean_exit
    (level,) = json_levels
    # The right content type too, else "wrong-content-type".
    assert level.statuses == {"200": 3}, level.statuses
    assert level.throughput_rps > 0 and level.images_per_s == pytest.approx(
        2 * level.throughput_rps
    )
    assert level.batch["batches"] and level.batch["avg_images"] >= 2  # a pair per job
    assert overloaded.statuses.get("429", 0) > 0, overloaded.statuses
    assert overloaded.statuses.get("200", 0) > 0, overloaded.statuses
    assert overloaded.rejected_latency["p50_ms"] is not None


@pytest.mark.slow
def test_run_all_quick_measures_every_scenario(model_dir: Path, tmp_path: Path) -> None:
    """`python -m bench.run_all --quick` end to end: raw loop, in-process sweeps and load,
    no batching, Redis with one and two APIs; results, report and plots written; every
    process it started stopped."""
    out = tmp_path / "bench"
    code = run_all_main(["--quick", "--out", str(out), "--model-dir", str(model_dir)])
    results = json.loads((out / "results.json").read_text())
    assert results["failures"] == [] and code == 0
    assert results["quick"] is True and results["machine"]["nproc"] >= 1
    assert {p["endpoint"] for p in results["raw"]["points"]} == {"landmarks", "correspond"}
    spinning = results["raw"]["spinning"]  # ORT threads spinning on/off, alternately
    assert {(r["endpoint"], r["batch"]) for r in spinning} == {
        ("landmarks", 1),
        ("landmarks", 2),
        ("correspond", 1),
    }
    assert all(len(r["rates"]["no_spinning"]) == 2 and r["speed_up"] > 0 for r in spinning)
    names = {(s["name"], s["endpoint"], s["response"]) for s in results["scenarios"]}
    assert names == {
        ("in-process", "landmarks", "npz"),
        ("in-process", "landmarks", "json"),
        ("in-process", "correspond", "npz"),
        ("in-process", "correspond", "json"),
        ("no-batching", "landmarks", "npz"),
        ("redis-1api", "landmarks", "npz"),
        ("redis-2api", "landmarks", "npz"),
        ("in-process-bracket", "landmarks", "npz"),
    }
    for scenario in results["scenarios"]:
        expected = [2, 2] if scenario["name"] == "in-process-bracket" else [1, 2]
        assert [lv["concurrency"] for lv in scenario["levels"]] == expected
        for level in scenario["levels"]:
            assert level["statuses"].get("200", 0) > 0, (scenario["name"], level["statuses"])
            assert level["batch"]["batches"] > 0
    if shutil.which("wrk"):  # .ci/run installs it; c=1 is measured with it once more
        for scenario in results["scenarios"]:
            if scenario["name"] == "in-process":
                assert scenario["wrk_c1"]["ok"] > 0, scenario["wrk_c1"]
                assert scenario["wrk_c1"]["overhead_ms"] is not None
    assert [item["fraction"] for item in results["load"]] == [1.5, 0.8]
    assert {t["name"] for t in results["targets"]} >= {
        "throughput landmarks npz / raw",
        "c=1 p50 overhead correspond json",
        "80 % load: p99 latency",
        "redis-2api / in-process at saturation",
    }
    # The Redis target compares with the in-process levels that bracket the Redis ones.
    (bracket,) = [s for s in results["scenarios"] if s["name"] == "in-process-bracket"]
    in_process = np.mean([lv["throughput_rps"] for lv in bracket["levels"]])
    (redis_1api,) = [s for s in results["scenarios"] if s["name"] == "redis-1api"]
    (check,) = [t for t in results["targets"] if t["name"].startswith("redis-1api")]
    best = max(lv["throughput_rps"] for lv in redis_1api["levels"])
    assert check["measured"] == pytest.approx(best / in_process)
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "redis-2api" in report
    for png in ("throughput.png", "p99.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    started = results["processes"]
    assert {p["name"].split("/")[0] for p in started} == {"in-process", "no-batching", "redis"}
    for process in started:
        assert process["clean_exit"], process
        with pytest.raises(ProcessLookupError):
            os.kill(process["pid"], 0)


def test_pyspy_profiles_a_python_process(tmp_path: Path) -> None:
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nwhile True: sum(range(10000))"],
    )
    try:
        time.sleep(0.3)
        recorder = pyspy.start_recording(busy.pid, 1, tmp_path / "busy.txt", rate=50)
        _, stderr = recorder.communicate(timeout=60)
    finally:
        busy.kill()
        busy.wait()
    if recorder.returncode != 0 and b"ermission" in stderr:
        pytest.skip(f"py-spy may not attach here (ptrace): {stderr.decode()[-200:]}")
    assert recorder.returncode == 0, stderr
    profile = pyspy.top_frames((tmp_path / "busy.txt").read_text())
    assert profile["samples"] > 0
    assert any("<module>" in row["frame"] for row in profile["top"])


# -- issue 16: null model, service ceiling, precision comparison --------------------------


def test_null_model_keeps_the_real_io_contract(tmp_path: Path) -> None:
    """The bench's `null` model loads like any exported model and answers in the contract's
    shapes: heat maps that are distributions, soft-argmax points, the identity mapping."""
    from bench.null_model import write_null_repository
    from service.jobs import InferenceJob
    from service.runtime import InferenceEngine, find_models

    repo = write_null_repository(tmp_path, size=(64, 96), stride=8, channels=4, num_landmarks=3)
    infos = find_models(repo)
    assert list(infos) == ["null"] and infos["null"].grid_size == (8, 12)
    engine = InferenceEngine.load(
        infos, precision="fp32", providers="cpu", allow_cpu_fallback=False
    )
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 96), np.uint8)
    (result,) = engine.run_batch([InferenceJob("null", images, landmarks=[0], pairs=[(0, 1)])])
    lm, al = result.landmarks[0], result.alignments[0]
    assert lm.heatmaps.shape == (3, 8, 12) and lm.points.shape == (3, 2)
    np.testing.assert_allclose(lm.heatmaps.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert np.all(np.abs(lm.points) < 1)
    xs = (np.arange(12) + 0.5) / 12 * 2 - 1
    np.testing.assert_allclose(al.mapping[0], np.broadcast_to(xs, (8, 12)), atol=1e-6)
    assert al.confidence.shape == (8, 12) and np.all((al.confidence > 0) & (al.confidence < 1))


def test_wrk_summary_is_parsed_into_successful_answers_per_second() -> None:
    from bench.ceiling import parse_wrk

    output = (
        "Running 2s test @ http://127.0.0.1:1/landmarks\n"
        'JLAD_WRK {"requests": 500, "duration_us": 2000000, "status_errors": 20, '
        '"connect_errors": 0, "read_errors": 5, "timeouts": 25, "mean_us": 1500.0, '
        '"p50_us": 1200, "p90_us": 2500, "p99_us": 9000, "max_us": 12000}\n'
    )
    figures = parse_wrk(output)
    assert figures["ok"] == 450
    assert figures["ok_rps"] == pytest.approx(225.0)
    with pytest.raises(RuntimeError, match="no summary"):
        parse_wrk("wrk: connection refused")


def test_precision_table_marks_the_speed_up_target() -> None:
    from bench.raw_onnx import precision_table

    rows = [
        {
            "endpoint": "landmarks",
            "batch": 8,
            "base": "fp32",
            "other": "int8",
            "base_items_per_s": 2.0,
            "other_items_per_s": 4.0,
            "speed_up": 2.0,
            "rates": {"fp32": [2.0], "int8": [4.0]},
        },
        {
            "endpoint": "correspond",
            "batch": 4,
            "base": "fp32",
            "other": "int8",
            "base_items_per_s": 2.0,
            "other_items_per_s": 3.0,
            "speed_up": 1.5,
            "rates": {"fp32": [2.0], "int8": [3.0]},
        },
    ]
    lines = precision_table(rows, 1.6).splitlines()
    assert lines[2].endswith(">= 1.6: pass |") and lines[3].endswith(">= 1.6: miss |")


def test_redis_command_costs_per_request_from_a_real_redis(tmp_path: Path) -> None:
    """bench.ceiling's Redis column: INFO commandstats before and after, per request."""
    import redis

    from bench.ceiling import command_cost_per_request, redis_command_stats
    from tests.queue_support import redis_server

    with redis_server(tmp_path) as server:
        before = redis_command_stats(server.url)
        client = redis.Redis.from_url(server.url)
        for _ in range(10):
            client.xadd("s", {"payload": b"x" * 1000})
            client.xlen("s")
        client.close()
        costs = command_cost_per_request(before, redis_command_stats(server.url), requests=10)
    assert costs["xadd"]["calls_per_request"] == 1.0
    assert costs["xlen"]["calls_per_request"] == 1.0
    assert costs["xadd"]["usec_per_request"] > 0
    # dearest first; commands that did not run in between are left out
    assert list(costs) == sorted(costs, key=lambda n: -costs[n]["usec_per_request"])
    known = command_cost_per_request({"get": (5, 100)}, {"get": (25, 500), "set": (5, 50)}, 10)
    assert known == {
        "get": {"calls_per_request": 2.0, "usec_per_request": 40.0},
        "set": {"calls_per_request": 0.5, "usec_per_request": 5.0},
    }
    assert command_cost_per_request({"get": (5, 100)}, {"get": (5, 100)}, 10) == {}


def test_cpu_meter_counts_a_busy_process_tree_and_finished_children() -> None:
    """A parent that spins in a child counts under the parent's group; a child that exited
    and was waited for counts as the load generator; idle processes count ~nothing."""
    from bench.cpu_time import CpuMeter, descendants, per_request_ms

    def spin(seconds: float) -> str:
        return (
            f"import time\nend = time.process_time() + {seconds}\n"
            "while time.process_time() < end: pass"
        )

    run_child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin(3.0)!r}])"
    parent = subprocess.Popen([sys.executable, "-c", run_child])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        deadline = time.monotonic() + 10
        while len(descendants(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(descendants(parent.pid)) == 2  # the parent and its spinning child
        meter = CpuMeter({"busy": [parent.pid], "idle": [idle.pid]})
        meter.start()
        time.sleep(0.25)
        subprocess.run([sys.executable, "-c", spin(0.4)], check=True)  # a finished child of ours
        cpu = meter.stop()
    finally:
        for pid in descendants(parent.pid)[1:]:
            os.kill(pid, signal.SIGKILL)
        for process in (parent, idle):
            process.kill()
            process.wait()
    assert cpu["busy"] > 0.3
    assert cpu["idle"] < 0.05
    assert cpu["load_generator"] > 0.3
    assert per_request_ms({"a": 0.5, "b": 0.25}, 100) == {"a": 5.0, "b": 2.5, "total": 7.5}
    assert per_request_ms({"a": 1.0}, 0) == {}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")
def test_ceiling_runs_wrk_against_a_real_service_with_the_null_model(tmp_path: Path) -> None:
    """bench.ceiling end to end, tiny: a real `python -m service` on the null model, wrk as
    the client, answers counted from wrk's summary, batches from the process's /metrics."""
    from bench.ceiling import main as ceiling_main

    results = ceiling_main(
        [
            "--out",
            str(tmp_path),
            "--scenarios",
            "local",
            "--cases",
            "landmarks-npz",
            "--concurrency",
            "4",
            "--seconds",
            "1",
            "--warmup",
            "0.5",
        ]
    )
    case = results["local"]["landmarks-npz"]
    assert case["c1"]["ok"] > 0 and case["c1"]["requests"] == case["c1"]["ok"]
    assert case["c1"]["batch_mean_ms"] is not None
    assert case["saturation"]["ok_rps"] > 0
    # the API process parsed, decoded and answered every request: it used CPU for them
    assert case["saturation"]["cpu_ms_per_request"]["api"] > 0.05
    assert (tmp_path / "ceiling.md").read_text().startswith("| case |")
    assert not list((tmp_path / "null-models").glob("*/*/int8"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")
def test_ceiling_measures_the_redis_queue_at_c1_and_at_saturation(tmp_path: Path) -> None:
    """The Redis scenario, tiny: a private redis-server, one worker, one API process; the
    c=1 level's batches come from the worker's /metrics."""
    from bench.ceiling import main as ceiling_main

    results = ceiling_main(
        [
            *("--out", str(tmp_path), "--scenarios", "redis", "--api-processes", "1"),
            *("--redis-concurrency", "4", "--seconds", "1", "--warmup", "0.5"),
            *("--host-seconds", "0.3"),
        ]
    )
    (run,) = results["redis"]["runs"]
    assert run["api_processes"] == 1
    assert run["c1"]["ok"] > 0 and run["c1"]["requests"] == run["c1"]["ok"]
    assert run["c1"]["batch_mean_ms"] is not None and run["c1"]["overhead_ms"] > 0
    assert run["saturation"]["ok_rps"] > 0
    row = next(r for r in (tmp_path / "ceiling.md").read_text().splitlines() if "redis" in r)
    assert row.split("|")[2].strip(), "the c=1 columns of the Redis row are filled"
    host = results["redis"]["host_two_process_scaling"]
    assert (
        host["two_over_one"] > 0
        and "this host: 2 CPU-bound" in (tmp_path / "ceiling.md").read_text()
    )


def test_host_scaling_counts_the_work_of_one_and_of_two_concurrent_processes() -> None:
    from bench.host_scaling import loop_iterations, two_process_scaling

    one, two = loop_iterations(1, 0.3), loop_iterations(2, 0.3)
    assert len(one) == 1 and len(two) == 2 and min(one + two) > 1000
    result = two_process_scaling(seconds=0.3, rounds=1)
    # two processes on one core do about the work of one; on two free cores about twice
    assert 0.5 < result["two_over_one"] < 2.5
    assert result["two_over_one"] == sum(result["two_processes"]) / sum(result["one_process"])


def test_cost_ratios_time_every_line_against_the_bare_trunk(
    model_dir: Path, tmp_path: Path
) -> None:
    """One round, tiny time budget: the structure and the arithmetic of the ratios (the
    figures themselves are for `make bench` on a quiet machine, not for a test)."""
    from bench.cost_ratios import TARGETS
    from bench.cost_ratios import main as cost_main

    report = cost_main(
        [
            "--model-dir",
            str(model_dir),
            "--rounds",
            "1",
            "--seconds",
            "0",
            "--batch",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    ms = report["ms_per_call"]
    assert {"trunk", "backbone", "landmarks", "align"} <= set(ms) and all(
        v > 0 for v in ms.values()
    )
    ratios = report["ratios"]
    assert set(ratios) == set(TARGETS) == set(report["met"])
    assert ratios["backbone_over_trunk"] == pytest.approx(ms["backbone"] / ms["trunk"], rel=1e-2)
    per_image = ms["trunk"] / 2
    assert ratios["correspond_pair_over_trunk_image"] == pytest.approx(
        (2 * ms["backbone"] + ms["align"]) / 2 / per_image, rel=1e-2
    )
    assert (tmp_path / "cost_objects_fp32.json").is_file()
