"""ONNX export: every output of ONNX Runtime (CPU) matches PyTorch, at two input sizes and
two batch sizes (neither of them the export's example batch), for random and real images;
the manifest describes the files exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from skimage import data as skdata

from model_export.export import PARITY, export_model, sha256
from model_export.model import JLAD, ModelConfig
from model_export.quantize import (
    FOLLOWER_OPS,
    QUANTIZED_OPS,
    cpu_has_vnni,
    declared_inputs,
    default_reduce_range,
    int8_similarity_products,
    keep_float_readers_float,
    operand_chain,
    similarity_products,
)

torch.set_num_threads(2)


def _model(size: int, zoom: float = 0.0) -> JLAD:
    torch.manual_seed(size)
    # The served architecture (configs/*.yaml), narrower: Lite2 hypercolumn, adapter without
    # its MLP, 1x1-reduced W_D on a projected self-similarity, a narrower W_A, three rounds
    # of neighbourhood consensus and the neighbourhood motion prior.
    model = JLAD(
        ModelConfig(
            backbone="efficientnet_lite2",
            input_size=(size, size),
            feature_dim=32,
            head_width=32,
            align_width=16,
            num_landmarks=5,
            adapter_refine=False,
            landmark_reduce=True,
            selfsim_dim=16,
            consensus_rounds=3,
            motion_prior_kernel=5,
            landmark_zoom=zoom,
            # the served `faces` recipe: the zoomed pass averaged with its mirror
            landmark_mirror=(1, 0, 2, 4, 3) if zoom else None,
        )
    )
    # a trained-like, non-zero residual so the whole W_A path is exercised
    with torch.no_grad():
        model.aligner.residual.weight.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(
    scope="module",
    params=[(64, 0.0), (96, 0.0), (64, 1.5), (96, 1.5)],
    ids=["64px", "96px", "64px-zoom", "96px-zoom"],
)
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[JLAD, Path]:
    """One export per size, without (`objects`) and with (`faces`) the landmark zoom and
    mirror averaging."""
    size, zoom = request.param
    model = _model(size, zoom)
    # int8 calibrated on scikit-image samples (no calibration folder: the CI path)
    root = export_model(model, tmp_path_factory.mktemp("repo"), "test", "1", calibration_images=24)
    return model, root


def _images(batch: int, size: int, real: bool) -> torch.Tensor:
    if not real:
        return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    pictures = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()][:batch]
    out = []
    for pic in pictures:
        t = torch.from_numpy(pic).permute(2, 0, 1)[None].float() / 255
        out.append(torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear"))
    return torch.cat(out)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_all(root: Path, variant: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the three graphs of `variant` (int8 graphs take float32)."""
    dtype = np.float16 if variant == "fp16" else np.float32
    backbone = _session(root / variant / "backbone.onnx")
    landmarks = _session(root / variant / "landmarks.onnx")
    align = _session(root / variant / "align.onnx")
    (feats,) = backbone.run(None, {"image": images.astype(dtype)})
    feed = {"features": feats, "image": images.astype(dtype)}
    heat, points, conf = landmarks.run(None, declared_inputs(landmarks, feed))
    mapping, log_sigma, aconf = align.run(
        None, {"source_features": feats, "target_features": feats[::-1].copy()}
    )
    out = {
        "features": feats,
        "heatmaps": heat,
        "points": points,
        "landmark_confidence": conf,
        "mapping": mapping,
        "log_sigma": log_sigma,
        "confidence": aconf,
    }
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _run_torch(model: JLAD, images: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        f = model.features(images)
        lm = model.detect_landmarks(images, f)
        al = model.align(f, f.flip(0))
    out = {
        "features": f,
        "heatmaps": lm["heatmaps"],
        "points": lm["points"],
        "landmark_confidence": lm["confidence"],
        "mapping": al["mapping"],
        "log_sigma": al["log_sigma"],
        "confidence": al["confidence"],
    }
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("real", [False, True], ids=["random", "real"])
def test_fp32_parity(exported: tuple[JLAD, Path], batch: int, real: bool) -> None:
    model, root = exported
    size = model.config.input_size[0]
    images = _images(batch, size, real)
    ours, ref = _run_all(root, "fp32", images.numpy()), _run_torch(model, images)
    tol = PARITY["fp32"]
    gh, gw = model.grid_size
    cells = np.array([gw / 2, gh / 2], np.float32).reshape(1, 2, 1, 1)
    assert ours["mapping"].shape == (batch, 2, gh, gw)
    assert np.abs((ours["mapping"] - ref["mapping"]) * cells).max() <= tol["mapping_cells"]
    points_cells = np.abs(ours["points"] - ref["points"]) * cells.reshape(1, 1, 2)
    assert points_cells.max() <= tol["mapping_cells"]
    for key in ("heatmaps", "landmark_confidence"):
        assert np.abs(ours[key] - ref[key]).max() <= tol["probabilities"], key
    assert np.abs(ours["confidence"] - ref["confidence"]).max() <= tol["consistency"]
    assert np.abs(ours["features"] - ref["features"]).max() <= tol["features"]
    np.testing.assert_allclose(ours["log_sigma"], ref["log_sigma"], atol=1e-3)


@pytest.mark.parametrize("batch", [1, 3])
def test_fp16_parity(exported: tuple[JLAD, Path], batch: int) -> None:
    model, root = exported
    size = model.config.input_size[0]
    images = _images(batch, size, real=True)
    ours, ref = _run_all(root, "fp16", images.numpy()), _run_torch(model, images)
    tol = PARITY["fp16"]
    gh, gw = model.grid_size
    cells = np.array([gw / 2, gh / 2], np.float32).reshape(1, 2, 1, 1)
    err = np.abs((ours["mapping"] - ref["mapping"]) * cells)
    # fp16 similarity volumes can flip near-ties: bound the median and the 99th percentile
    assert np.median(err) <= tol["mapping_cells"] / 5
    assert np.percentile(err, 99) <= tol["mapping_cells"] * 4
    assert np.abs(ours["features"] - ref["features"]).max() <= tol["features"]
    consistency = np.abs(ours["confidence"] - ref["confidence"])
    assert np.median(consistency) <= tol["consistency"] / 5
    assert np.percentile(consistency, 99) <= tol["consistency"] * 10


@pytest.mark.parametrize("batch", [1, 3])
def test_int8_parity(exported: tuple[JLAD, Path], batch: int) -> None:
    """int8 (QDQ) against PyTorch fp32, on real images the calibration never saw: features
    keep their direction; mapping and consistency stay close in median, and few matches
    move by more than a cell (quantization flips near-ties); landmarks stay put."""
    model, root = exported
    size = model.config.input_size[0]
    images = _images(batch, size, real=True)
    ours, ref = _run_all(root, "int8", images.numpy()), _run_torch(model, images)
    tol = PARITY["int8"]
    gh, gw = model.grid_size
    cells = np.array([gw / 2, gh / 2], np.float32).reshape(1, 2, 1, 1)
    assert ours["mapping"].shape == (batch, 2, gh, gw)
    cosine = (ours["features"] * ref["features"]).sum(axis=1)
    assert cosine.min() >= tol["feature_cosine"]
    assert np.abs(ours["features"] - ref["features"]).max() <= tol["features"]
    err = np.abs((ours["mapping"] - ref["mapping"]) * cells).max(axis=1)
    assert np.median(err) <= tol["mapping_cells_median"]
    assert (err > 1).mean() <= tol["mapping_moved_share"]
    points_cells = np.abs(ours["points"] - ref["points"]) * cells.reshape(1, 1, 2)
    assert points_cells.max() <= tol["points_cells"]
    assert np.abs(ours["heatmaps"] - ref["heatmaps"]).max() <= tol["probabilities"]
    np.testing.assert_allclose(ours["heatmaps"].sum(axis=(2, 3)), 1.0, atol=1e-4)
    consistency = np.abs(ours["confidence"] - ref["confidence"])
    assert np.median(consistency) <= tol["consistency_median"]


def test_int8_graphs_are_quantized_where_it_pays(exported: tuple[JLAD, Path]) -> None:
    """Every convolution runs in int8 (QDQ around it, weights stored as int8), while the
    similarity, Softmax and GridSample operators stay float32."""
    import onnx

    _, root = exported
    for graph in ("backbone", "landmarks", "align"):
        fp32 = onnx.load(str(root / "fp32" / f"{graph}.onnx"))
        int8 = onnx.load(str(root / "int8" / f"{graph}.onnx"))
        made_by = {o: n for n in int8.graph.node for o in n.output}
        convs = [n for n in int8.graph.node if n.op_type == "Conv"]
        assert len(convs) == sum(n.op_type == "Conv" for n in fp32.graph.node)
        for conv in convs:
            assert made_by[conv.input[0]].op_type == "DequantizeLinear", (graph, conv.name)
            assert made_by[conv.input[1]].op_type == "DequantizeLinear", (graph, conv.name)
        for node in int8.graph.node:
            if node.op_type in ("Softmax", "GridSample", "Einsum", "MatMul", "ReduceSum"):
                assert made_by.get(node.input[0], node).op_type != "DequantizeLinear", (
                    graph,
                    node.name,
                )
        # every convolution's weight is stored as int8 (passes that share weights, as the
        # landmark graph's zoomed and mirrored passes, share the initializer too)
        int8_weights = {
            i.name for i in int8.graph.initializer if i.data_type == onnx.TensorProto.INT8
        }
        assert {made_by[conv.input[1]].input[0] for conv in convs} <= int8_weights
        # the align graph's cross-similarity is the one integer product, of the quantized
        # input features (moved as integers); the landmark graph's self-similarity stays float
        products = [n for n in int8.graph.node if n.op_type == "MatMulIntegerToFloat"]
        assert len(products) == (1 if graph == "align" else 0), graph
        for product in products:
            for operand in product.input[:2]:
                node = made_by[operand]
                while node.op_type in ("Reshape", "Transpose"):
                    node = made_by[node.input[0]]
                assert node.op_type == "QuantizeLinear"
                assert node.input[0] in ("source_features", "target_features")
        float_products = 0 if graph == "align" else len(similarity_products(fp32))
        assert len(similarity_products(int8)) == float_products, graph
        # a float tensor quantized for an int8 reader stays float for its float readers
        int8_ops = {*QUANTIZED_OPS, *FOLLOWER_OPS}
        for node in int8.graph.node:
            if node.op_type in int8_ops or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            for name in node.input:
                dq = made_by.get(name)
                q = made_by.get(dq.input[0]) if dq and dq.op_type == "DequantizeLinear" else None
                if q is None or q.op_type != "QuantizeLinear":
                    continue
                source = made_by.get(q.input[0])
                assert source is not None and source.op_type in int8_ops, (graph, node.name)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_similarity_products_known_answer_and_chain(reduce_range: bool) -> None:
    """y = transpose(reshape(a)) @ b with a also read by a Sigmoid: the product becomes
    MatMulIntegerToFloat of a quantized before its Reshape / Transpose (a stays float for the
    Sigmoid) and of b, equal to the float product within the quantization error; a
    product with a constant operand is left alone."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(3)
    a = rng.uniform(-0.5, 0.5, (2, 6, 4, 5)).astype(np.float32)  # (B, C, h, w)
    b = rng.uniform(-0.4, 0.4, (2, 6, 7)).astype(np.float32)
    fixed = rng.uniform(-1, 1, (7, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Reshape", ["a", "shape"], ["ar"], name="reshape"),
        helper.make_node("Transpose", ["ar"], ["at"], perm=[0, 2, 1], name="transpose"),
        helper.make_node("MatMul", ["at", "b"], ["y"], name="product"),
        helper.make_node("MatMul", ["y", "fixed"], ["z"], name="by_constant"),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, a.shape),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, b.shape),
        ],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
            for n, shape in (("y", (2, 20, 7)), ("z", (2, 20, 3)), ("s", a.shape))
        ],
        [
            helper.make_tensor("shape", TensorProto.INT64, [3], [2, 6, 20]),
            onnx.numpy_helper.from_array(fixed, "fixed"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [n.name for n in similarity_products(model)] == ["product"]
    assert [n.name for n in operand_chain(model, "at")] == ["reshape", "transpose"]
    peaks = {"at": float(np.abs(a).max()), "b": float(np.abs(b).max())}
    assert int8_similarity_products(model, peaks, reduce_range) == 1
    onnx.checker.check_model(model)
    by_name = {n.name: n for n in model.graph.node}
    assert by_name["product"].op_type == "MatMulIntegerToFloat"
    assert by_name["by_constant"].op_type == "MatMul"
    assert list(by_name["sigmoid"].input) == ["a"]
    assert by_name["reshape"].input[0] == "product_a_quantized"
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert scales["product_b_scale"] == pytest.approx(peaks["b"] / (63 if reduce_range else 127))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, z, s = session.run(None, {"a": a, "b": b})
    expected = a.reshape(2, 6, 20).transpose(0, 2, 1) @ b
    # each operand is off by at most half a step; the products of 6 pairs add up
    step_a, step_b = peaks["at"] / 127, float(scales["product_b_scale"])
    bound = 6 * (0.5 * step_a * peaks["b"] + 0.5 * step_b * peaks["at"] + 0.25 * step_a * step_b)
    assert np.abs(y - expected).max() <= bound
    assert np.abs(y - expected).max() > 0  # integer arithmetic, not the float product
    np.testing.assert_allclose(z, y @ fixed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-a)), rtol=1e-6)


def test_keep_float_readers_float_rewires_only_float_made_tensors() -> None:
    """m = x * 2 is quantized for a convolution: the Sigmoid reading it gets m back; the
    Tanh reading the convolution's (dequantized) output keeps reading it."""
    import onnx
    from onnx import TensorProto, helper

    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.UINT8, [], [128])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["m"], name="mul"),
        helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"], name="q1"),
        helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["md"], name="dq1"),
        helper.make_node("Conv", ["md", "w"], ["c"], name="conv"),
        helper.make_node("Sigmoid", ["md"], ["y1"], name="sigmoid"),
        helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="q2"),
        helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="dq2"),
        helper.make_node("Tanh", ["cd"], ["y2"], name="tanh"),
    ]
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 2, 2]) for n in "x"]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 2, 2]) for n in ("y1", "y2")]
    graph = helper.make_graph(nodes, "g", info, outs, [scale, zero, two, weight])
    model = helper.make_model(graph)
    assert keep_float_readers_float(model, {"conv"}) == 1
    by_name = {n.name: n for n in model.graph.node}
    assert list(by_name["sigmoid"].input) == ["m"]
    assert list(by_name["conv"].input) == ["md", "w"]
    assert list(by_name["tanh"].input) == ["cd"]
    onnx.checker.check_model(model)


def test_manifest_describes_the_files(exported: tuple[JLAD, Path]) -> None:
    model, root = exported
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["schema"] == "jlad.manifest/1"
    assert manifest["input"]["height"] == model.config.input_size[0]
    assert manifest["features"]["height"] == model.grid_size[0]
    assert manifest["num_landmarks"] == 5
    assert manifest["parity"]["int8"] == PARITY["int8"]
    calibration = manifest["quantization"]["calibration"]
    assert calibration["source"] == "scikit-image sample images"
    assert calibration["path"] is None
    assert calibration["images"] == 24
    assert manifest["quantization"]["agreement_with_fp32"]["images"] == 8
    # 7-bit weights unless the exporting CPU has VNNI, said in the manifest
    assert manifest["quantization"]["reduce_range"] is default_reduce_range()
    assert ("any x86 CPU" in manifest["quantization"]["serve_on"]) is default_reduce_range()
    for variant in ("fp32", "fp16", "int8"):
        for graph in ("backbone", "landmarks", "align"):
            entry = manifest["variants"][variant][graph]
            assert entry["sha256"] == sha256(root / entry["path"])
            names = [i.name for i in _session(root / entry["path"]).get_inputs()]
            assert names == manifest["graphs"][graph]["inputs"]
    zoom = model.config.landmark_zoom
    assert manifest["landmark_zoom"] == zoom
    assert manifest["landmark_mirror"] == ([1, 0, 2, 4, 3] if zoom else None)
    assert ("image" in manifest["graphs"]["landmarks"]["inputs"]) is bool(zoom)


def test_batch_axis_is_dynamic_in_every_graph(exported: tuple[JLAD, Path]) -> None:
    _, root = exported
    for graph in ("backbone", "landmarks", "align"):
        sess = _session(root / "fp32" / f"{graph}.onnx")
        for tensor in [*sess.get_inputs(), *sess.get_outputs()]:
            assert isinstance(tensor.shape[0], str), (graph, tensor.name, tensor.shape)


def test_cpu_has_vnni_reads_the_cpu_flags(tmp_path: Path) -> None:
    avx2 = tmp_path / "avx2"
    avx2.write_text("flags\t\t: fpu sse2 avx avx2 fma\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not cpu_has_vnni(avx2)
    assert cpu_has_vnni(vnni)
    assert not cpu_has_vnni(tmp_path / "missing")  # unknown: not VNNI (the safe side)
