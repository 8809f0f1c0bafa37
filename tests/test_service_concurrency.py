"""Many clients at once: batches form, answers stay with their requests; 429 and 504."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service_support import (
    RunningServer,
    assert_problem,
    astronaut,
    chelsea,
    coffee,
    encode,
    inference_held,
    serve,
    service_settings,
)


def distinct_pairs(n: int) -> list[tuple[bytes, bytes]]:
    """`n` different (source, target) pairs: crops of three photos and shifted crops."""
    photos = [astronaut(), chelsea(), coffee()]
    pairs = []
    for i in range(n):
        photo = photos[i % 3]
        size, off = 160 + 8 * i, 4 * i
        src = np.ascontiguousarray(photo[off : off + size, off : off + size])
        tgt = np.ascontiguousarray(
            photo[off + 10 : off + 10 + size, off + 3 * i : off + 3 * i + size]
        )
        pairs.append((encode(src), encode(tgt)))
    return pairs


def grid_flow(client: httpx.Client, pair: tuple[bytes, bytes]) -> tuple[np.ndarray, dict[str, Any]]:
    files = {"source": ("s.png", pair[0]), "target": ("t.png", pair[1])}
    r = client.post("/correspond", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    flow = np.frombuffer(base64.b64decode(body["flow"]["data"]), "<f4")
    return flow.reshape(body["flow"]["shape"]), body


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[RunningServer]:
    settings = service_settings(
        model_dir, models=["faces"], default_model="faces", max_batch_size=8, max_wait_ms=30
    )
    with serve(settings) as running:
        yield running


def test_simultaneous_clients_get_their_own_results_in_shared_batches(
    server: RunningServer,
) -> None:
    pairs = distinct_pairs(8)
    with server.client() as client:
        references = [grid_flow(client, p)[0] for p in pairs]  # one at a time
    # The test can only see mixing if different requests have different answers.
    gaps = [np.abs(references[i] - references[j]).max() for i in range(8) for j in range(i)]
    assert min(gaps) > 0.5, min(gaps)

    barrier = threading.Barrier(len(pairs))

    def one_client(index: int) -> tuple[np.ndarray, dict[str, Any]]:
        with server.client() as client:
            barrier.wait()
            return grid_flow(client, pairs[index])

    with ThreadPoolExecutor(len(pairs)) as pool:
        answers = list(pool.map(one_client, range(len(pairs))))

    for index, (flow, _) in enumerate(answers):
        # Batched and solo runs differ only by float rounding.
        np.testing.assert_allclose(flow, references[index], atol=0.05)
    assert max(body["batch"]["jobs"] for _, body in answers) > 1

    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["jlad_batch_size_jobs"].samples
    count = next(s.value for s in samples if s.name.endswith("_count"))
    single = next(
        s.value for s in samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0"
    )
    assert count - single >= 1, "no batch held more than one request"


@pytest.fixture(scope="module")
def tight(model_dir: Path) -> Iterator[RunningServer]:
    """One job may wait; with the inference thread held (`inference_held`) the first job
    becomes a batch that cannot start and the next one waits in the queue."""
    settings = service_settings(
        model_dir,
        models=["faces"],
        default_model="faces",
        max_batch_size=2,
        max_wait_ms=1500,
        max_queue=1,
    )
    with serve(settings) as running:
        yield running


def queue_depth(server: RunningServer) -> int:
    dispatcher = server.state.dispatcher
    assert dispatcher is not None
    return int(dispatcher.describe()["queue_depth"])


def wait_for_depth(
    server: RunningServer, depth: int, timeout_s: float = 10, running: int | None = None
) -> None:
    """Until `depth` jobs wait in the queue (and, if given, `running` are in the batch that
    runs)."""
    dispatcher = server.state.dispatcher
    assert dispatcher is not None
    deadline = time.monotonic() + timeout_s
    while True:
        state = dispatcher.describe()
        if state["queue_depth"] == depth and running in (None, state["running_jobs"]):
            return
        assert time.monotonic() < deadline, f"queue never reached {depth} waiting, {state}"
        time.sleep(0.01)


@contextmanager
def queue_filled(server: RunningServer, files: dict[str, Any]) -> Iterator[list[Future[Any]]]:
    """With the inference thread held, one request becomes the batch that cannot start and
    a second waits in the queue (`tight` allows one): the queue is full until the block
    ends. Yields the two requests' futures, which are answered once it has ended."""
    # exits in reverse: the hold ends, the pool waits for the two answers, the clients close
    with (
        server.client() as a,
        server.client() as b,
        ThreadPoolExecutor(2) as pool,
        inference_held(server),
    ):
        running = pool.submit(a.post, "/landmarks", files=files)
        wait_for_depth(server, 0, running=1)
        waiting = pool.submit(b.post, "/landmarks", files=files)
        wait_for_depth(server, 1)
        yield [running, waiting]


def test_full_queue_answers_429_with_retry_after_and_drops_nothing(tight: RunningServer) -> None:
    image = {"image": ("c.png", encode(chelsea()))}
    with queue_filled(tight, image) as held, tight.client() as client:
        refused = client.post("/landmarks", files=image)
        body = assert_problem(refused, 429, "queue-full")
        assert int(refused.headers["retry-after"]) >= 1
        assert body["retry_after_s"] >= 1
    for answer in held:
        assert answer.result(timeout=30).status_code == 200
    assert queue_depth(tight) == 0
    text = httpx.get(tight.url + "/metrics").text
    assert 'jlad_rejected_jobs_total{reason="queue_full"} 1.0' in text


def test_full_queue_refuses_before_parsing_or_decoding_the_upload(tight: RunningServer) -> None:
    # The 429 must not wait for (or depend on) parsing and decoding: an undecodable upload
    # and a body of the wrong type sent while the queue is full are refused as 429, not
    # examined and answered 422 / 415.
    image = {"image": ("c.png", encode(chelsea()))}
    garbage = {"image": ("c.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")}
    not_a_form = {"content": b"not a form", "headers": {"Content-Type": "text/plain"}}
    with tight.client() as client:
        with queue_filled(tight, image) as held:
            assert_problem(client.post("/landmarks", files=garbage), 429, "queue-full")
            assert_problem(client.post("/landmarks", **not_a_form), 429, "queue-full")
        for answer in held:
            assert answer.result(timeout=30).status_code == 200
        assert_problem(client.post("/landmarks", files=garbage), 422, "corrupt-image")
        assert_problem(client.post("/landmarks", **not_a_form), 415, "unsupported-media-type")


def test_deadline_passing_in_the_queue_answers_504(tight: RunningServer) -> None:
    image = {"image": ("c.png", encode(chelsea()))}
    with tight.client() as client, tight.client() as other:
        with ThreadPoolExecutor(1) as pool:
            with inference_held(tight):
                running = pool.submit(other.post, "/landmarks", files=image)
                wait_for_depth(tight, 0, running=1)
                started = time.monotonic()
                r = client.post("/landmarks", files=image, headers={"X-Deadline-Ms": "400"})
                elapsed = time.monotonic() - started
                assert_problem(r, 504, "deadline-exceeded")
                # answered at the deadline, not after the batch would have run
                assert elapsed < 1.4
            assert running.result(timeout=30).status_code == 200
        wait_for_depth(tight, 0)
        ok = client.post("/landmarks", files=image)
        assert ok.status_code == 200
    text = httpx.get(tight.url + "/metrics").text
    assert 'jlad_rejected_jobs_total{reason="deadline"}' in text
