"""HTTP routes: thin handlers that validate, decode off the loop, dispatch and answer.

Request parsing lives in `service.inputs`, turning model outputs into answers in
`service.outputs`; each handler reads top to bottom as the path of one request.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from numpy.typing import NDArray

from service import fields, rendering
from service.imaging import Mask, decode_mask
from service.inputs import (
    JSON,
    NPZ,
    PNG,
    Decoded,
    check_points,
    decode_for_model,
    limits_of,
    merge_options,
    negotiate,
    output_offers,
    parse_body,
)
from service.jobs import DeadlineExceeded, InferenceJob, InferenceResult
from service.outputs import (
    CorrespondOutputs,
    CorrespondPlan,
    batch_info,
    correspond_outputs,
    correspond_png,
    encode_array,
    model_ref,
    npz_bytes,
    propagate_one,
    size_of,
    timings,
)
from service.problems import (
    BAD_REQUEST,
    CORRUPT_IMAGE,
    DEADLINE_EXCEEDED,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    INTERNAL_ERROR,
    INVALID_MASK,
    NOT_ACCEPTABLE,
    NOT_READY,
    POINTS_OUT_OF_BOUNDS,
    QUEUE_FULL,
    TOO_MANY_POINTS,
    UNAUTHORIZED,
    UNKNOWN_MODEL,
    UNSUPPORTED_IMAGE,
    UNSUPPORTED_MEDIA_TYPE,
    UPLOAD_TOO_LARGE,
    VALIDATION_ERROR,
    Problem,
    ProblemKind,
    problem_openapi_responses,
)
from service.runtime import ModelInfo
from service.schemas import (
    CorrespondJSON,
    CorrespondOptions,
    CorrespondResponse,
    CorrespondView,
    FieldDtype,
    HealthResponse,
    ImageSize,
    Landmark,
    LandmarksJSON,
    LandmarksOptions,
    LandmarksResponse,
    LandmarksView,
    Match,
    ModelDescription,
    ModelName,
    ModelsResponse,
    PropagatedMask,
    PropagateJSON,
    PropagateOptions,
    PropagateResponse,
    ReadyResponse,
    Resolution,
    request_body,
)
from service.state import ServiceState, get_state

# -- cross-cutting dependencies ----------------------------------------------------------


async def require_api_key(request: Request) -> None:
    """401 unless a configured key comes as X-API-Key or `Authorization: Bearer <key>`.

    The header is read here rather than declared, so that the OpenAPI document names a
    security scheme only when keys are configured (service.openapi)."""
    keys = get_state(request).settings.api_keys
    if not keys:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise Problem(
            UNAUTHORIZED,
            "a valid API key is required: send it as X-API-Key or Authorization: Bearer",
            headers={"WWW-Authenticate": 'Bearer realm="jlad"'},
        )


async def request_deadline(
    request: Request,
    x_deadline_ms: Annotated[
        int | None,
        Header(ge=1, description="Time budget for this request in ms (default JLAD_DEADLINE_MS)."),
    ] = None,
) -> float:
    """Wall-clock time by which the answer must be ready."""
    settings = get_state(request).settings
    budget = settings.deadline_ms if x_deadline_ms is None else x_deadline_ms
    if budget > settings.max_deadline_ms:
        raise Problem(
            VALIDATION_ERROR,
            f"X-Deadline-Ms {budget} exceeds the largest allowed ({settings.max_deadline_ms})",
        )
    return time.time() + budget / 1000.0


async def state_dependency(request: Request) -> ServiceState:
    """`get_state` as a dependency.

    Dependencies are `async def` although they never await: FastAPI hands each plain `def`
    dependency to a worker thread and back, two thread switches per dependency per request
    (~0.2 ms of `/correspond`'s time at concurrency 1 on a 2-core VM, py-spy)."""
    return get_state(request)


Deadline = Annotated[float, Depends(request_deadline)]
State = Annotated[ServiceState, Depends(state_dependency)]


# -- content negotiation -----------------------------------------------------------------


# -- request bodies ----------------------------------------------------------------------


async def in_thread(state: ServiceState, fn: Callable[[], Any]) -> Any:
    """Run CPU-bound `fn` on a worker thread, off the event loop."""
    return await anyio.to_thread.run_sync(fn, limiter=state.cpu_limiter)


async def inline_or_thread(state: ServiceState, fn: Callable[[], Any], inline: bool) -> Any:
    """`fn()` on the event loop when `inline` (small work, for which the two thread hand-offs
    of `in_thread` cost more: on a busy machine each waits for a core, bench/ceiling.py),
    else on a worker thread. The INLINE_* limits below say what is small."""
    return fn() if inline else await in_thread(state, fn)


# Uploads up to this size (a 256x256 JPEG is ~20 kB) decode in about a millisecond: on the
# event loop that is cheaper than the two thread hand-offs of `in_thread`, which on a busy
# machine each wait for a core (bench/ceiling.py). Larger ones decode on a worker thread.
INLINE_DECODE_BYTES = 64 * 1024


async def decode_in_place(state: ServiceState, fn: Callable[[], Any], nbytes: int) -> Any:
    """`fn()` (a decode of `nbytes` of uploads): inline when small, else on a worker thread."""
    return await inline_or_thread(state, fn, nbytes <= INLINE_DECODE_BYTES)


async def decode_pair_concurrently(
    first: Callable[[], Decoded], second: Callable[[], Decoded]
) -> tuple[Decoded, Decoded]:
    """Two small decodes at once: `second` on the loop's executor thread while the loop runs
    `first` (Pillow releases the GIL while it decodes), one thread hand-off instead of the
    two of `in_thread` and half the wall time of decoding both inline at concurrency 1.
    `first`'s error wins over `second`'s, as when they ran in that order."""
    pending = asyncio.get_running_loop().run_in_executor(None, second)
    try:
        one = first()
    except BaseException:
        await asyncio.gather(pending, return_exceptions=True)
        raise
    return one, await pending


# Fields of up to this many cells (the model grid's 32 x 32 by default) are computed on the
# event loop: a grid-sized field is a few array copies, cheaper than the thread hand-offs.
INLINE_FIELD_CELLS = 64 * 64


# Up to this many bytes of arrays, writing an (uncompressed) npz answer on the event loop
# costs less than the two thread hand-offs of `in_thread` (bench/ceiling.py profile).
INLINE_NPZ_BYTES = 1 << 20


async def npz_answer(state: ServiceState, arrays: dict[str, Any]) -> bytes:
    """The npz bytes of `arrays`: written inline when small, else on a worker thread."""
    nbytes = sum(getattr(a, "nbytes", 0) for a in arrays.values())
    data: bytes = await inline_or_thread(
        state, partial(npz_bytes, arrays), nbytes <= INLINE_NPZ_BYTES
    )
    return data


def check_deadline(deadline: float) -> None:
    if time.time() >= deadline:
        raise DeadlineExceeded("the deadline passed while decoding the request")


async def run_job(state: ServiceState, job: InferenceJob) -> tuple[InferenceResult, float]:
    """Submit `job`; returns its result and the ms spent waiting for it."""
    dispatcher = state.require_ready()
    check_deadline(job.deadline)
    started = time.perf_counter()
    result = await dispatcher.submit(job)
    return result, (time.perf_counter() - started) * 1000


# -- routes ------------------------------------------------------------------------------

public = APIRouter(tags=["operations"])
api = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)])

# The 401 (UNAUTHORIZED) of the `api` routes is documented only when keys are configured
# (service.openapi).
_INPUT_PROBLEMS = (
    BAD_REQUEST,
    UNKNOWN_MODEL,
    NOT_ACCEPTABLE,
    UPLOAD_TOO_LARGE,
    IMAGE_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    UNSUPPORTED_IMAGE,
    VALIDATION_ERROR,
    CORRUPT_IMAGE,
    IMAGE_TOO_SMALL,
    QUEUE_FULL,
    INTERNAL_ERROR,
    NOT_READY,
    DEADLINE_EXCEEDED,
)


def _answers(what: str, path: str, *problems: ProblemKind) -> dict[int | str, dict[str, Any]]:
    """`responses` of an inference route: `what` as JSON (the response model), PNG or .npz,
    and its problems."""
    return {
        200: {
            "description": f"{what}: JSON by default; a PNG rendering with Accept: image/png or "
            "a `view`; lossless arrays with Accept: application/x-npz",
            "content": {
                PNG: {"schema": {"type": "string", "format": "binary"}},
                NPZ: {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **problem_openapi_responses(*_INPUT_PROBLEMS, *problems, instance=path),
    }


IMAGE_PART = "Image file (PNG, JPEG, WebP, TIFF, BMP, GIF)"


@public.get(
    "/healthz",
    response_model=HealthResponse,
    summary="Liveness: the process answers",
    operation_id="healthz",
)
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@public.get(
    "/readyz",
    operation_id="readyz",
    response_model=ReadyResponse,
    summary="Readiness: models loaded and warmed up, dispatcher accepting",
    responses=problem_openapi_responses(NOT_READY),
)
async def readyz(state: State) -> ReadyResponse:
    if not state.ready or state.dispatcher is None:
        raise Problem(
            NOT_READY,
            state.not_ready_reason(),
            extra={"models": state.describe_models(), "loaded": state.loaded},
        )
    return ReadyResponse(
        status="ready", models=state.describe_models(), dispatcher=state.dispatcher.describe()
    )


@public.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


def describe_model(state: ServiceState, info: ModelInfo) -> ModelDescription:
    runtime = {m["name"]: m for m in state.describe_models()}.get(info.name, {})
    (h, w), (gh, gw) = info.input_size, info.grid_size
    return ModelDescription(
        name=info.name,
        version=info.version,
        description=str(info.manifest.get("description", "")),
        precision=runtime.get("precision"),
        provider=runtime.get("provider"),
        input_size=ImageSize(width=w, height=h),
        grid_size=ImageSize(width=gw, height=gh),
        num_landmarks=info.num_landmarks,
        default=info.name == state.settings.default_model,
        manifest=info.manifest,
    )


@api.get(
    "/models",
    operation_id="list_models",
    response_model=ModelsResponse,
    summary="The served models and manifests",
)
async def list_models(state: State) -> ModelsResponse:
    return ModelsResponse(
        default_model=state.settings.default_model,
        models=[describe_model(state, info) for info in state.models.values()],
    )


@api.get(
    "/models/{name}",
    operation_id="get_model",
    response_model=ModelDescription,
    summary="One served model",
    responses=problem_openapi_responses(UNKNOWN_MODEL, instance="/models/zebra"),
)
async def get_model(state: State, name: Annotated[str, Path()]) -> ModelDescription:
    return describe_model(state, state.require_model(name))


@api.post(
    "/landmarks",
    operation_id="landmarks",
    response_model=LandmarksResponse,
    summary="K landmarks of one image, in its pixel coordinates",
    responses=_answers("The landmarks", "/landmarks"),
    openapi_extra=request_body(LandmarksJSON, {"image": IMAGE_PART}),
)
async def landmarks(
    request: Request,
    state: State,
    deadline: Deadline,
    model: Annotated[ModelName | None, Query(description="Model name.")] = None,
    view: Annotated[LandmarksView | None, Query(description="PNG rendering.")] = None,
) -> Any:
    started = time.perf_counter()
    state.require_ready()  # 503 / 429 before any parsing: see check_room
    body = await parse_body(request, state, LandmarksJSON, ["image"])
    opts = merge_options(LandmarksOptions, body, {"model": model, "view": view})
    info = state.require_model(opts.model)
    output = negotiate(request.headers.get("accept"), output_offers(opts.view is not None))
    decode_start = time.perf_counter()
    image: Decoded = await decode_in_place(
        state,
        partial(decode_for_model, body.files["image"], limits_of(state), info, "image"),
        len(body.files["image"]),
    )
    decode_ms = (time.perf_counter() - decode_start) * 1000
    job = InferenceJob(
        info.name,
        image.pixels[None],
        landmarks=[0],
        deadline=deadline,
        request_id=request.state.request_id,
    )
    result, wait_ms = await run_job(state, job)
    lm = result.landmarks[0]
    width, height = image.size
    points = fields.landmarks_to_pixels(lm.points, width, height)
    if output == PNG:
        draw = (
            partial(rendering.heatmaps_png, image.rgb, lm.heatmaps)
            if opts.view == "heatmaps"
            else partial(rendering.landmarks_png, [image.rgb], [points])
        )
        return Response(await in_thread(state, draw), media_type=PNG)
    if output == NPZ:
        arrays = {"points": points, "confidence": lm.confidence, "heatmaps": lm.heatmaps}
        return Response(await npz_answer(state, arrays), media_type=NPZ)
    return LandmarksResponse(
        model=model_ref(info),
        image_size=size_of(image.size),
        landmarks=[
            Landmark(index=i, x=float(x), y=float(y), confidence=float(c))
            for i, ((x, y), c) in enumerate(zip(points, lm.confidence, strict=True))
        ],
        batch=batch_info(result),
        timings_ms=timings(
            result,
            decode_ms=decode_ms,
            wait_ms=wait_ms,
            total_ms=(time.perf_counter() - started) * 1000,
        ),
    )


@api.post(
    "/correspond",
    operation_id="correspond",
    response_model=CorrespondResponse,
    summary="Dense correspondence (flow + confidence) from a source to a target image",
    responses=_answers("The field", "/correspond", TOO_MANY_POINTS, POINTS_OUT_OF_BOUNDS),
    openapi_extra=request_body(CorrespondJSON, {"source": IMAGE_PART, "target": IMAGE_PART}),
)
async def correspond(
    request: Request,
    state: State,
    deadline: Deadline,
    model: Annotated[ModelName | None, Query(description="Model name.")] = None,
    resolution: Annotated[Resolution | None, Query(description="Field sampling.")] = None,
    dtype: Annotated[FieldDtype | None, Query(description="Array element type.")] = None,
    view: Annotated[CorrespondView | None, Query(description="PNG rendering.")] = None,
) -> Any:
    started = time.perf_counter()
    state.require_ready()  # 503 / 429 before any parsing: see check_room
    body = await parse_body(request, state, CorrespondJSON, ["source", "target"])
    query = {"model": model, "resolution": resolution, "dtype": dtype, "view": view}
    opts = merge_options(CorrespondOptions, body, query)
    info = state.require_model(opts.model)
    output = negotiate(request.headers.get("accept"), output_offers(opts.view is not None))
    if opts.points is not None and len(opts.points) > state.settings.max_query_points:
        raise Problem(
            TOO_MANY_POINTS,
            f"{len(opts.points)} query points; at most {state.settings.max_query_points} "
            "(JLAD_MAX_QUERY_POINTS) per request",
        )
    limits = limits_of(state)
    images = np.empty((2, 3, *info.input_size), np.uint8)

    def decode(slot: int, name: str) -> Decoded:
        return decode_for_model(body.files[name], limits, info, name, out=images[slot])

    decode_start = time.perf_counter()
    uploads = len(body.files["source"]) + len(body.files["target"])
    if uploads <= INLINE_DECODE_BYTES:
        source, target = await decode_pair_concurrently(
            partial(decode, 0, "source"), partial(decode, 1, "target")
        )
    else:
        source, target = await in_thread(state, lambda: (decode(0, "source"), decode(1, "target")))
    decode_ms = (time.perf_counter() - decode_start) * 1000
    if opts.points:
        check_points(np.asarray(opts.points, np.float64).reshape(-1, 2), source.size)
    plan = CorrespondPlan.of(opts, output)
    job = InferenceJob(
        info.name,
        images,
        landmarks=[0, 1] if plan.landmarks else [],
        pairs=plan.pairs(),
        deadline=deadline,
        request_id=request.state.request_id,
    )
    result, wait_ms = await run_job(state, job)
    post_start = time.perf_counter()
    if output == PNG:
        png = await in_thread(state, partial(correspond_png, plan, opts, source, target, result))
        return Response(png, media_type=PNG)
    fields_of = partial(correspond_outputs, plan, opts, source, target, result)
    cells = math.prod(info.grid_size if plan.sampling == "grid" else source.size)
    out: CorrespondOutputs = await inline_or_thread(state, fields_of, cells <= INLINE_FIELD_CELLS)
    if output == NPZ:
        np_dtype = np.float16 if opts.dtype == "float16" else np.float32
        arrays: dict[str, NDArray[Any]] = {
            "flow": out.flow.astype(np_dtype),
            "confidence": out.confidence.astype(np_dtype),
            "direction": np.array(out.direction),
        }
        if out.points is not None and out.matches is not None and out.match_confidence is not None:
            arrays.update(
                points=out.points, matches=out.matches, match_confidence=out.match_confidence
            )
        return Response(await npz_answer(state, arrays), media_type=NPZ)
    flow_b64, conf_b64 = await in_thread(
        state,
        lambda: (encode_array(out.flow, opts.dtype), encode_array(out.confidence, opts.dtype)),
    )
    matches = []
    if out.points is not None and out.matches is not None and out.match_confidence is not None:
        matches = [
            Match(
                source=(float(p[0]), float(p[1])),
                target=(float(q[0]), float(q[1])),
                confidence=float(c),
            )
            for p, q, c in zip(out.points, out.matches, out.match_confidence, strict=True)
        ]
    rows, cols = out.flow.shape[:2]
    return CorrespondResponse(
        model=model_ref(info),
        source_size=size_of(source.size),
        target_size=size_of(target.size),
        sampling=plan.sampling,
        resolution=ImageSize(width=cols, height=rows),
        direction="target->source" if out.direction == "target->source" else "source->target",
        flow=flow_b64,
        confidence=conf_b64,
        matches=matches,
        batch=batch_info(result),
        timings_ms=timings(
            result,
            decode_ms=decode_ms,
            wait_ms=wait_ms,
            postprocess_ms=(time.perf_counter() - post_start) * 1000,
            total_ms=(time.perf_counter() - started) * 1000,
        ),
    )


@api.post(
    "/propagate",
    operation_id="propagate",
    response_model=PropagateResponse,
    summary="Carry a label mask from a source image onto one or more targets",
    responses=_answers("The propagated masks", "/propagate", INVALID_MASK),
    openapi_extra=request_body(
        PropagateJSON,
        {
            "source": IMAGE_PART,
            "mask": "Label mask of the source, at its size: one label per pixel (PNG in "
            "mode L, P, 1 or 16-bit greyscale)",
        },
        {"targets": IMAGE_PART},
    ),
)
async def propagate(
    request: Request,
    state: State,
    deadline: Deadline,
    model: Annotated[ModelName | None, Query(description="Model name.")] = None,
) -> Any:
    started = time.perf_counter()
    state.require_ready()  # 503 / 429 before any parsing: see check_room
    body = await parse_body(request, state, PropagateJSON, ["source", "mask"], ["targets"])
    opts = merge_options(PropagateOptions, body, {"model": model})
    info = state.require_model(opts.model)
    targets_raw = body.file_lists["targets"]
    if len(targets_raw) > state.settings.max_targets:
        raise Problem(
            VALIDATION_ERROR,
            f"{len(targets_raw)} targets; at most {state.settings.max_targets} "
            "(JLAD_MAX_TARGETS) per request",
        )
    output = negotiate(request.headers.get("accept"), [JSON, NPZ, PNG])
    if output == PNG and len(targets_raw) != 1:
        raise Problem(
            NOT_ACCEPTABLE,
            "a PNG answer holds one mask: send one target, or accept JSON or application/x-npz",
            extra={"available": [JSON, NPZ]},
        )
    limits = limits_of(state)

    def decode_all() -> tuple[Decoded, Mask, list[Decoded]]:
        source = decode_for_model(body.files["source"], limits, info, "source")
        mask = decode_mask(body.files["mask"], limits, "mask")
        if mask.labels.shape != source.rgb.shape[:2]:
            raise Problem(
                INVALID_MASK,
                f"mask is {mask.labels.shape[1]}x{mask.labels.shape[0]} but the source is "
                f"{source.size[0]}x{source.size[1]}; they must match",
            )
        targets = [
            decode_for_model(t, limits, info, f"targets[{i}]") for i, t in enumerate(targets_raw)
        ]
        return source, mask, targets

    decode_start = time.perf_counter()
    source, mask, targets = await in_thread(state, decode_all)
    decode_ms = (time.perf_counter() - decode_start) * 1000
    job = InferenceJob(
        info.name,
        np.stack([source.pixels, *(t.pixels for t in targets)]),
        pairs=[(i + 1, 0) for i in range(len(targets))],
        deadline=deadline,
        request_id=request.state.request_id,
    )
    result, wait_ms = await run_job(state, job)
    post_start = time.perf_counter()

    def propagate_all() -> list[tuple[bytes, list[int], float, NDArray[Any]]]:
        return [
            propagate_one(mask, source, t, a.mapping, a.confidence, opts)
            for t, a in zip(targets, result.alignments, strict=True)
        ]

    propagated = await in_thread(state, propagate_all)
    if output == PNG:
        return Response(propagated[0][0], media_type=PNG)
    if output == NPZ:
        arrays = {f"mask_{i}": p[3] for i, p in enumerate(propagated)}
        arrays["reliable_fraction"] = np.array([p[2] for p in propagated], np.float32)
        return Response(await npz_answer(state, arrays), media_type=NPZ)
    return PropagateResponse(
        model=model_ref(info),
        source_size=size_of(source.size),
        masks=[
            PropagatedMask(
                index=i,
                size=size_of(t.size),
                mask=base64.b64encode(png).decode(),
                labels=labels,
                reliable_fraction=reliable,
            )
            for i, (t, (png, labels, reliable, _)) in enumerate(
                zip(targets, propagated, strict=True)
            )
        ],
        batch=batch_info(result),
        timings_ms=timings(
            result,
            decode_ms=decode_ms,
            wait_ms=wait_ms,
            postprocess_ms=(time.perf_counter() - post_start) * 1000,
            total_ms=(time.perf_counter() - started) * 1000,
        ),
    )
