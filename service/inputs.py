"""What comes in: content negotiation, request bodies (multipart or JSON), decoded images.

Inference routes take either `multipart/form-data` (image files plus text fields) or
`application/json` (images as base64 strings); options may also be query parameters (body
fields win). Answers are JSON by default, PNG when asked with `Accept: image/png` or a
`view`, and `.npz` with `Accept: application/x-npz`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
from fastapi import Request
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from service.imaging import ImageLimits, decode_base64, decode_image, to_model_pixels
from service.problems import (
    BAD_REQUEST,
    NOT_ACCEPTABLE,
    POINTS_OUT_OF_BOUNDS,
    UNSUPPORTED_MEDIA_TYPE,
    VALIDATION_ERROR,
    Problem,
)
from service.runtime import ModelInfo
from service.schemas import decode_form_fields
from service.state import ServiceState

RGB8 = NDArray[np.uint8]
F32 = NDArray[np.float32]

JSON = "application/json"
PNG = "image/png"
NPZ = "application/x-npz"

OptionsT = TypeVar("OptionsT", bound=BaseModel)


def negotiate(accept: str | None, offers: Sequence[str]) -> str:
    """The offered media type the `Accept` header prefers (first offer on a tie or no header).

    A media range's most specific match decides its quality (RFC 9110 12.5.1).
    """
    if accept is None or not accept.strip():
        return offers[0]
    ranges: list[tuple[str, str, float]] = []
    for part in accept.split(","):
        pieces = [p.strip() for p in part.split(";")]
        media = pieces[0].lower()
        if "/" not in media:
            continue
        quality = 1.0
        for param in pieces[1:]:
            if param.lower().startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        main, sub = media.split("/", 1)
        ranges.append((main, sub, quality))
    best, best_q = None, 0.0
    for offer in offers:
        o_main, o_sub = offer.split("/", 1)
        found: tuple[int, float] | None = None
        for main, sub, quality in ranges:
            if (main, sub) == (o_main, o_sub):
                specificity = 2
            elif main == o_main and sub == "*":
                specificity = 1
            elif (main, sub) == ("*", "*"):
                specificity = 0
            else:
                continue
            if found is None or specificity > found[0]:
                found = (specificity, quality)
        if found is not None and found[1] > best_q:
            best, best_q = offer, found[1]
    if best is None:
        raise Problem(
            NOT_ACCEPTABLE,
            f"cannot answer with '{accept}'; this endpoint produces {', '.join(offers)}",
            extra={"available": list(offers)},
        )
    return best


def output_offers(view_given: bool) -> list[str]:
    """Media types in order of preference: PNG first when the caller named a `view`."""
    return [PNG, JSON, NPZ] if view_given else [JSON, NPZ, PNG]


@dataclass
class ParsedBody:
    """A request body, whichever encoding it came in."""

    options: dict[str, Any]
    files: dict[str, bytes]
    file_lists: dict[str, list[bytes]]


def _validation_problem(exc: ValidationError, prefix: str = "") -> Problem:
    errors = [
        {"loc": [str(x) for x in e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors()
    ]
    summary = "; ".join(f"{'.'.join(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
    return Problem(VALIDATION_ERROR, prefix + summary, extra={"errors": errors})


async def parse_body(
    request: Request,
    state: ServiceState,
    json_model: type[BaseModel],
    files: Sequence[str],
    file_lists: Sequence[str] = (),
) -> ParsedBody:
    """Read a multipart or JSON body into text options and file bytes (base64 decoded)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == JSON or media.endswith("+json"):
        return await _parse_json_body(request, state, json_model, files, file_lists)
    if media == "multipart/form-data":
        return await _parse_multipart_body(request, state, json_model, files, file_lists)
    raise Problem(
        UNSUPPORTED_MEDIA_TYPE,
        f"request body type '{media or 'none'}' is not accepted; send multipart/form-data "
        "with image files or application/json with base64 images",
    )


async def _parse_json_body(
    request: Request,
    state: ServiceState,
    json_model: type[BaseModel],
    files: Sequence[str],
    file_lists: Sequence[str],
) -> ParsedBody:
    raw = await request.body()

    def parse_and_decode() -> ParsedBody:
        # Bodies reach tens of MB of base64: parse and decode them off the event loop.
        try:
            parsed = json_model.model_validate_json(raw)
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise Problem(BAD_REQUEST, "the body is not valid JSON") from None
            raise _validation_problem(exc) from None
        data = parsed.model_dump(exclude_unset=True)
        decoded = {f: decode_base64(data.pop(f), f) for f in files}
        decoded_lists = {
            f: [decode_base64(t, f"{f}[{i}]") for i, t in enumerate(data.pop(f))]
            for f in file_lists
        }
        return ParsedBody(data, decoded, decoded_lists)

    parsed_body: ParsedBody = await anyio.to_thread.run_sync(
        parse_and_decode, limiter=state.cpu_limiter
    )
    return parsed_body


async def _parse_multipart_body(
    request: Request,
    state: ServiceState,
    json_model: type[BaseModel],
    files: Sequence[str],
    file_lists: Sequence[str],
) -> ParsedBody:
    settings = state.settings
    option_names = set(json_model.model_fields) - set(files) - set(file_lists)
    options: dict[str, Any] = {}
    found: dict[str, bytes] = {}
    found_lists: dict[str, list[bytes]] = {f: [] for f in file_lists}
    async with request.form(
        max_files=len(files) + settings.max_targets + 1,
        max_fields=len(option_names) + 1,
        max_part_size=settings.max_upload_bytes,
    ) as form:
        for key, value in form.multi_items():
            is_file = isinstance(value, UploadFile)
            if key in files or key in file_lists:
                if not is_file:
                    raise Problem(
                        VALIDATION_ERROR,
                        f"field '{key}' must be a file part (or send JSON with base64 images)",
                    )
                assert isinstance(value, UploadFile)
                content = await value.read()
                if key in file_lists:
                    found_lists[key].append(content)
                elif key in found:
                    raise Problem(VALIDATION_ERROR, f"field '{key}' is given more than once")
                else:
                    found[key] = content
            elif key in option_names:
                if is_file or key in options:
                    raise Problem(VALIDATION_ERROR, f"field '{key}' must be a single text field")
                options[key] = value
            else:
                expected = ", ".join([*files, *file_lists, *sorted(option_names)])
                raise Problem(
                    VALIDATION_ERROR,
                    f"unknown field '{key}'; this endpoint takes: {expected}",
                    extra={"errors": [{"loc": [key], "msg": "unknown field"}]},
                )
    missing = [f for f in files if f not in found] + [f for f in file_lists if not found_lists[f]]
    if missing:
        raise Problem(
            VALIDATION_ERROR,
            f"missing file field(s): {', '.join(missing)}",
            extra={"errors": [{"loc": [m], "msg": "field required"} for m in missing]},
        )
    # Numbers, booleans and `points` come as JSON text, as the OpenAPI document says.
    return ParsedBody(decode_form_fields(json_model, options), found, found_lists)


def merge_options(
    options_model: type[OptionsT], body: ParsedBody, query: dict[str, Any]
) -> OptionsT:
    """Validate the options; body fields win over query parameters."""
    merged = {k: v for k, v in query.items() if v is not None}
    merged.update(body.options)
    try:
        return options_model.model_validate(merged)
    except ValidationError as exc:
        raise _validation_problem(exc) from None


def limits_of(state: ServiceState) -> ImageLimits:
    s = state.settings
    return ImageLimits(max_pixels=s.max_image_pixels, min_side=s.min_image_side)


@dataclass
class Decoded:
    """An uploaded image, as decoded (H, W, 3) and resized to the model's input (3, h, w)."""

    rgb: RGB8
    pixels: RGB8

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def decode_for_model(
    data: bytes, limits: ImageLimits, info: ModelInfo, what: str, out: RGB8 | None = None
) -> Decoded:
    """The upload decoded, and its model pixels (written into `out` when given)."""
    rgb = decode_image(data, limits, what)
    return Decoded(rgb, to_model_pixels(rgb, *info.input_size, out=out))


def check_points(points: NDArray[np.floating], size: tuple[int, int]) -> None:
    """422 unless every (x, y) lies on the image: [-0.5, W - 0.5] x [-0.5, H - 0.5]."""
    width, height = size
    inside = (
        np.isfinite(points).all(axis=1)
        & (points[:, 0] >= -0.5)
        & (points[:, 0] <= width - 0.5)
        & (points[:, 1] >= -0.5)
        & (points[:, 1] <= height - 0.5)
    )
    if not inside.all():
        bad = [int(i) for i in np.flatnonzero(~inside)[:10]]
        raise Problem(
            POINTS_OUT_OF_BOUNDS,
            f"points {bad} lie outside the {width}x{height} source image (x in [-0.5, "
            f"{width - 0.5}], y in [-0.5, {height - 0.5}])",
            extra={"indices": bad},
        )
