"""What the service answers, as dataclasses holding numpy arrays.

The parsers here turn the JSON (and `.npz`) bodies described in docs/CONTRACT.md into these
types; they are pure functions shared by the sync and async clients.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from jlad_client.images import mask_from_image
from jlad_client.masks import backward_field_from_flow


@dataclass(frozen=True)
class ModelRef:
    """Which model answered: its name and version."""

    name: str
    version: str


@dataclass(frozen=True)
class Size:
    """An image or field size in pixels."""

    width: int
    height: int


@dataclass(frozen=True)
class Landmark:
    """One landmark in original-image pixels (x, y), with its confidence in [0, 1]."""

    index: int
    x: float
    y: float
    confidence: float


@dataclass(frozen=True)
class LandmarksResult:
    """Answer of `POST /landmarks`.

    Attributes:
        points: (K, 2) landmark positions (x, y) in original-image pixels.
        confidence: (K,) confidences in [0, 1].
    """

    model: ModelRef
    image_size: Size
    landmarks: list[Landmark]
    points: NDArray[np.float32]
    confidence: NDArray[np.float32]
    timings_ms: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Match:
    """A query point in the source and its match in the target (pixels)."""

    source: tuple[float, float]
    target: tuple[float, float]
    confidence: float


@dataclass(frozen=True)
class CorrespondenceResult:
    """Answer of `POST /correspond`.

    Attributes:
        flow: (rows, cols, 2) displacements in original-image pixels. For `direction`
            `source->target`, `p + flow[i, j]` is the target match of the source position p
            sampled at (i, j); for `target->source` (resolution `target`), `q + flow[q]` is
            where target pixel q comes from in the source.
        confidence: (rows, cols) match confidence in [0, 1] (higher is more reliable).
        resolution: the (width, height) of the field: `cols` x `rows`.
        matches: the query points' matches, when points were sent.
    """

    model: ModelRef
    source_size: Size
    target_size: Size
    resolution: Size
    direction: str
    flow: NDArray[np.float32]
    confidence: NDArray[np.float32]
    matches: list[Match] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def backward_field(self) -> NDArray[np.float32]:
        """(Ht, Wt, 2) absolute source position of every target pixel (for warping).

        Only defined for a `target->source` answer (ask with `resolution="target"`).
        """
        if self.direction != "target->source":
            raise ValueError("a backward field needs a correspondence asked with resolution=target")
        return backward_field_from_flow(self.flow)


@dataclass(frozen=True)
class PropagationResult:
    """Answer of `POST /propagate`: one label mask per target, in target pixels.

    Attributes:
        masks: (Ht, Wt) integer labels per target, in the order the targets were sent.
        reliable_fraction: per target, the share of its pixels whose match met the
            confidence threshold (NaN when the service did not say).
        target_sizes: each target's size.
    """

    model: ModelRef
    source_size: Size
    target_sizes: list[Size]
    masks: list[NDArray[np.integer]]
    reliable_fraction: list[float]
    timings_ms: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ModelInfo:
    """One served model (an entry of `GET /models`), its manifest kept whole; `provider` is
    the ONNX Runtime execution provider that runs it, `precision` fp32 or fp16."""

    name: str
    version: str
    input_size: Size | None
    num_landmarks: int | None
    description: str
    is_default: bool
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)
    provider: str | None = None
    precision: str | None = None
    grid_size: Size | None = None  # the correspondence grid (cells): one cell's resolution


@dataclass(frozen=True)
class ReadyStatus:
    """Answer of `GET /readyz`: whether the service can take work, and what it reports
    (which execution provider runs, which models are loaded)."""

    ready: bool
    status_code: int
    body: dict[str, Any] = field(default_factory=dict)


def decode_array(encoded: Mapping[str, Any]) -> NDArray[Any]:
    """An array from `{"shape": [...], "dtype": "float32", "data": "<base64 little-endian>"}`,
    returned in native byte order."""
    try:
        shape = tuple(int(n) for n in encoded["shape"])
        dtype = np.dtype(str(encoded["dtype"])).newbyteorder("<")
        raw = base64.b64decode(encoded["data"], validate=True)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not an encoded array: {error}") from error
    array = np.frombuffer(raw, dtype=dtype)
    expected = int(np.prod(shape)) if shape else 1
    if array.size != expected:
        raise ValueError(f"array data holds {array.size} values, shape {shape} needs {expected}")
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def encode_array(array: NDArray[Any]) -> dict[str, Any]:
    """The inverse of `decode_array` (for tests and tools)."""
    arr = np.ascontiguousarray(array)
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return {
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "data": base64.b64encode(little.tobytes()).decode("ascii"),
    }


def decode_npz(content: bytes) -> dict[str, NDArray[Any]]:
    """Every array of an `.npz` body."""
    with np.load(io.BytesIO(content), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def decode_mask_png(data: str | bytes) -> NDArray[np.integer]:
    """(H, W) labels of a PNG given as bytes or base64 text."""
    content = base64.b64decode(data, validate=True) if isinstance(data, str) else data
    with Image.open(io.BytesIO(content)) as image:
        return mask_from_image(image)


def _model(body: Mapping[str, Any]) -> ModelRef:
    model = body.get("model") or {}
    if isinstance(model, str):
        return ModelRef(model, "")
    return ModelRef(str(model.get("name", "")), str(model.get("version", "")))


def _size(value: Any) -> Size:
    if isinstance(value, Mapping):
        return Size(int(value["width"]), int(value["height"]))
    width, height = value
    return Size(int(width), int(height))


def _timings(body: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in (body.get("timings_ms") or {}).items()}


def parse_landmarks(body: dict[str, Any]) -> LandmarksResult:
    """A `LandmarksResult` from the JSON body of `POST /landmarks`."""
    landmarks = [
        Landmark(int(item["index"]), float(item["x"]), float(item["y"]), float(item["confidence"]))
        for item in body["landmarks"]
    ]
    landmarks.sort(key=lambda lm: lm.index)
    points = np.array([[lm.x, lm.y] for lm in landmarks], np.float32).reshape(-1, 2)
    confidence = np.array([lm.confidence for lm in landmarks], np.float32)
    return LandmarksResult(
        model=_model(body),
        image_size=_size(body["image_size"]),
        landmarks=landmarks,
        points=points,
        confidence=confidence,
        timings_ms=_timings(body),
        raw=body,
    )


def _direction(resolution_kind: str | None, body: Mapping[str, Any]) -> str:
    if "direction" in body:
        return str(body["direction"])
    return "target->source" if resolution_kind == "target" else "source->target"


def parse_correspondence(
    body: dict[str, Any], resolution_kind: str | None = None
) -> CorrespondenceResult:
    """A `CorrespondenceResult` from the JSON body of `POST /correspond`."""
    flow = decode_array(body["flow"]).astype(np.float32, copy=False)
    confidence = decode_array(body["confidence"]).astype(np.float32, copy=False)
    matches = [
        Match(
            (float(m["source"][0]), float(m["source"][1])),
            (float(m["target"][0]), float(m["target"][1])),
            float(m["confidence"]),
        )
        for m in body.get("matches") or []
    ]
    resolution = (
        _size(body["resolution"])
        if isinstance(body.get("resolution"), Mapping)
        else Size(flow.shape[1], flow.shape[0])
    )
    return CorrespondenceResult(
        model=_model(body),
        source_size=_size(body["source_size"]),
        target_size=_size(body["target_size"]),
        resolution=resolution,
        direction=_direction(resolution_kind, body),
        flow=flow,
        confidence=confidence,
        matches=matches,
        timings_ms=_timings(body),
        raw=body,
    )


def parse_correspondence_npz(
    content: bytes, resolution_kind: str | None, source_size: Size, target_size: Size
) -> CorrespondenceResult:
    """A `CorrespondenceResult` from an `.npz` answer (arrays `flow`, `confidence`; the sizes
    come from the caller, who sent the images)."""
    arrays = decode_npz(content)
    flow = arrays["flow"].astype(np.float32, copy=False)
    direction = str(arrays["direction"]) if "direction" in arrays else None
    return CorrespondenceResult(
        model=ModelRef(str(arrays.get("model_name", "")), str(arrays.get("model_version", ""))),
        source_size=source_size,
        target_size=target_size,
        resolution=Size(flow.shape[1], flow.shape[0]),
        direction=direction or _direction(resolution_kind, {}),
        flow=flow,
        confidence=arrays["confidence"].astype(np.float32, copy=False),
    )


def parse_propagation(body: dict[str, Any]) -> PropagationResult:
    """A `PropagationResult` from the JSON body of `POST /propagate`: `masks` is a list of
    `{"index", "size", "mask": "<base64 PNG>", "labels", "reliable_fraction"}`."""
    entries = sorted(body["masks"], key=lambda entry: int(entry.get("index", 0)))
    masks = [decode_mask_png(entry["mask"]) for entry in entries]
    sizes = [
        _size(entry["size"]) if "size" in entry else Size(mask.shape[1], mask.shape[0])
        for entry, mask in zip(entries, masks, strict=True)
    ]
    fractions = [float(entry.get("reliable_fraction", float("nan"))) for entry in entries]
    return PropagationResult(
        model=_model(body),
        source_size=_size(body["source_size"]),
        target_sizes=sizes,
        masks=masks,
        reliable_fraction=fractions,
        timings_ms=_timings(body),
        raw=body,
    )


def parse_propagation_npz(content: bytes) -> PropagationResult:
    """A `PropagationResult` from an `.npz` answer: arrays `mask_0`, `mask_1`, ... and
    optionally `reliable_fraction` (one value per target)."""
    arrays = decode_npz(content)
    count = sum(1 for name in arrays if name.startswith("mask_"))
    masks = [arrays[f"mask_{i}"] for i in range(count)]
    fractions = (
        [float(v) for v in arrays["reliable_fraction"]]
        if "reliable_fraction" in arrays
        else [float("nan")] * count
    )
    return PropagationResult(
        model=ModelRef("", ""),
        source_size=Size(0, 0),
        target_sizes=[Size(m.shape[1], m.shape[0]) for m in masks],
        masks=masks,
        reliable_fraction=fractions,
    )


def parse_models(body: Any) -> list[ModelInfo]:
    """`ModelInfo`s from the body of `GET /models`:
    `{"default_model": name, "models": [{"name", "version", "description", "input_size",
    "num_landmarks", "default", "manifest", ...}]}`."""
    items = body.get("models", []) if isinstance(body, Mapping) else body
    default = body.get("default_model") if isinstance(body, Mapping) else None
    models = []
    for item in items:
        manifest = dict(item.get("manifest") or {})
        if "input_size" in item:
            input_size: Size | None = _size(item["input_size"])
        elif "width" in manifest.get("input", {}):
            input_size = Size(int(manifest["input"]["width"]), int(manifest["input"]["height"]))
        else:
            input_size = None
        name = str(item.get("name", manifest.get("name", "")))
        k = item.get("num_landmarks", manifest.get("num_landmarks"))
        models.append(
            ModelInfo(
                name=name,
                version=str(item.get("version", manifest.get("version", ""))),
                input_size=input_size,
                num_landmarks=None if k is None else int(k),
                description=str(item.get("description", manifest.get("description", ""))),
                is_default=bool(item.get("default", False)) or default == name,
                manifest=manifest,
                grid_size=_size(item["grid_size"]) if "grid_size" in item else None,
                provider=None if item.get("provider") is None else str(item["provider"]),
                precision=None if item.get("precision") is None else str(item["precision"]),
            )
        )
    return models
