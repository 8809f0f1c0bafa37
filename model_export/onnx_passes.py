"""Rewrites of exported ONNX graphs that keep their values and make them cheaper to run.

The TorchScript exporter writes each `F.pad` of the EfficientNet trunk's TensorFlow-style
"same" padding as a `Pad` whose amounts come out of a chain of Constant / ConstantOfShape /
Concat / Reshape / Slice / Transpose / Cast nodes, and ONNX Runtime's CPU provider then
runs every one of them as a separate Pad with a layout change on each side (NCHWc reorders):
in the 224 px `faces` backbone graph, 61 convolutions took 24 ms and their 60 Pads plus the
reorders around them 37 ms (batch 4, 2 threads). `fold_pads_into_convs` evaluates the chains
(`onnx.reference`) and folds the zero Pads into their convolutions'
own `pads` attribute: the same values (convolution over an explicitly zero-padded input is
convolution with padding), half the time for the trunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

# Operators of the exporter's pad-amount chains; small tensors only, so evaluating them at
# export costs nothing.
_SHAPE_OPS = {
    "Cast",
    "Concat",
    "ConstantOfShape",
    "Reshape",
    "Slice",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
}
_SMALL = 4096


class _Constants:
    """Values of the tensors computable from constants alone through `_SHAPE_OPS`."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.values[node.output[0]] = numpy_helper.to_array(attribute.t)

    def get(self, name: str) -> np.ndarray | None:
        if name in self.values:
            return self.values[name]
        node = self.producer.get(name)
        if node is None or node.op_type not in _SHAPE_OPS:
            return None
        feeds = {}
        for input_name in (i for i in node.input if i):
            value = self.get(input_name)
            if value is None or value.size > _SMALL:
                return None
            feeds[input_name] = value
        results = ReferenceEvaluator(node).run(None, feeds)
        self.values.update(zip(node.output, (np.asarray(r) for r in results), strict=True))
        return self.values[name]


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Remove, in place, the nodes none of whose outputs is read or a graph output (as a
    fold leaves its constant chains); returns how many."""
    removed = 0
    while True:
        read = {name for node in model.graph.node for name in node.input}
        read |= {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(o in read for o in n.output)]
        if not dead:
            return removed
        for node in dead:
            model.graph.node.remove(node)
        removed += len(dead)


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Fold every zero-valued constant `Pad` whose only reader is a `Conv` into that Conv's
    `pads` attribute, in place. Besides saving the Pad itself on every runtime, a standalone
    Pad splits each int8 QDQ chain in two (dequantize, pad in float, quantize again).
    Returns how many were folded."""
    constants = _Constants(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    folded = []
    for pad in [n for n in model.graph.node if n.op_type == "Pad"]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        after = readers.get(pad.output[0], [])
        if mode != b"constant" or len(after) != 1 or pad.output[0] in outputs:
            continue
        conv = after[0]
        if conv.op_type != "Conv" or conv.input[0] != pad.output[0]:
            continue
        pads = constants.get(pad.input[1])
        if pads is None:
            continue
        if len(pad.input) > 2 and pad.input[2]:
            value = constants.get(pad.input[2])
            if value is None or np.any(value != 0):
                continue
        if len(pad.input) > 3 and pad.input[3]:  # explicit axes: leave it
            continue
        amounts = pads.astype(int).tolist()
        rank = len(amounts) // 2
        begin, end = amounts[:rank], amounts[rank:]
        if rank < 3 or any(begin[:2]) or any(end[:2]) or min(amounts) < 0:
            continue
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * (rank - 2))
        spatial = rank - 2
        new = [old[i] + begin[2 + i] for i in range(spatial)] + [
            old[spatial + i] + end[2 + i] for i in range(spatial)
        ]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        model.graph.node.remove(pad)
    remove_dead_nodes(model)
    return len(folded)


def fold_pads_in_file(path: Path) -> int:
    """`fold_pads_into_convs` on the graph saved at `path`, written back; returns the count."""
    proto = onnx.load(str(path))
    folded = fold_pads_into_convs(proto)
    onnx.save(proto, str(path))
    return folded
