"""ONNX Runtime's denormal flag stays inside its runs (service/fpenv.py, service.runtime.Session):
runs flush subnormal floats, the thread that creates or runs a session keeps its own mode."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service import fpenv
from service.runtime import Session, session_options

TINY = 5e-324  # the smallest subnormal double: flushed to 0 where denormals are off


def _doubling_graph(path: Path) -> Path:
    """y = 2 x, float32."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_runs_flush_subnormals_and_the_caller_keeps_its_own_mode(tmp_path: Path) -> None:
    path = _doubling_graph(tmp_path / "double.onnx")
    subnormal = {"x": np.array([1e-40], np.float32)}
    session = Session(path, session_options(1), ["CPUExecutionProvider"])
    assert TINY * 1.0 == TINY  # creating it left this thread alone
    assert session.run(None, subnormal)[0][0] == 0.0  # the run flushed it
    assert TINY * 1.0 == TINY  # running it too
    seen: list[float] = []
    child = threading.Thread(target=lambda: seen.append(TINY * 1.0))
    child.start()
    child.join()
    assert seen == [TINY]  # and threads started afterwards
    # The control: a plain session made elsewhere keeps the subnormal.
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert plain.run(None, subnormal)[0][0] > 0


def test_isolated_gives_the_caller_its_own_mode_back_and_flushing_flushes(tmp_path: Path) -> None:
    before = fpenv.current()
    assert before is not None  # Linux: libm's fegetenv is reachable

    def make_session() -> ort.InferenceSession:
        return ort.InferenceSession(
            str(_doubling_graph(tmp_path / "d.onnx")),
            sess_options=session_options(1),
            providers=["CPUExecutionProvider"],
        )

    session = fpenv.isolated(make_session)
    assert isinstance(session, ort.InferenceSession)
    assert fpenv.current() == before and TINY * 1.0 == TINY
    flushing = fpenv.flushing_subnormals()
    assert flushing is not None and flushing != before  # x86-64 / AArch64 glibc
    with fpenv.applied(flushing):
        assert TINY * 1.0 == 0.0
        assert 1e-300 * 1e-10 == 0.0  # results that would be subnormal are flushed too
        assert 1.5 * 2.0 == 3.0
    assert TINY * 1.0 == TINY and fpenv.current() == before
