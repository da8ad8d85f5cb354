"""Graphs and helpers for the tests of the external-data route: sessions staged through a
data file (tests/test_runtime.py), the writer (tests/graph/test_external.py), models over
2 GiB (tests/test_large.py) and lazy tensors (tests/test_lazy.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx import runtime
from rdprune_onnx.graph import external, load
from tests import graphs


def rng_inputs(model: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    """Random feeds for every graph input (unknown dimensions: ``batch``; bools: True)."""
    rng = np.random.default_rng(1)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
        if dtype == np.bool_:
            feeds[value.name] = np.array(True)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def nested_scopes() -> onnx.ModelProto:
    """An If whose branch has its own initializer and Constant node, and a Constant node
    with typed (float_data) storage in the main graph."""
    rng = np.random.default_rng(2)
    f32 = TensorProto.FLOAT
    inner_w = rng.standard_normal((6, 6)).astype(np.float32)
    inner_c = rng.standard_normal((6, 6)).astype(np.float32)
    typed = rng.standard_normal((6, 6)).astype(np.float32)
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c_in"], value=graphs.init("c_in_v", inner_c)),
            helper.make_node("MatMul", ["h", "w_in"], ["t1"], name="then_mm"),
            helper.make_node("MatMul", ["t1", "c_in"], ["t_out"], name="then_mm2"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", f32, None)],
        [graphs.init("w_in", inner_w)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", f32, None)],
    )
    typed_tensor = helper.make_tensor("typed_v", f32, [6, 6], typed.ravel().tolist(), raw=False)
    nodes = [
        helper.make_node("Constant", [], ["w_typed"], value=typed_tensor),
        helper.make_node("MatMul", ["x", "w_typed"], ["h"], name="typed_mm"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "nested",
        [
            helper.make_tensor_value_info("x", f32, ["N", 6]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", f32, ["N", 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn": graphs.cnn,
    "cnn_fp16": lambda: graphs.cnn(dtype=np.float16),
    "mlp_forms": graphs.mlp_forms,
    "loop_model": graphs.loop_model,
    "attention": graphs.attention,
    "nested_scopes": nested_scopes,
}


def external_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the tiny test graphs take the route of models over 2 GiB (staged to disk)."""
    monkeypatch.setattr(runtime, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(external, "TENSOR_MIN_BYTES", 64)


def typed_model() -> onnx.ModelProto:
    """Initializers of several element types, each read back through an Identity."""
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "f16": rng.normal(size=(4, 2)).astype(np.float16),
        "i64": rng.integers(-9, 9, size=(6,)).astype(np.int64),
        "u8": rng.integers(0, 255, size=(2, 3)).astype(np.uint8),
    }
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    halves = (np.float32([1.5, -2.0, 0.25]).view(np.uint32) >> 16).astype("<u2")
    bf16 = helper.make_tensor("bf16", TensorProto.BFLOAT16, [3], halves.tobytes(), raw=True)
    inits.append(bf16)
    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n in [*arrays, "bf16"]]
    outputs = [
        helper.make_tensor_value_info(t.name + "_out", t.data_type, list(t.dims)) for t in inits
    ]
    graph = helper.make_graph(nodes, "typed", [], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def all_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every external tensor of a model loaded from now on stays on disk (lazy), as the
    large tensors of a 2.5 GB model do."""
    monkeypatch.setattr(load, "LAZY_MIN_BYTES", 0)


def save_in(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    """``model`` saved as ``folder/name`` with every tensor in ``name.data`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    return graphs.save_external(model, folder / name)
