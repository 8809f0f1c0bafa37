"""Prometheus metrics of one app instance (own registry, so tests can build many apps)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    """The service's counters, gauges and histograms (all prefixed `jlad_`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "jlad_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "jlad_request_duration_seconds",
            "Time to answer an HTTP request",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_jobs = Histogram(
            "jlad_batch_size_jobs",
            "Jobs (requests) per batch run by the batcher",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "jlad_batch_size_images",
            "Images per backbone batch",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "jlad_batch_duration_seconds",
            "Time to run one batch on the models",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("jlad_queue_depth", "Jobs waiting for a batch", registry=r)
        self.rejected = Counter(
            "jlad_rejected_jobs",
            "Jobs refused or abandoned by the dispatcher",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge("jlad_ready", "1 when models are loaded and warmed up", registry=r)
        self.provider = Gauge(
            "jlad_execution_provider",
            "1 for the ONNX Runtime execution provider running each model",
            ["model", "version", "provider", "precision"],
            registry=r,
        )
        # Several API processes may share one port (JLAD_API_PROCESSES): every figure here is
        # this process's own; the pid says which process answered the scrape.
        self.process = Gauge(
            "jlad_api_process_info", "1, labelled with this process's pid", ["pid"], registry=r
        )
        self.process.labels(str(os.getpid())).set(1)

    def observe_batch(self, model: str, jobs: int, images: int, seconds: float) -> None:
        self.batch_jobs.labels(model).observe(jobs)
        self.batch_images.labels(model).observe(images)
        self.batch_seconds.labels(model).observe(seconds)

    def render(self) -> bytes:
        """The exposition text for GET /metrics."""
        return generate_latest(self.registry)
