"""RFC 9457 problem details: one stable `type` URI per kind of error.

Code anywhere in the service raises `Problem(kind, detail)`; the app's exception handlers turn
it (and every framework error) into an `application/problem+json` response. The table in
docs/SERVICE.md lists the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

PROBLEM_BASE = "https://jlad.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ProblemKind:
    """A kind of error: its slug (end of the `type` URI), HTTP status and title."""

    slug: str
    status: int
    title: str

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.slug


BAD_REQUEST = ProblemKind("bad-request", 400, "Malformed request")
UNAUTHORIZED = ProblemKind("unauthorized", 401, "Missing or invalid API key")
NOT_FOUND = ProblemKind("not-found", 404, "No such resource")
UNKNOWN_MODEL = ProblemKind("unknown-model", 404, "Unknown model")
METHOD_NOT_ALLOWED = ProblemKind("method-not-allowed", 405, "Method not allowed")
NOT_ACCEPTABLE = ProblemKind("not-acceptable", 406, "Cannot produce the requested media type")
UPLOAD_TOO_LARGE = ProblemKind("upload-too-large", 413, "Request body too large")
IMAGE_TOO_LARGE = ProblemKind("image-too-large", 413, "Image has too many pixels")
UNSUPPORTED_MEDIA_TYPE = ProblemKind("unsupported-media-type", 415, "Unsupported request body")
UNSUPPORTED_IMAGE = ProblemKind("unsupported-image", 415, "Not an image format the service reads")
VALIDATION_ERROR = ProblemKind("validation-error", 422, "Invalid request fields")
CORRUPT_IMAGE = ProblemKind("corrupt-image", 422, "Image cannot be decoded")
IMAGE_TOO_SMALL = ProblemKind("image-too-small", 422, "Image is too small")
INVALID_MASK = ProblemKind("invalid-mask", 422, "Mask is not usable")
TOO_MANY_POINTS = ProblemKind("too-many-points", 422, "Too many query points")
POINTS_OUT_OF_BOUNDS = ProblemKind("points-out-of-bounds", 422, "Query point outside the image")
QUEUE_FULL = ProblemKind("queue-full", 429, "Too many requests waiting")
INTERNAL_ERROR = ProblemKind("internal-error", 500, "Internal server error")
NOT_READY = ProblemKind("not-ready", 503, "Service not ready")
DEADLINE_EXCEEDED = ProblemKind("deadline-exceeded", 504, "Deadline exceeded")

ALL_KINDS: tuple[ProblemKind, ...] = (
    BAD_REQUEST,
    UNAUTHORIZED,
    NOT_FOUND,
    UNKNOWN_MODEL,
    METHOD_NOT_ALLOWED,
    NOT_ACCEPTABLE,
    UPLOAD_TOO_LARGE,
    IMAGE_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    UNSUPPORTED_IMAGE,
    VALIDATION_ERROR,
    CORRUPT_IMAGE,
    IMAGE_TOO_SMALL,
    INVALID_MASK,
    TOO_MANY_POINTS,
    POINTS_OUT_OF_BOUNDS,
    QUEUE_FULL,
    INTERNAL_ERROR,
    NOT_READY,
    DEADLINE_EXCEEDED,
)


class Problem(Exception):
    """An error meant for the client: becomes one problem+json response.

    `extra` members are added to the JSON body (e.g. `errors` for validation problems);
    `headers` to the response (e.g. `Retry-After`, `WWW-Authenticate`).
    """

    def __init__(
        self,
        kind: ProblemKind,
        detail: str,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.extra = extra or {}
        self.headers = headers or {}


def problem_body(
    kind: ProblemKind, detail: str, instance: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The JSON members of a problem: type, title, status, detail, instance and extensions."""
    body: dict[str, Any] = {
        "type": kind.type_uri,
        "title": kind.title,
        "status": kind.status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_response(
    kind: ProblemKind,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An `application/problem+json` response for `kind`."""
    return JSONResponse(
        problem_body(kind, detail, instance, **extra),
        status_code=kind.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


# What a framework error that carries only a status code is reported as.
_GENERIC_BY_STATUS: dict[int, ProblemKind] = {
    k.status: k
    for k in (
        BAD_REQUEST,
        UNAUTHORIZED,
        NOT_FOUND,
        METHOD_NOT_ALLOWED,
        NOT_ACCEPTABLE,
        UPLOAD_TOO_LARGE,
        UNSUPPORTED_MEDIA_TYPE,
        VALIDATION_ERROR,
        QUEUE_FULL,
        INTERNAL_ERROR,
        NOT_READY,
        DEADLINE_EXCEEDED,
    )
}


def kind_for_status(status: int) -> ProblemKind:
    """The kind to report for a framework error that only carries a status code."""
    if status in _GENERIC_BY_STATUS:
        return _GENERIC_BY_STATUS[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return ProblemKind(phrase.lower().replace(" ", "-"), status, phrase)


# What each kind's example in the OpenAPI document says (detail and extension members).
_EXAMPLES: dict[str, tuple[str, dict[str, Any]]] = {
    "bad-request": ("the body is not valid JSON", {}),
    "unauthorized": (
        "a valid API key is required: send it as X-API-Key or Authorization: Bearer",
        {},
    ),
    "unknown-model": (
        "model 'zebra' is not served; served models: faces, objects (GET /models)",
        {"model": "zebra", "available": ["faces", "objects"]},
    ),
    "not-acceptable": (
        "cannot answer with 'text/csv'; this endpoint produces application/json, "
        "application/x-npz, image/png",
        {"available": ["application/json", "application/x-npz", "image/png"]},
    ),
    "upload-too-large": (
        "the request body exceeds 33554432 bytes (JLAD_MAX_UPLOAD_BYTES); send smaller or "
        "fewer images",
        {"max_bytes": 33554432},
    ),
    "image-too-large": (
        "image is 9000x9000 = 81000000 pixels; the limit is 40000000",
        {"width": 9000, "height": 9000, "max_pixels": 40000000},
    ),
    "unsupported-media-type": (
        "request body type 'text/plain' is not accepted; send multipart/form-data with image "
        "files or application/json with base64 images",
        {},
    ),
    "unsupported-image": (
        "image is not an image format the service can read (PNG, JPEG, WebP, TIFF, BMP, GIF)",
        {},
    ),
    "validation-error": (
        "view: Input should be 'landmarks' or 'heatmaps'",
        {
            "errors": [
                {
                    "loc": ["view"],
                    "msg": "Input should be 'landmarks' or 'heatmaps'",
                    "type": "literal_error",
                }
            ]
        },
    ),
    "corrupt-image": ("image starts like a PNG file but its header is damaged", {}),
    "image-too-small": ("image is 4x300; each side must be at least 8 pixels", {}),
    "invalid-mask": ("mask is 300x200 but the source is 451x300; they must match", {}),
    "too-many-points": (
        "2000 query points; at most 1024 (JLAD_MAX_QUERY_POINTS) per request",
        {},
    ),
    "points-out-of-bounds": (
        "points [1] lie outside the 113x75 source image (x in [-0.5, 112.5], y in [-0.5, 74.5])",
        {"indices": [1]},
    ),
    "queue-full": (
        "the inference queue is full (64 jobs already waiting); retry in 1 s",
        {"retry_after_s": 1},
    ),
    "internal-error": ("inference failed: the model raised while running the batch", {}),
    "not-ready": ("models are still loading and warming up", {}),
    "deadline-exceeded": (
        "the deadline passed before the job was queued; allow more time with the "
        "X-Deadline-Ms header or retry later",
        {},
    ),
}

_SECONDS = {"type": "string", "pattern": "^[0-9]+$"}
# Response headers that come with a status: (name, schema, description, always sent).
_HEADERS: dict[int, tuple[str, dict[str, Any], str, bool]] = {
    401: (
        "WWW-Authenticate",
        {"type": "string"},
        "The scheme to authenticate with (Bearer; X-API-Key works too).",
        True,
    ),
    429: ("Retry-After", _SECONDS, "Seconds to wait before retrying.", True),
    503: ("Retry-After", _SECONDS, "Seconds to wait before retrying (when known).", False),
}


def problem_example(kind: ProblemKind, instance: str | None = None) -> dict[str, Any]:
    """An example problem document of `kind` (as the service would answer it)."""
    detail, extra = _EXAMPLES.get(kind.slug, (kind.title, {}))
    body = problem_body(kind, detail, instance, **extra)
    body["request_id"] = "5f0c2a9e8b7d4c1e9a3b6d2f7e8c1a40"
    return body


def problem_openapi_responses(
    *kinds: ProblemKind, instance: str | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting the problems a route can answer: one
    response per status, an example per kind, the headers that come with the status."""
    by_status: dict[int, list[ProblemKind]] = {}
    for kind in kinds:
        by_status.setdefault(kind.status, []).append(kind)
    responses: dict[int | str, dict[str, Any]] = {}
    for status, group in sorted(by_status.items()):
        response: dict[str, Any] = {
            "description": "; ".join(f"{k.slug}: {k.title}" for k in group),
            "content": {
                PROBLEM_MEDIA_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "examples": {
                        k.slug: {"summary": k.title, "value": problem_example(k, instance)}
                        for k in group
                    },
                }
            },
        }
        if status in _HEADERS:
            name, schema, description, always = _HEADERS[status]
            response["headers"] = {
                name: {"description": description, "required": always, "schema": schema}
            }
        responses[status] = response
    return responses
