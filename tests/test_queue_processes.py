"""The Redis queue as deployed: a redis-server, two API processes (`python -m service`,
JLAD_QUEUE=redis) and worker processes (`python -m service.worker`), all real, on loopback.

The module shares one Redis and the two APIs; each test starts the workers it needs and
stops them. Every wait is bounded; every process is stopped at the end.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.runtime import InferenceEngine
from tests.queue_support import (
    RedisServer,
    ServiceProcess,
    landmarks_of,
    load_engine,
    queue_environment,
    reference_landmarks,
    start_process,
    wait_for,
)
from tests.service_support import assert_problem, astronaut, chelsea, coffee, encode

STREAM, GROUP = "jlad:requests", "jlad-workers"
# Settings the workers start with unless a test says otherwise.
WORKER_SETTINGS = {"max_batch_size": "8", "max_wait_ms": "50", "redis_claim_idle_ms": "1000"}
# Three sizes: a result given to the wrong request would land elsewhere in pixels.
IMAGES = [encode(chelsea()), encode(coffee()), encode(astronaut())]


@dataclass
class Cluster:
    directory: Path
    model_dir: Path
    redis: RedisServer
    engine: InferenceEngine
    apis: list[ServiceProcess] = field(default_factory=list)
    workers: list[ServiceProcess] = field(default_factory=list)

    def start_workers(self, *names: str, **settings: str) -> list[ServiceProcess]:
        env = queue_environment(self.model_dir, self.redis.url, **{**WORKER_SETTINGS, **settings})
        started = [start_process("service.worker", n, env, self.directory) for n in names]
        self.workers += started
        for worker in started:
            worker.wait_ready()
        return started

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()

    def consumer_of(self, worker: ServiceProcess) -> str:
        name: str = worker.get("/readyz").json()["worker"]["consumer"]
        return name

    def pending_of(self, consumer: str) -> list[bytes]:
        client = self.redis.client()
        held = client.xpending_range(STREAM, GROUP, "-", "+", 100, consumername=consumer)
        client.close()
        return [h["message_id"] for h in held]

    def queue_is_empty(self) -> bool:
        client = self.redis.client()
        empty = client.xlen(STREAM) == 0 and client.xpending(STREAM, GROUP)["pending"] == 0
        client.close()
        return bool(empty)

    def expected(self, image_index: int) -> np.ndarray[Any, Any]:
        return reference_landmarks(self.engine, "faces", IMAGES[image_index])


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("queue-cluster")
    server = RedisServer(directory / "redis")
    server.start()
    engine = load_engine(model_dir)
    running = Cluster(directory, model_dir, server, engine)
    try:
        env = queue_environment(model_dir, server.url, shutdown_grace_s="5")
        running.apis = [start_process("service", f"api{i}", env, directory) for i in range(2)]
        for api in running.apis:
            api.wait_ready()
        yield running
    finally:
        running.stop_workers()
        for api in running.apis:
            api.stop()
        server.stop()


def post_landmarks(api: ServiceProcess, image: bytes) -> httpx.Response:
    return httpx.post(api.url + "/landmarks", files={"image": ("i.png", image)}, timeout=60)


def replies_delivered(api: ServiceProcess) -> float:
    return api.metrics().get('jlad_queue_replies_total{outcome="delivered"}', 0.0)


def test_two_api_processes_feed_one_worker_and_share_batches(cluster: Cluster) -> None:
    (worker,) = cluster.start_workers("w-batch", max_wait_ms="400")
    assert worker.get("/healthz").json() == {"status": "ok"}
    assert worker.get("/readyz").json()["worker"]["group"] == GROUP
    assert_problem(worker.get("/nowhere"), 404, "not-found")
    jobs = [(cluster.apis[i % 2], i % 3) for i in range(8)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = [pool.submit(post_landmarks, api, IMAGES[k]) for api, k in jobs]
        responses = [a.result(timeout=60) for a in answers]
    for (_, k), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(landmarks_of(response), cluster.expected(k), atol=1e-2)
    assert max(r.json()["batch"]["jobs"] for r in responses) > 1
    metrics = worker.metrics()
    batches = metrics["jlad_queue_batch_sources_count"]
    single_source = metrics['jlad_queue_batch_sources_bucket{le="1.0"}']
    assert batches - single_source >= 1, "some batch held jobs of both API processes"
    assert metrics['jlad_batch_size_jobs_sum{model="faces"}'] == len(jobs)
    assert metrics["jlad_queue_wait_seconds_count"] == len(jobs)
    assert cluster.queue_is_empty()
    cluster.stop_workers()


def test_kill_9_of_a_worker_under_load_loses_nothing_and_answers_once(cluster: Cluster) -> None:
    doomed, survivor = cluster.start_workers("w-doomed", "w-survivor")
    doomed_consumer = cluster.consumer_of(doomed)
    delivered_before = sum(replies_delivered(api) for api in cluster.apis)
    threads, per_thread = 6, 6
    results: list[tuple[int, httpx.Response | Exception]] = []

    def client_loop(thread: int) -> None:
        for i in range(per_thread):
            k = (thread + i) % len(IMAGES)
            try:
                results.append((k, post_landmarks(cluster.apis[thread % 2], IMAGES[k])))
            except httpx.HTTPError as exc:  # a lost request would surface here
                results.append((k, exc))

    with ThreadPoolExecutor(threads) as pool:
        loops = [pool.submit(client_loop, t) for t in range(threads)]
        wait_for(lambda: cluster.pending_of(doomed_consumer), 30, "the doomed worker to hold jobs")
        doomed.kill()  # SIGKILL: no chance to acknowledge anything
        held_at_death = cluster.pending_of(doomed_consumer)
        for loop in loops:
            loop.result(timeout=120)

    assert len(results) == threads * per_thread
    failures = [r for _, r in results if not isinstance(r, httpx.Response)]
    assert failures == [], "every request must get an answer"
    statuses = [r.status_code for _, r in results if isinstance(r, httpx.Response)]
    assert statuses == [200] * len(results), statuses
    for k, response in results:
        assert isinstance(response, httpx.Response)
        np.testing.assert_allclose(landmarks_of(response), cluster.expected(k), atol=1e-2)
    assert held_at_death, "the kill left jobs behind to be taken over"
    rescued = survivor.metrics()
    assert rescued["jlad_queue_claimed_total"] >= len(held_at_death)
    assert rescued["jlad_queue_retried_total"] >= len(held_at_death)
    # Exactly one reply per request reached a waiting request; any second one was dropped.
    delivered = sum(replies_delivered(api) for api in cluster.apis) - delivered_before
    assert delivered == len(results)
    wait_for(cluster.queue_is_empty, 10, "the queue to drain")
    cluster.stop_workers()


def test_sigterm_worker_finishes_and_acknowledges_its_batch_then_exits(
    cluster: Cluster,
) -> None:
    (worker,) = cluster.start_workers("w-term", max_batch_size="16")
    consumer = cluster.consumer_of(worker)
    mask = np.zeros(chelsea().shape[:2], np.uint8)
    mask[100:200, 150:300] = 1
    files = [("source", ("s.png", IMAGES[0])), ("mask", ("m.png", encode(mask)))]
    files += [("targets", (f"t{i}.png", IMAGES[1 + i % 2])) for i in range(12)]
    with ThreadPoolExecutor(1) as pool:
        answer: Future[httpx.Response] = pool.submit(
            httpx.post, cluster.apis[0].url + "/propagate", files=files, timeout=60
        )
        wait_for(lambda: cluster.pending_of(consumer), 30, "the worker to hold the job")
        time.sleep(0.15)  # past max_wait: thirteen images are going through the backbone
        assert not answer.done()
        worker.signal(signal.SIGTERM)
        response = answer.result(timeout=60)
    assert worker.process.wait(30) == 0
    assert response.status_code == 200, response.text
    assert len(response.json()["masks"]) == 12
    log = worker.log()
    assert "received SIGTERM" in log and "stopped after 1 batches" in log
    assert cluster.queue_is_empty(), "acknowledged and deleted before exiting"
    client = cluster.redis.client()
    consumers = [c["name"].decode() for c in client.xinfo_consumers(STREAM, GROUP)]
    client.close()
    assert consumer not in consumers, "a worker that stopped cleanly leaves the group"
    cluster.stop_workers()


def test_redis_outage_answers_503_fast_and_everything_recovers_by_itself(
    cluster: Cluster,
) -> None:
    (worker,) = cluster.start_workers("w-outage")
    assert post_landmarks(cluster.apis[0], IMAGES[0]).status_code == 200
    cluster.redis.stop()
    for api in cluster.apis:
        started = time.monotonic()
        refused = post_landmarks(api, IMAGES[0])
        assert time.monotonic() - started < 1.5, "no hanging while Redis is away"
        assert "Redis" in assert_problem(refused, 503, "not-ready")["detail"]
        assert_problem(api.get("/readyz"), 503, "not-ready")
    wait_for(lambda: worker.get("/readyz").status_code == 503, 10, "the worker not ready")
    cluster.redis.start()  # same port, empty: the stream and group are gone too
    for process in [*cluster.apis, worker]:
        wait_for(process.is_ready, 15, f"{process.name} ready again", interval_s=0.1)
    for i, api in enumerate(cluster.apis):
        response = post_landmarks(api, IMAGES[i + 1])
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(landmarks_of(response), cluster.expected(i + 1), atol=1e-2)
    assert all(api.process.poll() is None for api in cluster.apis), "nothing restarted"
    cluster.stop_workers()


def test_two_api_processes_on_one_port_each_count_their_own_requests(cluster: Cluster) -> None:
    """JLAD_API_PROCESSES=2: one port, two uvicorn worker processes in front of the queue.
    Answers are right whichever process takes the connection, and /metrics is per process
    (`jlad_api_process_info` names it): the two processes' request counters add up to the
    requests sent."""
    cluster.start_workers("w-ports")
    env = queue_environment(cluster.model_dir, cluster.redis.url, api_processes="2")
    api = start_process("service", "api-2p", env, cluster.directory)
    try:
        api.wait_ready()
        sent = 12
        for i in range(sent):  # a new connection each: the kernel spreads them
            response = post_landmarks(api, IMAGES[i % 3])
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(landmarks_of(response), cluster.expected(i % 3), atol=1e-2)
        counts: dict[str, float] = {}

        def both_seen() -> bool:
            metrics = api.metrics()
            (pid,) = [k for k in metrics if k.startswith("jlad_api_process_info")]
            counts[pid] = metrics.get('jlad_requests_total{route="/landmarks",status="200"}', 0)
            return len(counts) == 2

        wait_for(both_seen, 30, "/metrics answered by both API processes", interval_s=0.05)
        assert sum(counts.values()) == sent
    finally:
        assert api.stop() in (0, -signal.SIGTERM)
        cluster.stop_workers()
