"""The `null` model: three tiny ONNX graphs with the real I/O contract (docs/CONTRACT.md),
for measuring what the service itself costs when the model costs (almost) nothing.

Benchmarks only: the bench writes it into a repository of its own under its output folder
(`write_null_repository`) and points `JLAD_MODEL_DIR` there; `models/` never holds it, so
it is never served by default. Same input size, feature grid and landmark count as the
real `objects` model by default, so decoding, resizing and the answers' sizes are the real
ones; only the graphs are trivial (every 8th pixel and a 1x1 convolution for the
backbone, a 1x1 convolution + softmax + soft-argmax for the landmarks, the identity mapping
for the alignment).

    python -m bench.null_model --out runs/bench/null-models
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
NAME = "null"
GRAPHS = ("backbone", "landmarks", "align")


def _identity_grid(h: int, w: int) -> np.ndarray:
    """(2, h, w) normalised (x, y) of every cell centre, align_corners=False."""
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx, gy])


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _t(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def backbone_graph(size: tuple[int, int], stride: int, channels: int) -> onnx.GraphProto:
    """image (B, 3, H, W) -> features (B, C, H/stride, W/stride), unit length per cell."""
    h, w = size
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((channels, 3, 1, 1)).astype(np.float32)
    # Every stride-th pixel, not an average: an 8x8 average pool read the whole image and
    # cost 0.11 ms per 256x256 image, more than the service's own conversion of it (0.045).
    nodes = [
        helper.make_node("Slice", ["image", "starts", "ends", "axes", "steps"], ["sampled"]),
        helper.make_node("Conv", ["sampled", "w"], ["raw"]),
        helper.make_node("ReduceL2", ["raw"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Add", ["norm", "eps"], ["safe"]),
        helper.make_node("Div", ["raw", "safe"], ["features"]),
    ]
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.float32(1e-6), "eps"),
        numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
        numpy_helper.from_array(
            np.array([h // stride * stride, w // stride * stride], np.int64), "ends"
        ),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([stride, stride], np.int64), "steps"),
    ]
    return helper.make_graph(
        nodes,
        "null_backbone",
        [_t("image", "batch", 3, h, w)],
        [_t("features", "batch", channels, h // stride, w // stride)],
        inits,
    )


def landmarks_graph(grid: tuple[int, int], channels: int, k: int) -> onnx.GraphProto:
    """features -> heatmaps (B, K, h, w) (softmax), points (B, K, 2) (soft-argmax),
    confidence (B, K) (the largest probability)."""
    h, w = grid
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((k, channels, 1, 1)).astype(np.float32)
    coords = _identity_grid(h, w).reshape(2, h * w).T.copy()  # (hw, 2)
    nodes = [
        helper.make_node("Conv", ["features", "w"], ["logits"]),
        helper.make_node("Reshape", ["logits", "flat_shape"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["prob"], axis=-1),
        helper.make_node("Reshape", ["prob", "map_shape"], ["heatmaps"]),
        helper.make_node("MatMul", ["prob", "coords"], ["points"]),
        helper.make_node("ReduceMax", ["prob"], ["confidence"], axes=[-1], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array([0, k, h * w], np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([0, k, h, w], np.int64), "map_shape"),
        numpy_helper.from_array(coords, "coords"),
    ]
    return helper.make_graph(
        nodes,
        "null_landmarks",
        [_t("features", "batch", channels, h, w)],
        [
            _t("heatmaps", "batch", k, h, w),
            _t("points", "batch", k, 2),
            _t("confidence", "batch", k),
        ],
        inits,
    )


def align_graph(grid: tuple[int, int], channels: int) -> onnx.GraphProto:
    """(source, target) features -> mapping = the identity grid, log_sigma = -(cosine
    similarity of the two cells), confidence = sigmoid(4 x cosine)."""
    h, w = grid
    nodes = [
        helper.make_node("Mul", ["source_features", "target_features"], ["prod"]),
        helper.make_node("ReduceSum", ["prod", "axis1"], ["cosine"], keepdims=1),
        helper.make_node("Mul", ["cosine", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "grid"], ["mapping"]),
        helper.make_node("Neg", ["cosine"], ["log_sigma"]),
        helper.make_node("Mul", ["cosine", "four"], ["scaled"]),
        helper.make_node("Sigmoid", ["scaled"], ["confidence"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.float32(0), "zero"),
        numpy_helper.from_array(np.float32(4), "four"),
        numpy_helper.from_array(_identity_grid(h, w)[None], "grid"),
    ]
    return helper.make_graph(
        nodes,
        "null_align",
        [
            _t("source_features", "batch", channels, h, w),
            _t("target_features", "batch", channels, h, w),
        ],
        [
            _t("mapping", "batch", 2, h, w),
            _t("log_sigma", "batch", 1, h, w),
            _t("confidence", "batch", 1, h, w),
        ],
        inits,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_null_repository(
    out: Path,
    size: tuple[int, int] = (256, 256),
    stride: int = 8,
    channels: int = 16,
    num_landmarks: int = 10,
) -> Path:
    """Write `out/null/1/{manifest.json, fp32/*.onnx}`; returns `out` (a JLAD_MODEL_DIR)."""
    root = out / NAME / "1"
    grid = (size[0] // stride, size[1] // stride)
    graphs = {
        "backbone": backbone_graph(size, stride, channels),
        "landmarks": landmarks_graph(grid, channels, num_landmarks),
        "align": align_graph(grid, channels),
    }
    for name, graph in graphs.items():
        _save(graph, root / "fp32" / f"{name}.onnx")
    manifest: dict[str, Any] = {
        "schema": "jlad.manifest/1",
        "name": NAME,
        "version": "1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "description": "null model for benchmarks only: the real I/O contract, trivial graphs",
        "input": {
            "height": size[0],
            "width": size[1],
            "layout": "NCHW",
            "channels": "RGB",
            "dtype": "float32",
            "range": [0, 1],
            "resize": "bilinear to height x width, aspect ratio not kept",
        },
        "features": {"stride": stride, "channels": channels, "height": grid[0], "width": grid[1]},
        "num_landmarks": num_landmarks,
        "opset": OPSET,
        "graphs": {
            "backbone": {"inputs": ["image"], "outputs": ["features"]},
            "landmarks": {"inputs": ["features"], "outputs": ["heatmaps", "points", "confidence"]},
            "align": {
                "inputs": ["source_features", "target_features"],
                "outputs": ["mapping", "log_sigma", "confidence"],
            },
        },
        "variants": {
            "fp32": {
                g: {"path": f"fp32/{g}.onnx", "sha256": _sha256(root / "fp32" / f"{g}.onnx")}
                for g in GRAPHS
            }
        },
        "benchmark_only": True,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/null-models"))
    args = parser.parse_args(argv)
    print(write_null_repository(args.out))


if __name__ == "__main__":
    main()
