"""Request and response models (pydantic), which also make the OpenAPI document.

The request models are the single source of the request contract: the handlers validate
with them, and the OpenAPI request bodies (JSON and multipart alike) are generated from
them by `request_body`, so the document cannot say something the server does not do.
Absent options take their defaults; an option that is present must be valid, an empty
text field included (it is refused with 422, never read as "absent").
"""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StringConstraints,
)

Resolution = Literal["grid", "source", "target"]
FieldDtype = Literal["float16", "float32"]
CorrespondView = Literal["flow", "confidence", "warped", "matches", "landmarks"]
LandmarksView = Literal["landmarks", "heatmaps"]
ModelName = Annotated[str, StringConstraints(min_length=1)]
JsonDict = dict[str, JsonValue]
# [x, y] in source pixels; strict, so that "1" or true is not taken for a number.
Point = tuple[StrictFloat, StrictFloat]

_B64 = "base64 of the encoded image file (PNG, JPEG, WebP, TIFF, BMP, GIF); a data: URL works"
# The JSON Schema of a base64 image (decode_base64 checks the same; a pydantic `pattern`
# would run a regular expression over megabytes).
_BASE64: JsonDict = {
    "contentEncoding": "base64",
    "pattern": "^(?:data:[a-z]+/[a-z0-9.+-]+;base64,)?(?:[A-Za-z0-9+/]{4})*"
    "(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
}
MODEL_DESCRIPTION = "Model name (default: JLAD_DEFAULT_MODEL); GET /models lists them."
# The formats the service decodes; a file part's own Content-Type is not looked at.
IMAGE_MEDIA_TYPES = "image/png, image/jpeg, image/webp, image/tiff, image/bmp, image/gif"


# -- requests ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LandmarksOptions(_Strict):
    """Options of POST /landmarks besides the image."""

    model: ModelName | None = Field(default=None, description=MODEL_DESCRIPTION)
    view: LandmarksView | None = Field(
        default=None,
        description="PNG rendering: landmarks drawn, or the summed heat maps (selects a PNG "
        "answer unless Accept says otherwise).",
    )


class LandmarksJSON(LandmarksOptions):
    """POST /landmarks as JSON."""

    image: str = Field(..., min_length=1, description=_B64, json_schema_extra=_BASE64)


class CorrespondOptions(_Strict):
    """Options of POST /correspond besides the two images."""

    model: ModelName | None = Field(default=None, description=MODEL_DESCRIPTION)
    resolution: Resolution | None = Field(
        default=None,
        description="grid: model cells (h, w); source: every source pixel; target: the "
        "backward field at target size. Default grid (source for PNG views).",
    )
    dtype: FieldDtype = Field(default="float32", description="Element type of the returned arrays.")
    points: list[Point] | None = Field(
        default=None,
        description="Query points [x, y] in source pixels, each inside the source image "
        "(x in [-0.5, width - 0.5], y in [-0.5, height - 0.5]; else 422 "
        "points-out-of-bounds); their matches are returned. In a multipart body: one text "
        "part holding this JSON array, e.g. [[120, 80], [200.5, 33]].",
    )
    view: CorrespondView | None = Field(
        default=None,
        description="PNG rendering to return (selects a PNG answer unless Accept says otherwise).",
    )


class CorrespondJSON(CorrespondOptions):
    """POST /correspond as JSON."""

    source: str = Field(..., min_length=1, description=_B64, json_schema_extra=_BASE64)
    target: str = Field(..., min_length=1, description=_B64, json_schema_extra=_BASE64)


class PropagateOptions(_Strict):
    """Options of POST /propagate besides the images and the mask."""

    model: ModelName | None = Field(default=None, description=MODEL_DESCRIPTION)
    min_confidence: StrictFloat = Field(
        default=0.5, ge=0.0, le=1.0, description="Matches below this confidence are unreliable."
    )
    keep_if_neighbours_agree: StrictBool = Field(
        default=True,
        description="Keep an unreliable pixel's label when the source neighbourhood of its "
        "match carries that one label throughout.",
    )
    refine: Literal["none", "colour"] = Field(
        default="none",
        description="colour: move the mask's boundaries onto the target's colours (within "
        "one feature cell of them), using the source's colours per label. For frames of one "
        "video (the same object); across instances of different colours it can hurt.",
    )


class PropagateJSON(PropagateOptions):
    """POST /propagate as JSON."""

    source: str = Field(..., min_length=1, description=_B64, json_schema_extra=_BASE64)
    mask: str = Field(
        ...,
        min_length=1,
        description="base64 PNG of the source's label mask (L, P or I;16), the source's size",
        json_schema_extra=_BASE64,
    )
    targets: list[
        Annotated[str, StringConstraints(min_length=1), Field(json_schema_extra=_BASE64)]
    ] = Field(..., min_length=1, description="base64 target images (at most JLAD_MAX_TARGETS)")


# -- responses ---------------------------------------------------------------------------


class ModelRef(BaseModel):
    name: str
    version: str


class ImageSize(BaseModel):
    width: int
    height: int


class BatchInfo(BaseModel):
    """The batch this request's model work ran in."""

    jobs: int = Field(..., description="Requests sharing the batch.")
    images: int = Field(..., description="Images through the backbone in the batch.")


class Landmark(BaseModel):
    index: int
    x: float = Field(..., description="Pixel x in the original image (pixel centres at integers).")
    y: float = Field(..., description="Pixel y in the original image.")
    confidence: float = Field(..., ge=0.0, le=1.0)


_BATCH: JsonDict = {"jobs": 2, "images": 3}


class LandmarksResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {"name": "objects", "version": "1"},
                    "image_size": {"width": 451, "height": 300},
                    "landmarks": [
                        {"index": 0, "x": 212.4, "y": 133.0, "confidence": 0.81},
                        {"index": 1, "x": 250.9, "y": 98.5, "confidence": 0.64},
                    ],
                    "batch": _BATCH,
                    "timings_ms": {"decode_ms": 4.1, "wait_ms": 1.0, "total_ms": 52.3},
                }
            ]
        }
    )

    model: ModelRef
    image_size: ImageSize
    landmarks: list[Landmark]
    batch: BatchInfo
    timings_ms: dict[str, float]


class EncodedArray(BaseModel):
    """A dense array: base64 of its little-endian bytes, row-major."""

    shape: list[int]
    dtype: FieldDtype
    data: str


class Match(BaseModel):
    source: tuple[float, float]
    target: tuple[float, float]
    confidence: float


class CorrespondResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {"name": "objects", "version": "1"},
                    "source_size": {"width": 451, "height": 300},
                    "target_size": {"width": 512, "height": 512},
                    "sampling": "grid",
                    "resolution": {"width": 1, "height": 1},
                    "direction": "source->target",
                    "flow": {"shape": [1, 1, 2], "dtype": "float32", "data": "AAAgQQAAoMA="},
                    "confidence": {"shape": [1, 1], "dtype": "float32", "data": "AABAPw=="},
                    "matches": [
                        {"source": [120.0, 80.0], "target": [131.5, 92.0], "confidence": 0.74}
                    ],
                    "batch": _BATCH,
                    "timings_ms": {"decode_ms": 6.0, "wait_ms": 1.2, "total_ms": 88.4},
                }
            ]
        }
    )

    model: ModelRef
    source_size: ImageSize
    target_size: ImageSize
    sampling: Resolution = Field(..., description="The requested resolution.")
    resolution: ImageSize = Field(..., description="Columns and rows of the returned field.")
    direction: Literal["source->target", "target->source"]
    flow: EncodedArray = Field(..., description="(rows, cols, 2) displacements in pixels.")
    confidence: EncodedArray = Field(..., description="(rows, cols) match confidence in [0, 1].")
    matches: list[Match]
    batch: BatchInfo
    timings_ms: dict[str, float]


class PropagatedMask(BaseModel):
    index: int = Field(..., description="Position of the target in the request.")
    size: ImageSize
    mask: str = Field(..., description="base64 PNG of the target's labels.")
    labels: list[int] = Field(..., description="Label values present in the mask.")
    reliable_fraction: float = Field(
        ..., description="Share of target pixels whose match met min_confidence."
    )


class PropagateResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {"name": "objects", "version": "1"},
                    "source_size": {"width": 451, "height": 300},
                    "masks": [
                        {
                            "index": 0,
                            "size": {"width": 512, "height": 512},
                            "mask": "iVBORw0KGgo...",
                            "labels": [0, 1],
                            "reliable_fraction": 0.83,
                        }
                    ],
                    "batch": _BATCH,
                    "timings_ms": {"decode_ms": 7.5, "wait_ms": 0.8, "total_ms": 120.9},
                }
            ]
        }
    )

    model: ModelRef
    source_size: ImageSize
    masks: list[PropagatedMask]
    batch: BatchInfo
    timings_ms: dict[str, float]


class ModelDescription(BaseModel):
    name: str
    version: str
    description: str
    precision: str | None
    provider: str | None
    input_size: ImageSize
    grid_size: ImageSize
    num_landmarks: int
    default: bool
    manifest: dict[str, Any]


class ModelsResponse(BaseModel):
    default_model: str
    models: list[ModelDescription]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    models: list[dict[str, Any]]
    dispatcher: dict[str, Any]


class Problem(BaseModel):
    """RFC 9457 problem details (extension members may follow)."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


# -- the request contract in the OpenAPI document -----------------------------------------

# Component schemas of the request bodies, filled by `request_body` as the routes are
# declared; the app puts them into the document (service.openapi).
REQUEST_SCHEMAS: dict[str, dict[str, Any]] = {}

_JSON_KINDS = {
    "number": "a number",
    "integer": "an integer",
    "boolean": "true or false",
    "array": "a JSON array",
}
# Form spellings of booleans: JSON's, and Python's (what generated clients send).
_FORM_BOOLEANS = {"true": True, "false": False, "True": True, "False": False}

# JSON text, as regular expressions (ECMA-262 and Python alike) for `pattern`.
_WS = "[ \\t\\n\\r]*"
_NUMBER = "-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"


def without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its `null` alternative: a form part, query parameter or header
    cannot be null, only absent."""
    alternatives = schema.get("anyOf")
    if not alternatives:
        return dict(schema)
    rest = [a for a in alternatives if a != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf"}
    if len(rest) == 1:
        out.update(rest[0])
    else:
        out["anyOf"] = rest
    if out.get("default", 0) is None:
        del out["default"]
    return out


@cache
def option_schemas(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """JSON Schema of each field of `model`, without null (see `without_null`)."""
    properties = model.model_json_schema()["properties"]
    return {name: without_null(schema) for name, schema in properties.items()}


def _json_kind(schema: dict[str, Any]) -> str | None:
    """How a form part's text must read when its field is not a string (None: plain text)."""
    kind = schema.get("type")
    if kind in (None, "string"):
        return None
    if kind == "array" and len(schema.get("items", {}).get("prefixItems", ())) == 2:
        return "a JSON list of [x, y] pairs"
    return _JSON_KINDS.get(str(kind), "JSON")


def _json_text_pattern(schema: dict[str, Any]) -> str:
    """A regular expression of the JSON text of a value of `schema` (numbers and arrays of
    them, e.g. `points`), without anchors."""
    kind = schema.get("type")
    if kind in ("number", "integer"):
        return _NUMBER if kind == "number" else "-?(?:0|[1-9][0-9]*)"
    if kind != "array":
        raise NotImplementedError(f"no JSON text pattern for {schema}")
    sep = f"{_WS},{_WS}"
    if "prefixItems" in schema:
        inner = sep.join(_json_text_pattern(item) for item in schema["prefixItems"])
    else:
        item = _json_text_pattern(schema["items"])
        most = schema.get("maxItems")
        repeat = f"{{0,{most - 1}}}" if most is not None else "*"
        inner = f"(?:{item}(?:{sep}{item}){repeat})?"
    return f"\\[{_WS}{inner}{_WS}\\]"


def form_property(schema: dict[str, Any]) -> dict[str, Any]:
    """The multipart text part of an option whose JSON Schema is `schema`: strings, numbers
    and booleans as themselves (their text), arrays as a string holding their JSON text,
    stated by a `pattern` (e.g. `points`: "[[120, 80], [200.5, 33]]")."""
    if schema.get("type") != "array":
        return schema
    keep = ("title", "description")
    return {
        **{k: schema[k] for k in keep if k in schema},
        "type": "string",
        "pattern": f"^{_WS}{_json_text_pattern(schema)}{_WS}$",
    }


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode_form_fields(model: type[BaseModel], fields: dict[str, str]) -> dict[str, Any]:
    """The values of a multipart body's text parts, read as the document describes them:
    string options as they are, booleans as true or false (True or False too), every other
    option as JSON text (a number, an array such as `points`). `model` validates the
    result; text of the wrong kind is a 422 here, an empty part included."""
    from service.problems import VALIDATION_ERROR, Problem

    schemas = option_schemas(model)
    out: dict[str, Any] = {}
    for name, text in fields.items():
        kind = _json_kind(schemas.get(name, {}))
        if kind is None:
            out[name] = text
            continue
        try:
            if kind == _JSON_KINDS["boolean"]:
                out[name] = _FORM_BOOLEANS[text]
            else:
                out[name] = json.loads(text, parse_constant=_refuse_constant)
        except (KeyError, ValueError):
            raise Problem(
                VALIDATION_ERROR,
                f"field '{name}' must be {kind}",
                extra={"errors": [{"loc": [name], "msg": f"must be {kind}", "type": "form"}]},
            ) from None
    return out


def _components_of(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON Schema, with nested definitions hoisted into `REQUEST_SCHEMAS`."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    REQUEST_SCHEMAS.update(schema.pop("$defs", {}))
    return schema


def multipart_schema(
    json_model: type[BaseModel], files: dict[str, str], file_lists: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The multipart/form-data body of a route and its `encoding`, generated from the JSON
    body's model: the base64 fields become binary file parts (`files`, `file_lists`: name
    -> description), every option is one text part (`form_property`)."""
    options = option_schemas(json_model)
    properties: dict[str, Any] = {}
    encoding: dict[str, Any] = {}
    for name, description in files.items():
        properties[name] = {"type": "string", "format": "binary", "description": description}
        encoding[name] = {"contentType": IMAGE_MEDIA_TYPES}
    for name, description in file_lists.items():
        properties[name] = {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "minItems": 1,
            "description": description + ": one file part each, all under this name",
        }
        encoding[name] = {"contentType": IMAGE_MEDIA_TYPES}
    for name, schema in options.items():
        if name in files or name in file_lists:
            continue
        properties[name] = form_property(schema)
    schema = {
        "type": "object",
        "title": json_model.__name__.removesuffix("JSON") + "Form",
        "description": (json_model.__doc__ or "").replace("as JSON", "as multipart/form-data"),
        "properties": properties,
        "required": [*files, *file_lists],
        "additionalProperties": False,
    }
    return schema, encoding


def request_body(
    json_model: type[BaseModel], files: dict[str, str], file_lists: dict[str, str] | None = None
) -> dict[str, Any]:
    """`openapi_extra` of a route taking `json_model` as JSON or the same as multipart/form-data
    (file parts for the base64 fields), both as components of the document."""
    form, encoding = multipart_schema(json_model, files, file_lists or {})
    json_name, form_name = json_model.__name__, form["title"]
    REQUEST_SCHEMAS[json_name] = _components_of(json_model)
    REQUEST_SCHEMAS[form_name] = form
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"$ref": f"#/components/schemas/{form_name}"},
                    "encoding": encoding,
                },
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_name}"}},
            },
        }
    }
