"""Request and response models (pydantic), which also make the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Resolution = Literal["grid", "source", "target"]
FieldDtype = Literal["float16", "float32"]
CorrespondView = Literal["flow", "confidence", "warped", "matches", "landmarks"]
LandmarksView = Literal["landmarks", "heatmaps"]

_B64 = "base64 of the encoded image file (PNG, JPEG, WebP, TIFF, BMP, GIF); a data: URL works"


# -- requests ----------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LandmarksOptions(_Strict):
    """Options of POST /landmarks besides the image."""

    model: str | None = Field(default=None, description="Model name (default: JLAD_DEFAULT_MODEL).")
    view: LandmarksView | None = Field(
        default=None, description="PNG rendering: landmarks drawn, or the summed heat maps."
    )


class LandmarksJSON(LandmarksOptions):
    """POST /landmarks as JSON."""

    image: str = Field(..., description=_B64)


class CorrespondOptions(_Strict):
    """Options of POST /correspond besides the two images."""

    model: str | None = Field(default=None, description="Model name (default: JLAD_DEFAULT_MODEL).")
    resolution: Resolution | None = Field(
        default=None,
        description="grid: model cells (h, w); source: every source pixel; target: the "
        "backward field at target size. Default grid (source for PNG views).",
    )
    dtype: FieldDtype = Field(default="float32", description="Element type of the returned arrays.")
    points: list[tuple[float, float]] | None = Field(
        default=None,
        description="Query points [x, y] in source pixels; their matches are returned.",
    )
    view: CorrespondView | None = Field(default=None, description="PNG rendering to return.")


class CorrespondJSON(CorrespondOptions):
    """POST /correspond as JSON."""

    source: str = Field(..., description=_B64)
    target: str = Field(..., description=_B64)


class PropagateOptions(_Strict):
    """Options of POST /propagate besides the images and the mask."""

    model: str | None = Field(default=None, description="Model name (default: JLAD_DEFAULT_MODEL).")
    min_confidence: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Matches below this confidence are unreliable."
    )
    keep_if_neighbours_agree: bool = Field(
        default=True,
        description="Keep an unreliable pixel's label when the source neighbourhood of its "
        "match carries that one label throughout.",
    )


class PropagateJSON(PropagateOptions):
    """POST /propagate as JSON."""

    source: str = Field(..., description=_B64)
    mask: str = Field(..., description="base64 PNG of the source's label mask (L, P or I;16)")
    targets: list[str] = Field(..., min_length=1, description="base64 target images")


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


class LandmarksResponse(BaseModel):
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


def multipart_schema(
    files: list[str], file_lists: list[str], options: type[BaseModel]
) -> dict[str, Any]:
    """OpenAPI schema of a multipart body: binary file parts plus the options as text parts."""
    properties: dict[str, Any] = {f: {"type": "string", "format": "binary"} for f in files}
    for f in file_lists:
        properties[f] = {"type": "array", "items": {"type": "string", "format": "binary"}}
    for name, info in options.model_fields.items():
        properties[name] = {"type": "string", "description": info.description or ""}
    return {"type": "object", "required": [*files, *file_lists], "properties": properties}


def request_body(
    json_model: type[BaseModel],
    files: list[str],
    file_lists: list[str],
    options: type[BaseModel],
) -> dict[str, Any]:
    """`openapi_extra` declaring that a route takes multipart/form-data or JSON."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart_schema(files, file_lists, options)},
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }
