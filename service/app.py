"""The FastAPI app factory: settings in, a ready-to-serve ASGI app out.

Start-up loads the models on a background task (so /healthz answers at once and /readyz
says when loading is done), verifies their checksums, picks the execution provider, warms
every graph up and starts the dispatcher. Shutdown stops taking jobs and drains them.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import problems
from service.batching import Batcher
from service.demo import install_demo
from service.heap import freeze_startup_heap
from service.jobs import (
    DeadlineExceeded,
    Dispatcher,
    InferenceFailed,
    QueueFull,
    ShuttingDown,
)
from service.metrics import ServiceMetrics
from service.middleware import BodyLimitMiddleware, RequestContextMiddleware, RootPathMiddleware
from service.openapi import install_openapi
from service.problems import Problem, ProblemKind, problem_response
from service.routes import api, public
from service.runtime import ModelLoadError, find_models, load_engine
from service.settings import Settings
from service.state import ServiceState

log = logging.getLogger(__name__)


def make_dispatcher(state: ServiceState) -> Dispatcher:
    """The dispatcher JLAD_QUEUE asks for.

    `redis` is provided by `service.queue.RedisDispatcher(settings, metrics)`, which has to
    implement the `service.jobs.Dispatcher` protocol.
    """
    settings = state.settings
    if settings.queue == "redis":
        module = importlib.import_module("service.queue")
        dispatcher: Dispatcher = module.RedisDispatcher(settings, state.metrics)
        return dispatcher
    if state.engine is None:
        raise ModelLoadError("no inference engine loaded")
    return Batcher(
        state.engine.run_batch,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
        max_queue=settings.max_queue,
        metrics=state.metrics,
        inference_nice=settings.inference_nice,
    )


async def load_and_start(state: ServiceState) -> None:
    """Read the repository, load and warm up the models, start the dispatcher.

    A failure is kept in `state.error` (/readyz reports it) rather than crashing the process.
    """
    settings = state.settings
    try:
        state.models = await anyio.to_thread.run_sync(
            find_models, settings.model_dir, settings.models
        )
        if settings.default_model not in state.models:
            raise ModelLoadError(
                f"JLAD_DEFAULT_MODEL '{settings.default_model}' is not among the served models "
                f"({', '.join(state.models)})"
            )
        if settings.queue == "local":
            state.engine = await anyio.to_thread.run_sync(
                load_engine, state.models, settings, state.metrics
            )
        dispatcher = make_dispatcher(state)
        await dispatcher.start()
        state.dispatcher = dispatcher
        freeze_startup_heap()  # before /readyz says ready: see service/heap.py
        state.loaded = True
        state.metrics.ready.set(1)
        log.info("ready", extra={"models": state.describe_models()})
    except (ModelLoadError, OSError, ImportError) as exc:
        state.error = str(exc)
        log.error("not ready: %s", exc)
    except Exception as exc:  # e.g. the queue backend refusing to start: still report it
        state.error = f"start-up failed: {type(exc).__name__}: {exc}"
        log.exception("not ready")


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app with its own state, metrics registry and dispatcher."""
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=ServiceMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.load_task = asyncio.create_task(load_and_start(state), name="jlad-load")
        yield
        state.stopping = True
        state.metrics.ready.set(0)
        if not state.load_task.done():
            state.load_task.cancel()
        if state.dispatcher is not None:
            await state.dispatcher.close(settings.shutdown_grace_s)
        log.info("stopped")

    app = FastAPI(
        title="jlad",
        summary="Semantic correspondence and unsupervised landmarks (Jeon et al., ICCV 2019)",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.jlad = state
    app.include_router(public)
    app.include_router(api)
    install_demo(app)
    install_problem_handlers(app)
    # Added last = outermost: the request id exists before any limit answers.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=state.metrics)
    app.add_middleware(RootPathMiddleware, root_path=settings.root_path)
    install_openapi(app, settings)
    return app


def _request_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return str(value) if value else None


def _problem(
    request: Request,
    kind: ProblemKind,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return problem_response(
        kind,
        detail,
        instance=request.url.path,
        headers=headers,
        request_id=_request_id(request),
        **extra,
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Every error the app can raise becomes application/problem+json."""

    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return _problem(request, exc.kind, exc.detail, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        return _problem(request, problems.VALIDATION_ERROR, detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = problems.kind_for_status(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else kind.title
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs"
        return _problem(request, kind, detail, dict(exc.headers or {}))

    @app.exception_handler(QueueFull)
    async def on_queue_full(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QueueFull)
        retry = max(1, math.ceil(exc.retry_after_s))
        return _problem(
            request,
            problems.QUEUE_FULL,
            f"the inference queue is full ({exc}); retry in {retry} s",
            {"Retry-After": str(retry)},
            retry_after_s=retry,
        )

    @app.exception_handler(DeadlineExceeded)
    async def on_deadline(request: Request, exc: Exception) -> JSONResponse:
        return _problem(
            request,
            problems.DEADLINE_EXCEEDED,
            f"{exc}; allow more time with the X-Deadline-Ms header or retry later",
        )

    @app.exception_handler(ShuttingDown)
    async def on_shutdown(request: Request, exc: Exception) -> JSONResponse:
        return _problem(request, problems.NOT_READY, str(exc), {"Retry-After": "5"})

    @app.exception_handler(InferenceFailed)
    async def on_inference_failed(request: Request, exc: Exception) -> JSONResponse:
        return _problem(request, problems.INTERNAL_ERROR, f"inference failed: {exc}")


def uvicorn_config(settings: Settings, app: FastAPI | str | None = None) -> uvicorn.Config:
    """uvicorn settings that honour JLAD_*: bind, proxies, graceful shutdown, our logs.
    `app` as an import string names an app factory (each worker process calls it)."""
    trusted = settings.trusted_proxies
    return uvicorn.Config(
        app or create_app(settings),
        factory=isinstance(app, str),
        workers=settings.api_processes if isinstance(app, str) else None,
        host=settings.host,
        port=settings.port,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=",".join(trusted) if trusted else "",
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        server_header=False,
    )
