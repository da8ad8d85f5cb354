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
