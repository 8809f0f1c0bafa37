"""What one running app holds: settings, metrics, models, the dispatcher, readiness."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.requests import Request

from service.jobs import Dispatcher
from service.metrics import ServiceMetrics
from service.problems import NOT_READY, UNKNOWN_MODEL, Problem
from service.runtime import InferenceEngine, ModelInfo
from service.settings import Settings


@dataclass
class ServiceState:
    """Shared by every request of one app (on `app.state.jlad`)."""

    settings: Settings
    metrics: ServiceMetrics
    models: dict[str, ModelInfo] = field(default_factory=dict)
    engine: InferenceEngine | None = None
    dispatcher: Dispatcher | None = None
    loaded: bool = False
    error: str | None = None
    stopping: bool = False
    load_task: asyncio.Task[None] | None = None
    # Decoding and rendering run on worker threads; this bounds how many at once (memory).
    cpu_limiter: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(max(2, os.cpu_count() or 2))
    )

    @property
    def ready(self) -> bool:
        return (
            self.loaded
            and not self.stopping
            and self.dispatcher is not None
            and self.dispatcher.ready
        )

    def not_ready_reason(self) -> str:
        if self.stopping:
            return "the service is shutting down"
        if self.error:
            return self.error
        if not self.loaded:
            return "models are still loading and warming up"
        # A dispatcher may say why itself (e.g. the Redis queue: "Redis unreachable").
        reason = self.dispatcher.describe().get("not_ready_reason") if self.dispatcher else None
        return str(reason) if reason else "the dispatcher is not accepting jobs"

    def require_ready(self) -> Dispatcher:
        """The dispatcher, or a 503 problem saying why requests cannot be served yet, or
        `QueueFull` (429) when it has no room for another job right now."""
        if not self.ready or self.dispatcher is None:
            raise Problem(NOT_READY, self.not_ready_reason(), headers={"Retry-After": "5"})
        self.dispatcher.check_room()
        return self.dispatcher

    def require_model(self, name: str | None) -> ModelInfo:
        """The served model called `name` (default model when None), or a 404 problem."""
        wanted = name or self.settings.default_model
        if wanted not in self.models:
            served = ", ".join(sorted(self.models)) or "none (not loaded)"
            raise Problem(
                UNKNOWN_MODEL,
                f"model '{wanted}' is not served; served models: {served} (GET /models)",
                extra={"model": wanted, "available": sorted(self.models)},
            )
        return self.models[wanted]

    def describe_models(self) -> list[dict[str, Any]]:
        if self.engine is not None:
            return self.engine.describe()
        return [{"name": n, "version": i.version} for n, i in self.models.items()]


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.jlad
    return state
