"""Contract of the graph rewrites applied at export (model_export/onnx_passes.py): the
exporter's pad chains fold into the convolutions and the outputs stay the same."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from model_export.backbones import EfficientNetLite
from model_export.onnx_passes import fold_pads_into_convs, remove_dead_nodes


class _PadThenConv(torch.nn.Module):
    """An asymmetric zero pad (TensorFlow 'SAME' at stride 2), a reflect pad (not foldable)
    and a zero pad read by two nodes (not foldable either)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.pad(x, (0, 1, 0, 1)))
        y = self.conv2(F.pad(y, (1, 1, 1, 1), mode="reflect"))
        z = F.pad(y, (1, 1, 1, 1))
        return self.conv2(z) + z.mean()


def _export(module: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        module.eval(),
        (example,),
        buffer,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return onnx.load_from_string(buffer.getvalue())


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_zero_pads_fold_into_convs_and_keep_the_values() -> None:
    module = _PadThenConv()
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    model = _export(module, x[:1])
    assert Counter(n.op_type for n in model.graph.node)["Pad"] == 3
    before = _run(model, x.numpy())
    assert fold_pads_into_convs(model) == 1
    onnx.checker.check_model(model)
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 2  # the reflect pad and the shared one stay
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    attrs = {a.name: list(a.ints) for a in first_conv.attribute}
    assert attrs["pads"] == [0, 0, 1, 1]  # begin (top, left), end (bottom, right)
    after = _run(model, x.numpy())
    np.testing.assert_array_equal(after, before)
    with torch.no_grad():
        np.testing.assert_allclose(after, module(x).numpy(), atol=1e-5)
    assert remove_dead_nodes(model) == 0  # the folded pads' constant chains are gone already


def test_the_trunk_loses_every_pad_and_matches_torch() -> None:
    trunk = EfficientNetLite("efficientnet_lite0", taps=None)
    trunk.load_imagenet()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = _export(trunk, x[:1])
    count = Counter(n.op_type for n in model.graph.node)
    assert count["Pad"] == count["Conv"]  # every conv pads explicitly (1x1s by zero)
    assert fold_pads_into_convs(model) == count["Pad"]
    assert not any(n.op_type in ("Pad", "ConstantOfShape") for n in model.graph.node)
    with torch.no_grad():
        np.testing.assert_allclose(_run(model, x.numpy()), trunk(x).numpy(), atol=2e-4)
