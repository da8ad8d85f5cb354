"""Tiny graphs ending in each kind of output activation (for distortion kinds)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.graphs import _model, init

# tail name -> (nodes after the MatMul "s" (N, T, C) or (N, C, T), the output's shape)
TAILS = ("none", "softmax", "softmax_transpose", "softmax_axis1_transpose", "logsoftmax")
TAILS += ("sigmoid", "softmax_reshape", "normalize")


def head(tail: str, seed: int = 0, classes: int = 5, steps: int = 3) -> onnx.ModelProto:
    """x (N, T, 4) -> MatMul (4, C) -> ``tail``; output ``y``.

    ``softmax_transpose``: Softmax over C, then Transpose to (T, N, C), CTC-style.
    ``softmax_axis1_transpose``: Transpose to (N, C, T), Softmax over axis 1, Transpose to
    (T, N, C): the class axis moves from 1 to 2. ``softmax_reshape``: Softmax then Reshape to
    (N, T*C) (the class axis is lost to the graph). ``normalize``: unit-norm rows (an
    embedding, built from Div by the ReduceL2 norm).
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, classes)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"], name="fc")]
    inits = [init("w", w)]
    out_shape: list[str | int] = ["N", steps, classes]
    if tail == "softmax":
        nodes.append(helper.make_node("Softmax", ["s"], ["y"], axis=-1))
    elif tail == "logsoftmax":
        nodes.append(helper.make_node("LogSoftmax", ["s"], ["y"], axis=2))
    elif tail == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["s"], ["y"]))
    elif tail == "softmax_transpose":
        nodes.append(helper.make_node("Softmax", ["s"], ["p"], axis=-1))
        nodes.append(helper.make_node("Transpose", ["p"], ["y"], perm=[1, 0, 2]))
        out_shape = [steps, "N", classes]
    elif tail == "softmax_axis1_transpose":
        nodes.append(helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1]))  # N, C, T
        nodes.append(helper.make_node("Softmax", ["t"], ["p"], axis=1))
        nodes.append(helper.make_node("Identity", ["p"], ["q"]))
        nodes.append(helper.make_node("Transpose", ["q"], ["y"], perm=[2, 0, 1]))  # T, N, C
        out_shape = [steps, "N", classes]
    elif tail == "softmax_reshape":
        nodes.append(helper.make_node("Softmax", ["s"], ["p"], axis=-1))
        nodes.append(helper.make_node("Reshape", ["p", "shape"], ["y"]))
        inits.append(init("shape", np.array([0, -1], dtype=np.int64)))
        out_shape = ["N", steps * classes]
    elif tail == "normalize":
        nodes.append(helper.make_node("ReduceL2", ["s", "axes"], ["n"], keepdims=1))
        nodes.append(helper.make_node("Div", ["s", "n"], ["y"]))
        inits.append(init("axes", np.array([-1], dtype=np.int64)))
    elif tail == "none":
        nodes.append(helper.make_node("Identity", ["s"], ["y"]))
    else:
        raise ValueError(tail)
    graph = helper.make_graph(
        nodes,
        f"head_{tail}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return _model(graph, opset=18)
