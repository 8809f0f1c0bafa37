"""int8 copies of exported graphs: static QDQ quantization with ONNX Runtime, calibrated on
real images.

    python -m model_export.quantize --model-root models/objects/1 \\
        --calibration ../shared/data/caltech101 --images 256

(`python -m model_export.export ... --calibration NAME=PATH` calls this for every model it
exports; run alone, it re-quantizes an exported model and updates its manifest.) For each
of the three graphs of `<model-root>/fp32/` it writes `<model-root>/int8/<graph>.onnx`:

- activations uint8 (asymmetric, per tensor, ranges from min/max over the calibration set)
  and weights int8 (symmetric, per output channel): U8S8, which ONNX Runtime's x86 kernels
  run as integer convolutions (see `ACTIVATION_TYPE`);
- only the operator types in `QUANTIZED_OPS` (convolutions and fully connected layers: the
  conv trunk and the heads' convolutions, where int8 arithmetic pays) get int8, with the
  activations and residual sums between them (`FOLLOWER_OPS`, `int8_nodes`) and the
  explicit zero padding in front of convolutions folded in (`fold_pads_into_convs`);
- the align graph's cross-similarity, a product of two unit-feature maps, runs as an
  integer product with ranges calibrated per operand (`int8_similarity_products`);
- every other operator stays float32, in particular the self-similarities, Softmax and
  soft-argmax, GridSample (forward-backward consistency), Resize and the L2
  normalisations, which lose accuracy on 256 levels and cost little;
- nothing in this module names a node: it works on any graph that follows docs/CONTRACT.md.

Calibration feeds are made by running the fp32 graphs: the backbone on the images, the
landmark head on their features, the alignment head on pairs of consecutive images (same
class, mostly, for a class-sorted folder). Without a calibration folder (CI, a fresh clone
without ../shared/data) `sample_images` makes the images from scikit-image's sample data;
the manifest says which was used.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm import tqdm

from model_export.data import IMAGE_EXTENSIONS, image_to_tensor, read_rgb
from model_export.onnx_passes import fold_pads_into_convs, remove_dead_nodes

log = logging.getLogger("jlad.quantize")

GRAPH_NAMES = ("backbone", "landmarks", "align")
FOLDER_IMAGES = 256
SAMPLE_IMAGES = 32
# Operator types that get int8 arithmetic; everything else stays float (module docstring).
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm")
# ... and these, only where they sit between int8 operators (a convolution's activation, a
# residual sum of two conv paths), so that conv follows conv without a float round trip.
FOLLOWER_OPS = ("Relu", "Clip", "Add")
# Graphs whose similarity products (`similarity_products`) run in integers: the align head's
# 1024 x 1024 cosines between two images' unit feature vectors (a seventh of the int8 align
# graph in float). The landmark head's self-similarities stay float: 64-dim projections,
# 7 x 7 neighbours, a small share of that graph.
INT8_SIMILARITY_GRAPHS = ("align",)
# Stated in the manifest: the float operators that matter for accuracy.
FLOAT_OPS_NOTE = (
    "every operator type other than "
    + ", ".join(QUANTIZED_OPS)
    + " stays float32 (except the align graph's cross-similarity product, integer "
    "MatMulIntegerToFloat): self-similarities (MatMul), Softmax / soft-argmax, "
    "GridSample, Resize, L2 normalisation (ReduceL2, Div), element-wise ops"
)
F32 = NDArray[np.float32]
# uint8 activations with int8 weights (U8S8): the combination MLAS runs on its VNNI /
# AVX2 integer kernels. With int8 activations (S8S8) ONNX Runtime 1.32 left 18 of the 48
# backbone convolutions and every residual Add in float on this machine (2.5x slower).
ACTIVATION_TYPE = QuantType.QUInt8
# 7-bit weights (`reduce_range`) on x86 CPUs without VNNI (AVX2 / AVX-512F only): there
# MLAS's U8S8 kernels add pairs of u8 x s8 products in int16, which saturates with
# full-range weights (an AVX2-only VM: the test model's int8 features at cosine 0.85-0.90 of
# fp32, >= 0.95 on a VNNI host), and ONNX Runtime's documentation recommends it. On a VNNI
# CPU the lost bit costs accuracy instead: with the scikit-image calibration the committed
# `faces` int8 landmarks of one real face jumped by 10-15 cells with it and stayed put
# without. So the default follows the CPU that exports (the one the graphs are meant for);
# `--int8-reduce-range on` makes graphs safe for any x86 CPU. The manifest records it.


def cpu_has_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this (Linux x86) CPU has VNNI (AVX-512 VNNI or AVX-VNNI); False where unknown."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def default_reduce_range() -> bool:
    """`reduce_range` for graphs served on this CPU: on unless it has VNNI."""
    return not cpu_has_vnni()


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration images (N, 3, H, W) float32 in [0, 1] and where they came from."""

    images: F32
    source: str
    path: str | None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "images": len(self.images)}


def folder_images(folder: Path, size: tuple[int, int], count: int) -> F32:
    """`count` images spread evenly over the sorted image files anywhere under `folder`,
    resized to `size` (H, W) like the evaluation does. Deterministic: same folder, same set."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"no images under {folder}")
    picks = np.unique(np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int))
    out = [
        image_to_tensor(read_rgb(files[i]), size).numpy()
        for i in tqdm(picks, desc=f"calibration images {folder.name}", unit="img", leave=False)
    ]
    return np.stack(out).astype(np.float32)


def sample_images(size: tuple[int, int], count: int, seed: int = 0) -> F32:
    """`count` images the project can make without any data set: random crops (scale 0.3-1,
    random flips) of scikit-image's natural sample pictures and its `lfw_subset` faces.
    For CI and fresh clones; calibrating on the model's own training images is better."""
    from skimage import data as skdata

    rgb: list[NDArray[np.uint8]] = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera"):
        pic = np.asarray(getattr(skdata, name)())
        rgb.append(np.repeat(pic[..., None], 3, axis=2) if pic.ndim == 2 else pic[..., :3])
    rgb.extend(np.asarray(p)[..., :3] for p in skdata.stereo_motorcycle()[:2])
    faces = (np.asarray(skdata.lfw_subset()) * 255).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 3 == 2:  # one in three: a face (grey, 25x25, upscaled by image_to_tensor)
            face = faces[rng.integers(len(faces))]
            out.append(image_to_tensor(np.repeat(face[..., None], 3, axis=2), size).numpy())
            continue
        pic = rgb[rng.integers(len(rgb))]
        h, w = pic.shape[:2]
        scale = rng.uniform(0.3, 1.0)
        ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = pic[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(image_to_tensor(np.ascontiguousarray(crop), size).numpy())
    return np.stack(out).astype(np.float32)


def calibration_set(path: Path | None, size: tuple[int, int], count: int) -> CalibrationSet:
    """Images from `path` (a training-set folder), or scikit-image samples when `path` is
    None."""
    if path is None:
        return CalibrationSet(sample_images(size, count), "scikit-image sample images", None)
    return CalibrationSet(folder_images(path, size, count), "folder", str(path))


class FeedReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over a list of ready feeds."""

    def __init__(self, feeds: Sequence[dict[str, F32]]) -> None:
        self._feeds = list(feeds)
        self._iter: Iterator[dict[str, F32]] = iter(self._feeds)

    def get_next(self) -> dict[str, F32] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def declared_inputs(session: ort.InferenceSession, feed: dict[str, F32]) -> dict[str, F32]:
    """The part of `feed` that `session`'s graph takes (a zooming landmark graph also takes
    the image: docs/CONTRACT.md)."""
    return {i.name: feed[i.name] for i in session.get_inputs()}


def calibration_feeds(
    fp32_dir: Path, images: F32, batch: int = 8
) -> dict[str, list[dict[str, F32]]]:
    """Feeds of each graph: the images for the backbone, their fp32 features for the
    landmark head, (image i, image i+1) feature pairs for the alignment head."""
    backbone = _session(fp32_dir / "backbone.onnx")
    landmarks = _session(fp32_dir / "landmarks.onnx")
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    features = [
        backbone.run(None, {"image": c})[0]
        for c in tqdm(chunks, desc="calibration features", unit="batch", leave=False)
    ]
    every = np.concatenate(features)
    following = np.roll(every, -1, axis=0)
    # the alignment head is the dearest per item: calibrate it on half the batches
    pair_batch = max(1, batch // 2)
    return {
        "backbone": [{"image": c} for c in chunks],
        "landmarks": [
            declared_inputs(landmarks, {"features": f, "image": c})
            for f, c in zip(features, chunks, strict=True)
        ],
        "align": [
            {
                "source_features": every[i : i + pair_batch],
                "target_features": following[i : i + pair_batch],
            }
            for i in range(0, len(every), pair_batch * 2)
        ],
    }


def int8_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that get int8: every `QUANTIZED_OPS` node, and every
    `FOLLOWER_OPS` node all of whose computed inputs come from nodes already chosen
    (graph order is topological). Names missing nodes are given one."""
    inits = {i.name for i in model.graph.initializer}
    chosen: set[str] = set()
    made_by_chosen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
        computed = [i for i in node.input if i and i not in inits]
        if node.op_type in QUANTIZED_OPS or (
            node.op_type in FOLLOWER_OPS and computed and all(i in made_by_chosen for i in computed)
        ):
            chosen.add(node.name)
            made_by_chosen.update(node.output)
    return chosen


def keep_float_readers_float(model: onnx.ModelProto, int8: set[str]) -> int:
    """Rewire, in place, the float readers of a float tensor that was quantized for an int8
    reader back to the tensor itself; returns how many inputs were rewired.

    QDQ quantization puts QuantizeLinear -> DequantizeLinear on a tensor and every reader
    then reads the dequantized copy: where a float operator computed the tensor (the align
    head's consensus volume, which its first convolution reads) the float path saw the
    volume at 256 levels and ONNX Runtime ran one DequantizeLinear per reader edge (3.7 ms of
    the int8 align graph for 4 pairs). Tensors made by `int8` nodes (convolution outputs)
    keep their dequantized readers: there the float tensor never exists at run time.
    """
    made_by = {o: n for n in model.graph.node for o in n.output}
    rewired = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name in int8:
            continue
        for k, name in enumerate(node.input):
            dq = made_by.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = made_by.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            source = made_by.get(q.input[0])
            if source is not None and source.name in int8:
                continue
            node.input[k] = q.input[0]
            rewired += 1
    remove_dead_nodes(model)
    return rewired


def similarity_products(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul nodes both of whose operands are computed (neither an initializer nor a
    Constant): products of two feature maps, i.e. similarity volumes, where every other
    MatMul of the graphs multiplies by a fixed matrix (soft-argmax centres)."""
    fixed = {i.name for i in model.graph.initializer}
    fixed.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return [
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and not any(i in fixed for i in n.input)
    ]


def operand_peaks(
    path: Path, feeds: Sequence[dict[str, F32]], names: Sequence[str]
) -> dict[str, float]:
    """The largest |value| each float tensor `names` of graph `path` takes over `feeds`."""
    model = onnx.load(str(path))
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    peaks = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name, value in zip(names, session.run(list(names), feed), strict=True):
            peaks[name] = max(peaks[name], float(np.abs(value).max()))
    return peaks


MOVERS = ("Reshape", "Transpose")
"""Operators that only move values: an integer operand is quantized before them, and they
move a quarter of the bytes."""


def operand_chain(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    """The `MOVERS` nodes, first to last, that make a product's operand `tensor` from an
    earlier tensor, each of whose outputs only the next one (or the product) reads."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    chain: list[onnx.NodeProto] = []
    producer = made_by.get(tensor)
    while producer is not None and producer.op_type in MOVERS and readers[producer.output[0]] == 1:
        chain.insert(0, producer)
        producer = made_by.get(producer.input[0])
    return chain


def int8_similarity_products(
    model: onnx.ModelProto, peaks: dict[str, float], reduce_range: bool
) -> int:
    """Replace, in place, each `similarity_products` node by an integer product: operand A
    quantized to uint8 (zero point 128), B to int8 (zero point 0), both symmetric per tensor
    with their calibration `peaks` as the range, and ONNX Runtime's MatMulIntegerToFloat
    (com.microsoft) computing the float product. Returns how many were replaced.

    Why not QDQ around the MatMul: ONNX Runtime fuses that into the same operator but first
    converts an int8 operand to uint8, and MLAS's U8U8 product is half as fast as U8S8 (the
    align head's 4 x 1024 x 376 x 1024 cosines: 5.3 ms vs 2.8 ms, float 7.2 ms, 2-core EPYC
    with VNNI). The operands are L2-normalised features, so one range per tensor loses
    little: mean error 1.3e-3 on random unit vectors' cosines. Each operand is quantized
    before the Reshape / Transpose nodes that make it (`operand_chain`; left after them,
    ONNX Runtime moved the quantization to the graph input itself and added a
    DequantizeLinear / QuantizeLinear round trip there). `reduce_range`: B in 7 bits, as the
    weights (module header: MLAS without VNNI adds u8 x s8 pairs in int16)."""
    kinds = {
        "a": (onnx.TensorProto.UINT8, 128, 127.0),
        "b": (onnx.TensorProto.INT8, 0, 63.0 if reduce_range else 127.0),
    }
    before: dict[str, list[onnx.NodeProto]] = {}  # node (by first output) -> Q nodes to add
    inputs: dict[str, dict[str, str]] = {}  # node (by first output) -> input renames
    integer: dict[str, str] = {}  # a chain's float output -> the name of its integer copy
    scales: dict[str, list[str]] = {}  # product (by output) -> a/b scale, a/b zero point
    for index, product in enumerate(similarity_products(model)):
        name = product.name or f"similarity_{index}"
        names = [f"{name}_{x}" for x in ("a_scale", "b_scale", "a_zero_point", "b_zero_point")]
        scales[product.output[0]] = names
        for side, operand in zip("ab", product.input, strict=True):
            zero_type, zero, levels = kinds[side]
            scale = max(peaks[operand], 1e-12) / levels
            scale_name, zero_name = f"{name}_{side}_scale", f"{name}_{side}_zero_point"
            model.graph.initializer.extend(
                [
                    onnx.helper.make_tensor(scale_name, onnx.TensorProto.FLOAT, [], [scale]),
                    onnx.helper.make_tensor(zero_name, zero_type, [], [zero]),
                ]
            )
            chain = operand_chain(model, operand)
            first = chain[0] if chain else product
            start = first.input[0] if chain else operand
            quantized = f"{name}_{side}_quantized"
            before.setdefault(first.output[0], []).append(
                onnx.helper.make_node(
                    "QuantizeLinear",
                    [start, scale_name, zero_name],
                    [quantized],
                    name=f"{quantized}_QuantizeLinear",
                )
            )
            inputs.setdefault(first.output[0], {})[start] = quantized
            for mover in chain:
                integer[mover.output[0]] = f"{mover.output[0]}_quantized"
    replaced = 0
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in model.graph.node]
    del model.graph.node[:]
    for node in nodes:
        key = node.output[0]
        model.graph.node.extend(before.get(key, []))
        renames = {**integer, **inputs.get(key, {})}
        names_in = [renames.get(i, i) for i in node.input]
        if key in scales:
            a_scale, b_scale, a_zero, b_zero = scales[key]
            node = onnx.helper.make_node(
                "MatMulIntegerToFloat",
                [*names_in, a_scale, b_scale, a_zero, b_zero],
                list(node.output),
                name=node.name,
                domain="com.microsoft",
            )
            replaced += 1
        else:
            del node.input[:]
            node.input.extend(names_in)
            for k, out in enumerate(node.output):
                node.output[k] = integer.get(out, out)
        model.graph.node.append(node)
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return replaced


def quantize_graph(
    src: Path,
    dst: Path,
    feeds: Sequence[dict[str, F32]],
    reduce_range: bool,
    *,
    int8_similarities: bool = False,
) -> dict[str, Any]:
    """Write the int8 QDQ copy of graph `src` to `dst`; returns what was quantized.
    `int8_similarities`: also compute the `similarity_products` in integers
    (`int8_similarity_products`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    # the optimiser warns about every initializer it drops (dozens per graph); errors only
    ort.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="jlad-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference + ORT's float optimisations first (folds constants, fuses
        # Conv+BN), as onnxruntime.quantization recommends
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        proto = onnx.load(str(prepared))
        pads_folded = fold_pads_into_convs(proto)
        nodes = int8_nodes(proto)
        onnx.save(proto, str(prepared))
        op_types = sorted({n.op_type for n in proto.graph.node})
        quantized = sorted({n.op_type for n in proto.graph.node if n.name in nodes})
        operands = [i for n in similarity_products(proto) for i in n.input]
        peaks = operand_peaks(prepared, feeds, operands) if int8_similarities else {}
        quantize_static(
            str(prepared),
            str(dst),
            FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=quantized,
            nodes_to_quantize=sorted(nodes),
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=ACTIVATION_TYPE,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    model = onnx.load(str(dst))
    rewired = keep_float_readers_float(model, nodes)
    products = int8_similarity_products(model, peaks, reduce_range) if int8_similarities else 0
    onnx.save(model, str(dst))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {
        "quantized_op_types": quantized,
        "quantized_nodes": len(nodes),
        "float_op_types": [op for op in op_types if op not in quantized],
        "quantize_linear_nodes": counts.get("QuantizeLinear", 0),
        "pads_folded_into_convs": pads_folded,
        "float_readers_kept_float": rewired,
        "int8_similarity_products": products,
        "similarity_operand_peaks": {k: round(v, 4) for k, v in peaks.items()},
    }


def agreement(
    fp32_dir: Path, int8_dir: Path, images: F32, grid: tuple[int, int]
) -> dict[str, float]:
    """How far the int8 graphs are from the fp32 ones on `images` (held out from
    calibration): landmark points and mapping in feature cells (max and p99), heat-map
    probabilities and feature cosine similarity."""
    out: dict[str, dict[str, Any]] = {}
    for variant, folder in (("fp32", fp32_dir), ("int8", int8_dir)):
        sessions = {g: _session(folder / f"{g}.onnx") for g in GRAPH_NAMES}
        (feats,) = sessions["backbone"].run(None, {"image": images})
        heat, points, _ = sessions["landmarks"].run(
            None, declared_inputs(sessions["landmarks"], {"features": feats, "image": images})
        )
        mapping, _, conf = sessions["align"].run(
            None, {"source_features": feats, "target_features": np.roll(feats, -1, axis=0)}
        )
        out[variant] = {"f": feats, "h": heat, "p": points, "m": mapping, "c": conf}
    gh, gw = grid
    cells = np.array([gw / 2, gh / 2], np.float32)
    a, b = out["fp32"], out["int8"]
    points = np.abs(a["p"] - b["p"]) * cells
    mapping = np.abs(a["m"] - b["m"]) * cells.reshape(1, 2, 1, 1)
    cosine = (a["f"] * b["f"]).sum(axis=1)
    return {
        "images": len(images),
        "points_cells_max": float(points.max()),
        "points_cells_p99": float(np.percentile(points, 99)),
        "mapping_cells_median": float(np.median(mapping)),
        "mapping_cells_p99": float(np.percentile(mapping, 99)),
        "heatmaps_max_abs": float(np.abs(a["h"] - b["h"]).max()),
        "consistency_median_abs": float(np.median(np.abs(a["c"] - b["c"]))),
        "feature_cosine_min": float(cosine.min()),
        "feature_cosine_mean": float(cosine.mean()),
    }


def quantize_model(
    model_root: Path,
    input_size: tuple[int, int],
    grid_size: tuple[int, int],
    calibration: Path | None = None,
    images: int | None = None,
    held_out: int = 8,
    reduce_range: bool | None = None,
) -> dict[str, Any]:
    """Write `<model_root>/int8/*.onnx` from `<model_root>/fp32/*.onnx`; returns the
    manifest's `quantization` entry (calibration set, what stayed float, and the int8
    graphs' agreement with fp32 on `held_out` images that were not calibrated on).

    `images`: how many to calibrate on; default `FOLDER_IMAGES` from a folder, and
    `SAMPLE_IMAGES` without one (CI: a few crops cover the sample pictures' variety).
    `reduce_range`: 7-bit weights (None: `default_reduce_range()`, i.e. unless this CPU has
    VNNI)."""
    started = time.monotonic()
    if reduce_range is None:
        reduce_range = default_reduce_range()
    if images is None:
        images = FOLDER_IMAGES if calibration is not None else SAMPLE_IMAGES
    cal = calibration_set(calibration, input_size, images + held_out)
    calibrate, check = cal.images[:-held_out], cal.images[-held_out:]
    fp32_dir, int8_dir = model_root / "fp32", model_root / "int8"
    feeds = calibration_feeds(fp32_dir, calibrate)
    graphs = {}
    for graph in tqdm(GRAPH_NAMES, desc="quantize", unit="graph", leave=False):
        graphs[graph] = quantize_graph(
            fp32_dir / f"{graph}.onnx",
            int8_dir / f"{graph}.onnx",
            feeds[graph],
            reduce_range,
            int8_similarities=graph in INT8_SIMILARITY_GRAPHS,
        )
        log.info("quantized %s/%s: %s", model_root, graph, graphs[graph])
    return {
        "format": "QDQ (onnxruntime.quantization.quantize_static)",
        "activations": "uint8, asymmetric, per tensor, MinMax calibration",
        "weights": "int8, symmetric, per output channel"
        + (", 7-bit range (reduce_range)" if reduce_range else ", full range"),
        "reduce_range": reduce_range,
        "serve_on": "any x86 CPU"
        if reduce_range
        else "x86 CPUs with VNNI (exported with full-range weights: on a CPU without VNNI "
        "re-export with --int8-reduce-range on)",
        "calibration": {**cal.describe(), "images": len(calibrate)},
        "float_ops": FLOAT_OPS_NOTE,
        "graphs": graphs,
        "agreement_with_fp32": agreement(fp32_dir, int8_dir, check, grid_size),
        "seconds": round(time.monotonic() - started, 1),
        "providers": "CPU only (int8 QDQ kernels); fp16 is the GPU variant",
    }


def main(argv: list[str] | None = None) -> None:
    import json

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-root", type=Path, required=True, help="models/<name>/<version>")
    parser.add_argument("--calibration", type=Path, help="training images (default: samples)")
    parser.add_argument("--images", type=int, help="images to calibrate on (default 256 / 32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    manifest = json.loads((args.model_root / "manifest.json").read_text())
    size = (int(manifest["input"]["height"]), int(manifest["input"]["width"]))
    grid = (int(manifest["features"]["height"]), int(manifest["features"]["width"]))
    report = quantize_model(args.model_root, size, grid, args.calibration, args.images)
    # list the new variant in the manifest, as the export does
    from model_export.export import PARITY, sha256

    manifest["variants"]["int8"] = {
        g: {"path": f"int8/{g}.onnx", "sha256": sha256(args.model_root / "int8" / f"{g}.onnx")}
        for g in GRAPH_NAMES
    }
    manifest.setdefault("parity", {})["int8"] = PARITY["int8"]
    manifest["quantization"] = report
    (args.model_root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
