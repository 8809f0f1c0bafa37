"""The Redis queue, one step at a time: a real redis-server, the real API (uvicorn on a free
port, JLAD_QUEUE=redis) and an in-process `Worker` driven batch by batch, so that every
interleaving below (a worker going silent, a deadline passing, Redis restarting) happens
exactly where the test puts it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.jobs import InferenceFailed, InferenceJob, InferenceResult
from service.metrics import ServiceMetrics
from service.queue import RedisDispatcher
from service.redis_codec import encode_job
from service.redis_support import QueueKeys, reply_ttl_s
from service.runtime import InferenceEngine
from service.settings import Settings
from service.worker import Worker
from tests.queue_support import (
    RedisServer,
    make_tls_files,
    parse_metrics,
    redis_server,
    wait_for,
)
from tests.queue_support import load_engine as load_test_engine
from tests.service_support import assert_problem, chelsea, encode, serve, service_settings

IMAGE = encode(chelsea())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as running:
        yield running


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> InferenceEngine:
    engine = load_test_engine(model_dir)
    engine.warm_up()
    return engine


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def queue_settings(model_dir: Path, url: str, **overrides: Any) -> Settings:
    """API and worker settings on a stream of the test's own."""
    values: dict[str, Any] = {
        "queue": "redis",
        "redis_url": url,
        "redis_stream": f"test:{uuid.uuid4().hex[:8]}",
        "models": ["faces"],
        "default_model": "faces",
        "max_wait_ms": 0,
    }
    values.update(overrides)
    return service_settings(model_dir, **values)


def make_worker(settings: Settings, engine: InferenceEngine, name: str) -> Worker:
    worker = Worker(settings, engine.run_batch, ServiceMetrics(), consumer=name)
    worker.connect()
    return worker


def post_image(url: str, deadline_ms: int | None = None) -> httpx.Response:
    headers = {"X-Deadline-Ms": str(deadline_ms)} if deadline_ms else {}
    return httpx.post(
        url + "/landmarks", files={"image": ("i.png", IMAGE)}, headers=headers, timeout=60
    )


def metrics_of(worker: Worker) -> dict[str, float]:
    return parse_metrics(worker.metrics.render().decode())


def queued(server: RedisServer, settings: Settings, count: int) -> None:
    client = server.client()
    wait_for(lambda: client.xlen(settings.redis_stream) == count, 10, f"{count} queued jobs")
    client.close()


def assert_queue_empty(server: RedisServer, settings: Settings) -> None:
    client = server.client()
    assert client.xlen(settings.redis_stream) == 0, "finished entries are deleted"
    assert client.xpending(settings.redis_stream, settings.redis_group)["pending"] == 0
    client.close()


def test_expired_job_gets_504_in_time_and_takes_no_batch_slot(
    model_dir: Path, server: RedisServer, engine: InferenceEngine, pool: ThreadPoolExecutor
) -> None:
    settings = queue_settings(model_dir, server.url)
    worker = make_worker(settings, engine, "w")
    with serve(settings) as api:
        started = time.monotonic()
        late = post_image(api.url, deadline_ms=300)
        elapsed = time.monotonic() - started
        assert_problem(late, 504, "deadline-exceeded")
        assert elapsed < 0.3 + 1.0, f"504 came {elapsed:.2f} s after a 0.3 s deadline"
        on_time: Future[httpx.Response] = pool.submit(post_image, api.url)
        queued(server, settings, 2)  # the expired job is still in the stream: no worker ran
        batch = worker.collect_batch()
        assert len(batch) == 1, "the expired job was finished on the way, not batched"
        worker.process(batch)
        response = on_time.result(timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["batch"] == {"jobs": 1, "images": 1}
    metrics = metrics_of(worker)
    assert metrics["jlad_queue_expired_total"] == 1
    assert metrics['jlad_batch_size_jobs_count{model="faces"}'] == 1
    assert metrics['jlad_batch_size_jobs_sum{model="faces"}'] == 1
    assert_queue_empty(server, settings)
    worker.close()


def test_a_job_that_finds_the_worker_idle_runs_at_once_and_a_backlog_gathers(
    model_dir: Path, server: RedisServer, engine: InferenceEngine, pool: ThreadPoolExecutor
) -> None:
    """The gather window is for jobs that queue behind others: one sent to an idle worker
    (a one-at-a-time client) is taken without waiting `max_wait_ms` for company."""
    window_s = 3.0
    settings = queue_settings(model_dir, server.url, max_wait_ms=window_s * 1000)
    worker = make_worker(settings, engine, "w")
    with serve(settings) as api:
        # a backlog: the job is queued before the worker reads, so it waits for company
        first: Future[httpx.Response] = pool.submit(post_image, api.url)
        queued(server, settings, 1)
        started = time.monotonic()
        batch = worker.collect_batch()
        assert len(batch) == 1 and time.monotonic() - started >= window_s
        worker.process(batch)
        assert first.result(timeout=30).status_code == 200
        # idle: the worker is blocked reading when the job comes
        second: Future[httpx.Response] = pool.submit(
            lambda: (time.sleep(0.2), post_image(api.url))[1]
        )
        started = time.monotonic()
        batch = []
        while not batch and time.monotonic() - started < 10:
            batch = worker.collect_batch()
        assert len(batch) == 1
        assert time.monotonic() - started < window_s, "an idle worker's job waited for company"
        worker.process(batch)
        assert second.result(timeout=30).status_code == 200
    assert_queue_empty(server, settings)
    worker.close()


def test_full_queue_answers_429_with_retry_after(
    model_dir: Path, server: RedisServer, engine: InferenceEngine, pool: ThreadPoolExecutor
) -> None:
    settings = queue_settings(model_dir, server.url, max_queue=2, max_batch_size=4)
    with serve(settings) as api:
        accepted = [pool.submit(post_image, api.url) for _ in range(2)]
        queued(server, settings, 2)
        started = time.monotonic()
        refused = post_image(api.url)
        assert time.monotonic() - started < 1.0
        body = assert_problem(refused, 429, "queue-full")
        assert int(refused.headers["Retry-After"]) >= 1
        assert body["retry_after_s"] == int(refused.headers["Retry-After"])
        worker = make_worker(settings, engine, "w")
        worker.process(worker.collect_batch())
        answers = [f.result(timeout=30) for f in accepted]
    assert [a.status_code for a in answers] == [200, 200], "accepted jobs are still answered"
    assert [a.json()["batch"]["jobs"] for a in answers] == [2, 2]
    assert_queue_empty(server, settings)
    worker.close()


def test_job_of_a_silent_worker_is_taken_over_and_answered_once(
    model_dir: Path, server: RedisServer, engine: InferenceEngine, pool: ThreadPoolExecutor
) -> None:
    settings = queue_settings(model_dir, server.url, redis_claim_idle_ms=300)
    silent = make_worker(settings, engine, "silent")
    rescuer = make_worker(settings, engine, "rescuer")
    with serve(settings) as api:
        answer: Future[httpx.Response] = pool.submit(post_image, api.url)
        queued(server, settings, 1)
        held = silent.collect_batch()  # read, then nothing: as if the worker had hung
        assert len(held) == 1
        assert rescuer.collect_batch() == [], "not taken over before the idle timeout"
        time.sleep(0.35)
        taken = rescuer.collect_batch()
        assert [d.job_id for d in taken] == [held[0].job_id] and taken[0].deliveries == 2
        rescuer.process(taken)
        response = answer.result(timeout=30)
        assert response.status_code == 200, response.text
        # The silent worker wakes up and answers too: the API must not answer twice.
        silent.process(held)

        def replies() -> dict[str, float]:
            values = parse_metrics(httpx.get(api.url + "/metrics").text)
            return {k: v for k, v in values.items() if k.startswith("jlad_queue_replies_total")}

        counted = wait_for(
            lambda: (r := replies()).get('jlad_queue_replies_total{outcome="duplicate"}') and r,
            10,
            "the duplicate reply",
        )
        assert counted['jlad_queue_replies_total{outcome="delivered"}'] == 1
        client = server.client()
        dispatcher = api.state.dispatcher
        assert isinstance(dispatcher, RedisDispatcher)
        reply_key = dispatcher.reply_key
        assert 0 < client.ttl(reply_key) <= reply_ttl_s(settings), "reply streams expire"
    assert client.exists(reply_key) == 0, "a stopped API deletes its reply stream"
    client.close()
    rescued = metrics_of(rescuer)
    assert rescued["jlad_queue_claimed_total"] == 1 and rescued["jlad_queue_retried_total"] == 1
    assert_queue_empty(server, settings)
    silent.close()
    rescuer.close()


def test_job_delivered_too_often_is_dead_lettered_with_an_explicit_error(
    model_dir: Path, server: RedisServer, engine: InferenceEngine, pool: ThreadPoolExecutor
) -> None:
    settings = queue_settings(
        model_dir, server.url, redis_claim_idle_ms=200, redis_max_deliveries=1
    )
    crashed = make_worker(settings, engine, "crashed")
    survivor = make_worker(settings, engine, "survivor")
    with serve(settings) as api:
        answer: Future[httpx.Response] = pool.submit(post_image, api.url)
        queued(server, settings, 1)
        (held,) = crashed.collect_batch()  # its worker dies: never processed
        time.sleep(0.25)
        assert survivor.collect_batch() == [], "worn out: answered with an error, not run"
        response = answer.result(timeout=30)
    body = assert_problem(response, 500, "internal-error")
    assert "gave up after 1 attempts" in body["detail"]
    client = server.client()
    (record,) = client.xrange(QueueKeys.from_settings(settings).dead_letters)
    assert record[1][b"job"].decode() == held.job_id and record[1][b"deliveries"] == b"2"
    assert client.ttl(QueueKeys.from_settings(settings).dead_letters) > 0
    client.close()
    assert metrics_of(survivor)['jlad_queue_dead_lettered_total{reason="deliveries"}'] == 1
    assert_queue_empty(server, settings)
    crashed.close()
    survivor.close()


def test_unreadable_entry_gets_an_error_reply_and_the_worker_carries_on(
    model_dir: Path, server: RedisServer, engine: InferenceEngine
) -> None:
    settings = queue_settings(model_dir, server.url)
    worker = make_worker(settings, engine, "w")
    client = server.client()
    reply_key = f"{settings.redis_stream}:replies:test"
    client.xadd(
        settings.redis_stream,
        {
            "job": "j1",
            "reply": reply_key,
            "deadline": repr(time.time() + 60),
            "enqueued": "0",
            "images": "1",
            "payload": b"\x80\x04not msgpack",
        },
    )
    assert worker.collect_batch() == []
    ((_, reply),) = client.xrange(reply_key)
    assert reply[b"job"] == b"j1" and reply[b"status"] == b"dead-letter"
    assert b"unreadable" in reply[b"detail"]
    assert metrics_of(worker)['jlad_queue_dead_lettered_total{reason="unreadable"}'] == 1
    assert_queue_empty(server, settings)
    client.close()
    worker.close()


def test_one_batch_answers_two_api_processes_and_both_reply_streams_expire(
    model_dir: Path, server: RedisServer, engine: InferenceEngine
) -> None:
    settings = queue_settings(model_dir, server.url, max_batch_size=4)
    worker = make_worker(settings, engine, "w")
    client = server.client()
    (h, w) = engine.models["faces"].info.input_size
    rng = np.random.default_rng(1)
    reply_keys = [f"{settings.redis_stream}:replies:api-{i}" for i in range(2)]
    for i, reply_key in enumerate(reply_keys * 2):
        job = InferenceJob("faces", rng.integers(0, 256, (1, 3, h, w), np.uint8), landmarks=[0])
        client.xadd(
            settings.redis_stream,
            {
                "job": f"j{i}",
                "reply": reply_key,
                "deadline": repr(time.time() + 60),
                "enqueued": repr(time.time()),
                "images": "1",
                "payload": encode_job(job),
            },
        )
    batch = worker.collect_batch()
    assert len(batch) == 4, "one batch holds the jobs of both API processes"
    worker.process(batch)
    for reply_key in reply_keys:
        replies = client.xrange(reply_key)
        assert [r[b"status"] for _, r in replies] == [b"ok", b"ok"], reply_key
        assert 0 < client.ttl(reply_key) <= reply_ttl_s(settings), f"{reply_key} expires"
    assert_queue_empty(server, settings)
    client.close()
    worker.close()


def test_job_for_a_model_the_worker_lacks_gets_an_explicit_error(
    model_dir: Path, server: RedisServer, engine: InferenceEngine, pool: ThreadPoolExecutor
) -> None:
    settings = queue_settings(model_dir, server.url)
    worker = Worker(settings, engine.run_batch, ServiceMetrics(), consumer="w", models=["other"])
    worker.connect()
    with serve(settings) as api:
        answer = pool.submit(post_image, api.url)
        queued(server, settings, 1)
        worker.process(worker.collect_batch())
        body = assert_problem(answer.result(timeout=30), 500, "internal-error")
    assert "does not serve model 'faces'" in body["detail"]
    assert worker.batches_run == 0, "nothing was run"
    assert_queue_empty(server, settings)
    worker.close()


def test_a_job_the_models_reject_fails_alone_and_its_batch_mates_succeed(
    model_dir: Path, server: RedisServer, engine: InferenceEngine, pool: ThreadPoolExecutor
) -> None:
    settings = queue_settings(model_dir, server.url, max_batch_size=4)
    worker = make_worker(settings, engine, "w")
    (h, w) = engine.models["faces"].info.input_size
    rng = np.random.default_rng(0)
    good = InferenceJob("faces", rng.integers(0, 256, (1, 3, h, w), np.uint8), landmarks=[0])
    # Wrong input size: the API never sends this, so it stands for any job the models reject.
    bad = InferenceJob("faces", rng.integers(0, 256, (1, 3, 8, 8), np.uint8), landmarks=[0])

    async def submit_both() -> list[InferenceResult | BaseException]:
        dispatcher = RedisDispatcher(settings, ServiceMetrics())
        await dispatcher.start()
        wait_s = 0.0
        while not dispatcher.ready and wait_s < 10:
            await asyncio.sleep(0.05)
            wait_s += 0.05
        for job in (good, bad):
            job.deadline = time.time() + 30
        try:
            return await asyncio.gather(
                dispatcher.submit(good), dispatcher.submit(bad), return_exceptions=True
            )
        finally:
            await dispatcher.close(1)

    answers = pool.submit(asyncio.run, submit_both())
    queued(server, settings, 2)
    batch = worker.collect_batch()
    assert len(batch) == 2
    worker.process(batch)
    ok, failed = answers.result(timeout=30)
    assert isinstance(ok, InferenceResult) and ok.batch_jobs == 1, "rerun alone"
    (expected,) = engine.run_batch([good])
    assert np.allclose(ok.landmarks[0].points, expected.landmarks[0].points, atol=1e-5)
    assert isinstance(failed, InferenceFailed) and "do not fit faces" in str(failed)
    assert metrics_of(worker)["jlad_queue_failed_total"] == 1
    assert_queue_empty(server, settings)
    worker.close()


def test_dispatcher_closes_promptly_while_its_reader_is_blocked(
    model_dir: Path, server: RedisServer
) -> None:
    settings = queue_settings(model_dir, server.url)

    async def start_and_close() -> list[float]:
        seconds = []
        for pause_s in (0.1, 0.6):
            dispatcher = RedisDispatcher(settings, ServiceMetrics())
            await dispatcher.start()
            for _ in range(100):
                if dispatcher.ready:
                    break
                await asyncio.sleep(0.05)
            assert dispatcher.ready
            await asyncio.sleep(pause_s)  # somewhere inside a 1 s blocking XREAD
            started = time.monotonic()
            await asyncio.wait_for(dispatcher.close(0), timeout=10)
            seconds.append(time.monotonic() - started)
        return seconds

    assert max(asyncio.run(start_and_close())) < 2.5


def test_redis_outage_fast_503_and_waiting_requests_are_not_left_hanging(
    model_dir: Path, tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    with redis_server(tmp_path / "redis") as own:
        settings = queue_settings(model_dir, own.url)
        with serve(settings) as api:
            waiting: Future[httpx.Response] = pool.submit(post_image, api.url, 20_000)
            queued(own, settings, 1)
            own.stop()  # no persistence: the queued job is gone with it
            for _ in range(3):
                started = time.monotonic()
                refused = post_image(api.url)
                assert time.monotonic() - started < 1.5, "503 must come fast"
                body = assert_problem(refused, 503, "not-ready")
                assert "Redis" in body["detail"]
            assert_problem(httpx.get(api.url + "/readyz"), 503, "not-ready")
            restarted_at = time.monotonic()
            own.start()
            lost = waiting.result(timeout=15)
            assert time.monotonic() - restarted_at < 5, "answered at once, not at its deadline"
            assert "restarted" in assert_problem(lost, 503, "not-ready")["detail"]
            wait_for(lambda: httpx.get(api.url + "/readyz").status_code == 200, 10, "ready again")


def test_tls_and_password_from_the_setting_or_the_url(
    model_dir: Path, tmp_path: Path, engine: InferenceEngine, pool: ThreadPoolExecutor
) -> None:
    tls = make_tls_files(tmp_path)
    with redis_server(tmp_path / "redis", password="s3cret", tls=tls) as secure:
        assert secure.url.startswith("rediss://")
        api_settings = queue_settings(model_dir, secure.url, redis_password="s3cret")
        in_url = secure.url.replace("rediss://", "rediss://:s3cret@")
        worker = make_worker(
            queue_settings(model_dir, in_url, redis_stream=api_settings.redis_stream),
            engine,
            "w",
        )
        with serve(api_settings) as api:
            answer = pool.submit(post_image, api.url)
            queued(secure, api_settings, 1)
            worker.process(worker.collect_batch())
            assert answer.result(timeout=30).status_code == 200
            readyz = httpx.get(api.url + "/readyz").json()
            assert "s3cret" not in str(readyz)
        wrong = queue_settings(model_dir, secure.url, redis_password="wrong")
        with serve(wrong, wait_ready=False) as api:
            time.sleep(0.5)
            body = assert_problem(httpx.get(api.url + "/readyz"), 503, "not-ready")
            assert "unreachable" in body["detail"] and "wrong" not in body["detail"]
            assert_problem(post_image(api.url), 503, "not-ready")
        worker.close()
