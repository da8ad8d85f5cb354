"""Models for the safety tests (tests/test_safety*.py), built in code."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.graphs import _model, init


def slow(width: int = 256, layers: int = 3, rounds: int = 4) -> onnx.ModelProto:
    """``layers`` small prunable MatMuls, then ``rounds`` of a heavy weight-free block
    (``h = tanh(h @ h^T @ h / n)``, cost batch^2 * width each): with a large batch every
    run takes seconds while the model and its data stay small."""
    rng = np.random.default_rng(0)
    nodes = []
    inits = []
    current = "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(init(f"w{i}", w))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        current = f"m{i}"
    inits.append(init("scale", np.array(1.0 / width, dtype=np.float32)))
    for r in range(rounds):
        nodes += [
            helper.make_node("Transpose", [current], [f"t{r}"], perm=[1, 0]),
            helper.make_node("MatMul", [current, f"t{r}"], [f"g{r}"]),
            helper.make_node("MatMul", [f"g{r}", current], [f"p{r}"]),
            helper.make_node("Mul", [f"p{r}", "scale"], [f"s{r}"]),
            helper.make_node("Tanh", [f"s{r}"], [f"h{r}"]),
        ]
        current = f"h{r}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        inits,
    )
    return _model(graph)


def two_modes(width: int = 8) -> onnx.ModelProto:
    """``y = (mode > 0.5 ? x @ wa : x @ wb) @ wc``: with ``mode`` fixed, one branch's
    weight never reaches the output (like a voice-activity model's other sample rate)."""
    rng = np.random.default_rng(1)
    inits = [
        init(name, (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32))
        for name in ("wa", "wb", "wc")
    ]
    inits.append(init("half", np.array(0.5, dtype=np.float32)))
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"]),
        helper.make_node("MatMul", ["x", "wb"], ["b"]),
        helper.make_node("Greater", ["mode", "half"], ["on"]),
        helper.make_node("Where", ["on", "a", "b"], ["h"]),
        helper.make_node("MatMul", ["h", "wc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "two_modes",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width]),
            helper.make_tensor_value_info("mode", TensorProto.FLOAT, ["n", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        inits,
    )
    return _model(graph)


def dead_output(width: int = 8) -> onnx.ModelProto:
    """``y = (x @ w) * 0``: no weight ever changes the output."""
    rng = np.random.default_rng(2)
    inits = [
        init("w", rng.standard_normal((width, width)).astype(np.float32)),
        init("zero", np.array(0.0, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Mul", ["a", "zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dead_output",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        inits,
    )
    return _model(graph)


def gru(hidden: int = 4, features: int = 3) -> onnx.ModelProto:
    """A GRU (W, R, B), then a prunable MatMul."""
    rng = np.random.default_rng(3)
    inits = [
        init("W", rng.standard_normal((1, 3 * hidden, features)).astype(np.float32)),
        init("R", rng.standard_normal((1, 3 * hidden, hidden)).astype(np.float32)),
        init("B", rng.standard_normal((1, 6 * hidden)).astype(np.float32)),
        init("fc", rng.standard_normal((hidden, 2)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("GRU", ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden),
        helper.make_node("MatMul", ["h", "fc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gru",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "n", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 2])],
        inits,
    )
    return _model(graph)


def zipmap() -> onnx.ModelProto:
    """A classifier whose only output is skl2onnx's ZipMap (a list of maps)."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["p"]),
        helper.make_node("ZipMap", ["p"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[0, 1]),
    ]
    value = helper.make_tensor_type_proto(TensorProto.FLOAT, [])
    out = helper.make_value_info(
        "z", helper.make_sequence_type_proto(helper.make_map_type_proto(TensorProto.INT64, value))
    )
    graph = helper.make_graph(
        nodes,
        "zipmap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [out],
        [init("w", rng.standard_normal((4, 2)).astype(np.float32))],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
