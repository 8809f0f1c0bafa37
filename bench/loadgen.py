"""An async load generator for a running jlad service (loopback only).

Two ways to load it, both bounded by a request count and a time limit:

- closed loop (`concurrency` users, each sending its next request when the previous one is
  answered): a concurrency sweep gives throughput against concurrency;
- open loop (requests arrive at a fixed `rate` per second, whether or not earlier ones were
  answered): what happens at a given fraction of saturation, 429s included.

Request bodies are encoded once (multipart with the same images every time), so the load
generator spends its CPU on HTTP only. Per level it reports throughput (200 answers completed
in the measurement window, per second), p50/p95/p99 latency of the 200 answers, answers by
status, the latency of 429 answers, how many accepted requests met their deadline, and the
average batch size the service formed (from the `jlad_batch_size_*` histograms of /metrics).

    python -m bench.loadgen --url http://127.0.0.1:8000 --endpoint landmarks --response npz \
        --concurrency 1,2,4,8 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench.common import encode_image, latency_summary, parse_int_list, synthetic_rgb, write_json

log = logging.getLogger("bench.loadgen")

MEDIA = {"json": "application/json", "npz": "application/x-npz"}
IMAGE_MEDIA = {"jpeg": "image/jpeg", "png": "image/png"}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
CLIENT_OVERFLOW = "client-overflow"  # open loop: more requests in flight than it may hold


def require_loopback(url: str) -> str:
    """`url` without a trailing slash; refuses anything but a loopback host (the load
    generator must never be pointed at someone else's service)."""
    host = urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"{url}: the load generator only talks to loopback (127.0.0.1)")
    return url.rstrip("/")


@dataclass(frozen=True)
class Payload:
    """One pre-encoded request: the same bytes are sent every time."""

    endpoint: str  # landmarks | correspond
    response: str  # json | npz
    body: bytes
    headers: dict[str, str]
    images: int  # images the request puts through the backbone

    @property
    def path(self) -> str:
        return "/" + self.endpoint

    @property
    def expected_media(self) -> str:
        return MEDIA[self.response]


def build_payload(
    endpoint: str,
    response: str,
    *,
    size: tuple[int, int] = (256, 256),
    image_format: str = "jpeg",
    model: str | None = None,
) -> Payload:
    """A multipart request for `endpoint` with synthetic `size` (H, W) images, asking for
    `response` (json or npz). /correspond sends two different images (source, target)."""
    if endpoint not in ("landmarks", "correspond"):
        raise ValueError(f"unknown endpoint {endpoint!r}")
    h, w = size
    media = IMAGE_MEDIA[image_format]
    names = ["image"] if endpoint == "landmarks" else ["source", "target"]
    files = {
        name: (f"{name}.{image_format}", encode_image(synthetic_rgb(h, w, seed=i), image_format))
        for i, name in enumerate(names)
    }
    data = {"model": model} if model else None
    request = httpx.Request(
        "POST",
        "http://127.0.0.1/" + endpoint,
        files={k: (name, content, media) for k, (name, content) in files.items()},
        data=data,
    )
    body = request.read()
    headers = {"content-type": request.headers["content-type"], "accept": MEDIA[response]}
    return Payload(endpoint, response, body, headers, images=len(names))


@dataclass
class Sample:
    """One request: start and end (seconds since the level began) and how it ended."""

    start: float
    end: float
    status: int | str
    user: int = -1  # closed loop: which client sent it
    timings: dict[str, float] | None = None  # the service's `timings_ms` (JSON answers)

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LevelResult:
    """One load level: closed loop at `concurrency`, or open loop at `offered_rps`."""

    mode: str  # closed | open
    concurrency: int | None
    offered_rps: float | None
    window_s: float
    issued: int
    throughput_rps: float  # 200 answers per second (see summarise)
    window_rps: float  # 200 answers completed in the window / its length
    images_per_s: float
    latency: dict[str, float | None]  # of 200 answers that started in the window
    statuses: dict[str, int]  # every answer that started in the window, by status
    rejected_latency: dict[str, float | None]  # of 429 answers
    deadline_ms: float | None = None
    accepted: int = 0  # answers that were not 429
    deadline_met: int = 0  # of them, 200 within the deadline
    batch: dict[str, float | None] = field(default_factory=dict)
    # Medians of the service's own timings_ms (JSON answers only), and what they leave out.
    server_ms: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")


# -- /metrics ------------------------------------------------------------------------------


def batch_counters(metrics_text: str) -> dict[str, float]:
    """Totals of the batcher histograms in Prometheus text: `images_sum`, `jobs_sum`,
    `seconds_sum` (time running batches) and `batches` (summed over models)."""
    names = {
        "jlad_batch_size_images_sum": "images_sum",
        "jlad_batch_size_jobs_sum": "jobs_sum",
        "jlad_batch_duration_seconds_sum": "seconds_sum",
        "jlad_batch_size_images_count": "batches",
    }
    totals = dict.fromkeys(names.values(), 0.0)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in names:
                totals[names[sample.name]] += sample.value
    return totals


async def scrape_batches(
    client: httpx.AsyncClient, metrics_urls: Sequence[str]
) -> dict[str, float]:
    """`batch_counters` summed over every process that runs batches."""
    totals: dict[str, float] = {}
    for url in metrics_urls:
        response = await client.get(url + "/metrics")
        response.raise_for_status()
        for key, value in batch_counters(response.text).items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def batch_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Average batch (images, jobs, milliseconds running it) of the batches run between
    two scrapes."""
    batches = after["batches"] - before["batches"]
    if batches <= 0:
        return {"batches": 0, "avg_images": None, "avg_jobs": None, "avg_ms": None}
    return {
        "batches": batches,
        "avg_images": (after["images_sum"] - before["images_sum"]) / batches,
        "avg_jobs": (after["jobs_sum"] - before["jobs_sum"]) / batches,
        "avg_ms": 1000 * (after["seconds_sum"] - before["seconds_sum"]) / batches,
    }


# -- sending -------------------------------------------------------------------------------


def make_client(connections: int, timeout_s: float = 120.0) -> httpx.AsyncClient:
    """An HTTP/1.1 client that keeps up to `connections` connections open, ignores proxy
    settings of the environment (loopback only) and times out after `timeout_s`."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False)


async def send(
    client: httpx.AsyncClient,
    url: str,
    payload: Payload,
    origin: float,
    deadline_ms: float | None,
    user: int = -1,
) -> Sample:
    """Send `payload` to `url` once; times relative to `origin` (perf_counter)."""
    headers = payload.headers
    if deadline_ms is not None:
        headers = {**headers, "x-deadline-ms": str(max(1, round(deadline_ms)))}
    started = time.perf_counter()
    status: int | str
    timings = None
    try:
        response = await client.post(url + payload.path, content=payload.body, headers=headers)
        ended = time.perf_counter()
        status = response.status_code
        # A 200 in another format would measure something else than asked: count it apart.
        if status == 200 and not response.headers.get("content-type", "").startswith(
            payload.expected_media
        ):
            status = "wrong-content-type"
        elif status == 200 and payload.response == "json":
            timings = response.json().get("timings_ms")
    except httpx.TimeoutException:
        status, ended = "timeout", time.perf_counter()
    except httpx.HTTPError as exc:
        status, ended = type(exc).__name__, time.perf_counter()
    return Sample(started - origin, ended - origin, status, user, timings)


async def closed_loop(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    payload: Payload,
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    max_requests: int,
    deadline_ms: float | None = None,
) -> tuple[list[Sample], float]:
    """`concurrency` users send requests back to back for `warmup_s + duration_s` seconds or
    `max_requests` requests, round-robin over `urls`. Returns the samples and the origin."""
    origin = time.perf_counter()
    stop_at = warmup_s + duration_s
    samples: list[Sample] = []
    issued = 0

    async def user(k: int) -> None:
        nonlocal issued
        while time.perf_counter() - origin < stop_at and issued < max_requests:
            url = urls[issued % len(urls)]
            issued += 1
            samples.append(await send(client, url, payload, origin, deadline_ms, k))

    await asyncio.gather(*(user(k) for k in range(concurrency)))
    return samples, origin


async def open_loop(
    client: httpx.AsyncClient,
    urls: Sequence[str],
    payload: Payload,
    *,
    rate: float,
    duration_s: float,
    max_requests: int,
    max_in_flight: int,
    deadline_ms: float | None = None,
    arrivals: str = "uniform",
    seed: int = 0,
) -> tuple[list[Sample], float]:
    """Requests arrive at `rate` per second for `duration_s` seconds (at most
    `max_requests`): evenly spaced (`uniform`) or as a Poisson process (`poisson`). An
    arrival finding `max_in_flight` requests unanswered is recorded as `client-overflow`."""
    rng = np.random.default_rng(seed)
    origin = time.perf_counter()
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()
    due = 0.0
    issued = 0

    async def one(url: str) -> None:
        samples.append(await send(client, url, payload, origin, deadline_ms))

    while issued < max_requests:
        due += rng.exponential(1 / rate) if arrivals == "poisson" else 1 / rate
        if due >= duration_s:
            break
        await asyncio.sleep(max(0.0, due - (time.perf_counter() - origin)))
        if len(tasks) >= max_in_flight:
            now = time.perf_counter() - origin
            samples.append(Sample(now, now, CLIENT_OVERFLOW))
        else:
            task = asyncio.create_task(one(urls[issued % len(urls)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        issued += 1
    if tasks:
        await asyncio.gather(*tasks)
    return samples, origin


def closed_loop_throughput(samples: Sequence[Sample]) -> float:
    """200 answers per second of a closed loop: the sum over its clients of (200 answers /
    the time from the client's first start to its last end).

    Each client's span holds a whole number of its own requests, so unlike counting
    completions in a fixed window this is not off by up to one batch when answers come
    back in bursts of a batch (8 answers every 1.6 s, say).
    """
    by_user: dict[int, list[Sample]] = {}
    for sample in samples:
        by_user.setdefault(sample.user, []).append(sample)
    total = 0.0
    for mine in by_user.values():
        span = max(s.end for s in mine) - min(s.start for s in mine)
        if span > 0:
            total += sum(s.status == 200 for s in mine) / span
    return total


def server_breakdown(samples: Sequence[Sample]) -> dict[str, float]:
    """Medians (ms) of the `timings_ms` the service put in its JSON answers, plus
    `outside_handler_ms` (client latency - the handler's `total_ms`: HTTP, middleware,
    serialisation, the event loop's queue) and `dispatch_ms` (`wait_ms` - backbone - heads:
    the batcher's wait for company and its thread hand-offs)."""
    timed = [s for s in samples if s.timings and "total_ms" in s.timings]
    if not timed:
        return {}
    keys = sorted({k for s in timed for k in s.timings or {}})
    medians = {k: float(np.median([(s.timings or {}).get(k, 0.0) for s in timed])) for k in keys}
    medians["outside_handler_ms"] = float(
        np.median([s.latency * 1000 - (s.timings or {})["total_ms"] for s in timed])
    )
    medians["dispatch_ms"] = float(
        np.median(
            [
                (s.timings or {}).get("wait_ms", 0.0)
                - (s.timings or {}).get("backbone_ms", 0.0)
                - (s.timings or {}).get("heads_ms", 0.0)
                for s in timed
            ]
        )
    )
    return medians


def summarise(
    samples: Sequence[Sample],
    payload: Payload,
    *,
    window: tuple[float, float],
    mode: str,
    concurrency: int | None = None,
    offered_rps: float | None = None,
    deadline_ms: float | None = None,
    batch: dict[str, float | None] | None = None,
) -> LevelResult:
    """Figures of one level. Latencies and statuses count requests that started in
    `window` (seconds since the level's origin). Throughput: `closed_loop_throughput` for
    a closed loop, else the 200 answers completed in the window per second."""
    start, end = window
    span = max(end - start, 1e-9)
    measured = [s for s in samples if s.start >= start]
    ok_done = [s for s in samples if s.status == 200 and start <= s.end <= end]
    window_rps = len(ok_done) / span
    throughput = closed_loop_throughput(measured) if mode == "closed" else window_rps
    accepted = [s for s in measured if s.status != 429 and s.status != CLIENT_OVERFLOW]
    budget = math.inf if deadline_ms is None else deadline_ms / 1000
    met = [s for s in accepted if s.status == 200 and s.latency <= budget]
    return LevelResult(
        mode=mode,
        concurrency=concurrency,
        offered_rps=offered_rps,
        window_s=span,
        issued=len(samples),
        throughput_rps=throughput,
        window_rps=window_rps,
        images_per_s=throughput * payload.images,
        latency=latency_summary([s.latency for s in measured if s.status == 200]),
        statuses=dict(sorted(Counter(str(s.status) for s in measured).items())),
        rejected_latency=latency_summary([s.latency for s in measured if s.status == 429]),
        deadline_ms=deadline_ms,
        accepted=len(accepted),
        deadline_met=len(met),
        batch=batch or {},
        server_ms=server_breakdown([s for s in measured if s.status == 200]),
    )


@dataclass
class Target:
    """Where to send load: API base URLs (round-robin) and the processes whose /metrics
    count the batches (the API in local mode, the workers in Redis mode)."""

    urls: list[str]
    metrics_urls: list[str]

    def __post_init__(self) -> None:
        self.urls = [require_loopback(u) for u in self.urls]
        self.metrics_urls = [require_loopback(u) for u in self.metrics_urls]


async def _with_batches(
    client: httpx.AsyncClient, target: Target, warmup_s: float, level: Any
) -> tuple[Any, dict[str, float | None]]:
    """Run the coroutine `level`, scraping batch counters when its warm-up ends and after."""

    async def scrape_after_warmup() -> dict[str, float]:
        await asyncio.sleep(warmup_s)
        return await scrape_batches(client, target.metrics_urls)

    before_task = asyncio.create_task(scrape_after_warmup())
    outcome = await level
    before = await before_task
    after = await scrape_batches(client, target.metrics_urls)
    return outcome, batch_delta(before, after)


async def sweep(
    target: Target,
    payload: Payload,
    concurrencies: Sequence[int],
    *,
    warmup_s: float,
    duration_s: float,
    max_requests: int,
    deadline_ms: float | None = None,
    label: str = "",
) -> list[LevelResult]:
    """A closed-loop level per concurrency, one after the other."""
    results = []
    async with make_client(max(concurrencies) + 4) as client:
        for c in tqdm(concurrencies, desc=f"sweep {label}".strip(), unit="level", leave=False):
            (samples, _), batch = await _with_batches(
                client,
                target,
                warmup_s,
                closed_loop(
                    client,
                    target.urls,
                    payload,
                    concurrency=c,
                    warmup_s=warmup_s,
                    duration_s=duration_s,
                    max_requests=max_requests,
                    deadline_ms=deadline_ms,
                ),
            )
            result = summarise(
                samples,
                payload,
                window=(warmup_s, warmup_s + duration_s),
                mode="closed",
                concurrency=c,
                deadline_ms=deadline_ms,
                batch=batch,
            )
            log.info(
                "%s c=%d: %.2f req/s, p50 %s ms, p99 %s ms, statuses %s, avg batch %s",
                label,
                c,
                result.throughput_rps,
                _ms(result.latency["p50_ms"]),
                _ms(result.latency["p99_ms"]),
                result.statuses,
                result.batch.get("avg_images"),
            )
            results.append(result)
    return results


async def fixed_rate(
    target: Target,
    payload: Payload,
    rate: float,
    *,
    warmup_s: float,
    duration_s: float,
    max_requests: int,
    deadline_ms: float | None,
    max_in_flight: int = 512,
    arrivals: str = "uniform",
    label: str = "",
) -> LevelResult:
    """One open-loop level at `rate` requests per second."""
    async with make_client(max_in_flight) as client:
        (samples, _), batch = await _with_batches(
            client,
            target,
            warmup_s,
            open_loop(
                client,
                target.urls,
                payload,
                rate=rate,
                duration_s=warmup_s + duration_s,
                max_requests=max_requests,
                max_in_flight=max_in_flight,
                deadline_ms=deadline_ms,
                arrivals=arrivals,
            ),
        )
    result = summarise(
        samples,
        payload,
        window=(warmup_s, warmup_s + duration_s),
        mode="open",
        offered_rps=rate,
        deadline_ms=deadline_ms,
        batch=batch,
    )
    log.info(
        "%s rate %.2f/s: %.2f ok/s, statuses %s, p99 %s ms, 429 p99 %s ms, deadline met %d/%d",
        label,
        rate,
        result.throughput_rps,
        result.statuses,
        _ms(result.latency["p99_ms"]),
        _ms(result.rejected_latency["p99_ms"]),
        result.deadline_met,
        result.accepted,
    )
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", required=True, help="API base URL (repeat)")
    parser.add_argument(
        "--metrics-url", action="append", help="processes running batches (default: --url)"
    )
    parser.add_argument("--endpoint", default="landmarks", choices=["landmarks", "correspond"])
    parser.add_argument("--response", default="npz", choices=sorted(MEDIA))
    parser.add_argument("--image-size", default="256x256", help="WxH of the synthetic images")
    parser.add_argument("--image-format", default="jpeg", choices=sorted(IMAGE_MEDIA))
    parser.add_argument("--concurrency", type=parse_int_list, default=[1, 2, 4, 8])
    parser.add_argument("--rate", type=float, help="open loop at this many requests/s instead")
    parser.add_argument("--arrivals", default="uniform", choices=["uniform", "poisson"])
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--deadline-ms", type=float, help="X-Deadline-Ms to send")
    parser.add_argument("--out", type=Path, help="write the levels as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    target = Target(args.url, args.metrics_url or args.url)
    payload = build_payload(
        args.endpoint, args.response, size=(height, width), image_format=args.image_format
    )
    common: dict[str, Any] = {
        "warmup_s": args.warmup,
        "duration_s": args.seconds,
        "max_requests": args.max_requests,
        "deadline_ms": args.deadline_ms,
        "label": f"{args.endpoint}/{args.response}",
    }
    if args.rate:
        levels = [
            asyncio.run(fixed_rate(target, payload, args.rate, arrivals=args.arrivals, **common))
        ]
    else:
        levels = asyncio.run(sweep(target, payload, args.concurrency, **common))
    document = [asdict(level) for level in levels]
    if args.out:
        write_json(args.out, document)
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
