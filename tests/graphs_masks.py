"""Tiny one-layer graphs for the data-aware mask tests (weights given by the caller)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], out: str,
           inits: dict[str, np.ndarray]) -> onnx.ModelProto:  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "mask_test",
        inputs,
        [helper.make_tensor_value_info(out, F32, [])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def gemm(weight: np.ndarray, *, trans_b: int, alpha: float, features: int) -> onnx.ModelProto:
    """y = alpha * x @ B' (+ 0), the weight as B."""
    node = helper.make_node(
        "Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=trans_b, alpha=alpha
    )
    outputs = weight.shape[0] if trans_b else weight.shape[1]
    return _model(
        [node],
        [helper.make_tensor_value_info("x", F32, ["N", features])],
        "y",
        {"w": weight, "c": np.zeros(outputs)},
    )


def matmul_3d(weight: np.ndarray, seq: int) -> onnx.ModelProto:
    """(batch, seq, hidden) activations through an Identity (an internal tensor) into x @ W."""
    nodes = [
        helper.make_node("Identity", ["x"], ["h"], name="copy"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="proj"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F32, ["N", seq, weight.shape[0]])],
        "y",
        {"w": weight},
    )


def matmul_left(weight: np.ndarray) -> onnx.ModelProto:
    """W @ x^T with x (N, K): the weight on the left, features on x^T's first axis."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xT"], perm=[1, 0]),
        helper.make_node("MatMul", ["w", "xT"], ["y"], name="left"),
    ]
    return _model(
        nodes, [helper.make_tensor_value_info("x", F32, ["N", weight.shape[1]])], "y", {"w": weight}
    )


def conv(weight: np.ndarray, group: int, channels: int, transpose: bool = False) -> onnx.ModelProto:
    op = "ConvTranspose" if transpose else "Conv"
    node = helper.make_node(op, ["x", "w"], ["y"], name="conv", group=group)
    return _model(
        [node], [helper.make_tensor_value_info("x", F32, ["N", channels, 2, 2])], "y", {"w": weight}
    )


def shared(weight: np.ndarray) -> onnx.ModelProto:
    """One weight used twice: y = (x @ W) and z = (relu(x) @ W), summed."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
        helper.make_node("Relu", ["x"], ["rx"]),
        helper.make_node("MatMul", ["rx", "w"], ["b"], name="second"),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    return _model(
        nodes, [helper.make_tensor_value_info("x", F32, ["N", weight.shape[0]])], "y", {"w": weight}
    )


def batched_matmul(weight: np.ndarray, seq: int) -> onnx.ModelProto:
    """x (N, H, S, K) @ W (H, K, M): one weight matrix per head."""
    heads, k, _m = weight.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="heads")
    return _model(
        [node], [helper.make_tensor_value_info("x", F32, ["N", heads, seq, k])], "y", {"w": weight}
    )


def masked_matmul(weight: np.ndarray, seq: int) -> onnx.ModelProto:
    """Token activations (batch, seq, hidden) @ W, with an ``attention_mask`` input that
    zeroes the padded positions of the output (it is not needed to compute W's input)."""
    nodes = [
        helper.make_node("Identity", ["x"], ["h"], name="copy"),
        helper.make_node("MatMul", ["h", "w"], ["p"], name="proj"),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=F32),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
        helper.make_node("Mul", ["p", "m3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked",
        [
            helper.make_tensor_value_info("x", F32, ["N", seq, weight.shape[0]]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", seq]),
        ],
        [helper.make_tensor_value_info("y", F32, [])],
        [
            numpy_helper.from_array(weight.astype(np.float32), "w"),
            numpy_helper.from_array(np.array([2], np.int64), "axis"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def gemm_left(weight: np.ndarray, *, trans_a: int, alpha: float, features: int) -> onnx.ModelProto:
    """y = alpha * A' @ x^T with the weight as A (transA given) and x (N, K) as B, transB=1."""
    node = helper.make_node(
        "Gemm", ["w", "x"], ["y"], name="gemm_left", transA=trans_a, transB=1, alpha=alpha
    )
    return _model(
        [node], [helper.make_tensor_value_info("x", F32, ["N", features])], "y", {"w": weight}
    )
