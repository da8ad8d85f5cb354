"""Small ONNX graphs for the weight-reconstruction tests (layer forms tests/graphs.py lacks),
and the cases the reconstruct, refit-curve and SparseGPT-selection tests share: each graph
with calibration data and the tensor each layer's error is measured on."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from rdprune_onnx.curves import infer_types
from rdprune_onnx.graph.cut import with_outputs
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask, prune_count
from rdprune_onnx.runtime import Session
from tests import graphs
from tests.graphs import _model, init


def conv(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
    auto_pad: str | None = None,
    group: int = 1,
    bias: bool = False,
    seed: int = 0,
) -> tuple[onnx.ModelProto, np.ndarray]:
    """One Conv node ``y = Conv(x, w[, b])``; returns the model and its weight."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(tuple(w_shape)).astype(np.float32)
    attrs: dict[str, Any] = {"group": group}
    if strides is not None:
        attrs["strides"] = list(strides)
    if dilations is not None:
        attrs["dilations"] = list(dilations)
    if pads is not None:
        attrs["pads"] = list(pads)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    inputs = ["x", "w"]
    inits = [init("w", w)]
    y_shape: list[str | int] = ["N", w_shape[0], *(f"s{i}" for i in range(len(x_shape) - 2))]
    if bias:
        inputs.append("b")
        inits.append(init("b", rng.standard_normal(w_shape[0]).astype(np.float32)))
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    return _model(graph), w


def conv_stack(seed: int = 0) -> onnx.ModelProto:
    """Conv(stride 2, SAME_UPPER, group 2, bias) -> Relu -> Conv (2x3 kernel, dilation
    (1, 2), asymmetric pads, bias) -> Relu -> GlobalAveragePool."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 2, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((6, 8, 2, 3)) * 0.2).astype(np.float32)
    b2 = (rng.standard_normal(6) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w1", "b1"],
            ["c1"],
            name="conv_a",
            strides=[2, 2],
            auto_pad="SAME_UPPER",
            group=2,
        ),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "Conv", ["r1", "w2", "b2"], ["c2"], name="conv_b", pads=[0, 1, 1, 0], dilations=[1, 2]
        ),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6, 1, 1])],
        [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", b2)],
    )
    return _model(graph)


def gemm_bias(seed: int = 0) -> onnx.ModelProto:
    """Gemm(transB=1, alpha=0.5, beta=2, C of shape (10,)) -> Tanh -> MatMul -> Add(bias)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((10, 12)) * 0.4).astype(np.float32)
    c1 = (rng.standard_normal(10) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((10, 6)) * 0.4).astype(np.float32)
    b2 = (rng.standard_normal(6) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node(
            "Gemm", ["x", "w1", "c1"], ["g"], name="gemm", transB=1, alpha=0.5, beta=2.0
        ),
        helper.make_node("Tanh", ["g"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["mm"], name="matmul"),
        helper.make_node("Add", ["b2", "mm"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [init("w1", w1), init("c1", c1), init("w2", w2), init("b2", b2)],
    )
    return _model(graph)


def matmul_fp16(seed: int = 0) -> onnx.ModelProto:
    """float16 MatMul -> Relu -> MatMul on 3-D activations."""
    rng = np.random.default_rng(seed)
    f16 = TensorProto.FLOAT16
    w1 = (rng.standard_normal((8, 12)) * 0.4).astype(np.float16)
    w2 = (rng.standard_normal((12, 5)) * 0.4).astype(np.float16)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "fp16",
        [helper.make_tensor_value_info("x", f16, ["N", "T", 8])],
        [helper.make_tensor_value_info("y", f16, ["N", "T", 5])],
        [init("w1", w1), init("w2", w2)],
    )
    return _model(graph)


def linear(d: int, r: int, seed: int = 0) -> onnx.ModelProto:
    """One ``x @ W + b`` layer with a ``d`` x ``r`` weight."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d, r)) / np.sqrt(d)).astype(np.float32)
    b = (rng.standard_normal(r) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", r])],
        [init("w", w), init("b", b)],
    )
    return _model(graph)


def token_mlp(
    d: int = 6, h: int = 5, r: int = 4, seed: int = 0, mask: str = "attention_mask"
) -> onnx.ModelProto:
    """``x (N, T, d) @ W1 + b1 -> Relu -> @ W2`` with an int64 ``mask`` input (N, T) that
    the graph reads only for a second output (as a text encoder's pooling would)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32)
    b1 = (rng.standard_normal(h) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((h, r)) / np.sqrt(h)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["mm"], name="mm1"),
        helper.make_node("Add", ["mm", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["t"]),
        helper.make_node("MatMul", ["t", "w2"], ["y"], name="mm2"),
        helper.make_node("Cast", [mask], ["m"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "token_mlp",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d]),
            helper.make_tensor_value_info(mask, TensorProto.INT64, ["N", "T"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", r]),
            helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", "T"]),
        ],
        [init("w1", w1), init("b1", b1), init("w2", w2)],
    )
    return _model(graph)


# --------------------------------------------------------------------------------------
# Cases shared by test_reconstruct, test_refit_curves and test_sparsegpt_select

Data = dict[str, np.ndarray]


def normal(*shape: int, seed: int = 1, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _cnn() -> tuple[onnx.ModelProto, Data]:
    return graphs.cnn(), {"x": normal(128, 3, 8, 8)}


def _residual() -> tuple[onnx.ModelProto, Data]:
    return graphs.residual(), {"x": normal(96, 8)}


def _attention() -> tuple[onnx.ModelProto, Data]:
    return graphs.attention(), {"x": normal(24, 6, 8)}  # (batch, seq, hidden)


def _conv_stack() -> tuple[onnx.ModelProto, Data]:
    return conv_stack(), {"x": normal(48, 4, 9, 9)}


def _gemm_bias() -> tuple[onnx.ModelProto, Data]:
    return gemm_bias(), {"x": normal(96, 12)}


def _mlp_forms() -> tuple[onnx.ModelProto, Data]:
    return graphs.mlp_forms(), {"x": normal(64, 4), "cond": np.array(True)}


# For each graph: the tensor each layer's error is measured on (its node's output, or the
# Add after a MatMul whose bias is refit with it).
CASES: dict[str, tuple[Callable[[], tuple[onnx.ModelProto, Data]], dict[str, str]]] = {
    "cnn": (_cnn, {"w1": "c1", "w2": "c2", "w3": "g", "w4": "y"}),
    "residual": (_residual, {"wa": "a", "wb": "b", "wc": "c", "wd": "y"}),
    "attention": (_attention, {"wq": "q0", "wk": "k0", "wv": "v0", "wo": "attn"}),
    "conv_stack": (_conv_stack, {"w1": "c1", "w2": "c2"}),
    "gemm_bias": (_gemm_bias, {"w1": "g", "w2": "y"}),
    "mlp_forms": (_mlp_forms, {"w_left": "h0T", "w_const": "h1", "w_gemm": "h4"}),
}


def masked_weight(weight: np.ndarray, ratio: float) -> np.ndarray:
    """``weight`` with the fraction ``ratio`` of its smallest magnitudes zeroed."""
    return apply_mask(weight, prune_count(ratio, weight.size))


def masked_layers(model: onnx.ModelProto, ratio: float) -> dict[str, np.ndarray]:
    """Every layer of ``model`` masked by magnitude at ``ratio``."""
    return {
        layer.name: apply_mask(read_weight(model, layer.name), prune_count(ratio, layer.size))
        for layer in find_layers(model).layers
    }


def run(model: onnx.ModelProto, data: Data, names: list[str]) -> list[np.ndarray]:
    """The named tensors of ``model`` (any intermediate) on ``data``."""
    return Session(with_outputs(infer_types(model), names)).run(data, names)


def output_mse(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], data: Data) -> float:
    """MSE of the first output with ``weights`` swapped in, against the model as it is."""
    names = [o.name for o in model.graph.output][:1]
    dense = run(model, data, names)[0].astype(np.float64)
    other = run(replace_weights(model, weights), data, names)[0].astype(np.float64)
    return float(np.mean((dense - other) ** 2))
