"""Hand-built graphs for the corpus test that tests/graphs.py does not have yet.

Each builder returns a checked model with a batch axis ``N`` on every input. Together with
the builders of tests/graphs.py they cover: depthwise and grouped Conv, Conv1d and Conv3d,
grouped ConvTranspose, Gemm with transA/transB, alpha/beta and broadcast biases, float64
weights, a weight behind an Identity, a weight shared by the main graph and a Loop body,
several outputs with integer ones, every weight as a Constant node, and opset 11 and 21
variants of the CNN. The helpers at the end compare a model with its pruned copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx.graph.walk import iter_graphs
from tests.graphs import cnn, init

# The IR version each opset needs at least (ONNX's versioning table).
_IR_FOR_OPSET = {11: 6, 13: 7, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = _IR_FOR_OPSET[opset]
    onnx.checker.check_model(model, full_check=True)
    return model


def _weight(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.3) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def cnn_at_opset(opset: int) -> onnx.ModelProto:
    """tests/graphs.cnn (Conv, grouped Conv, Gemm transB, MatMul) declared at ``opset``."""
    model = cnn()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    model.ir_version = _IR_FOR_OPSET[opset]
    onnx.checker.check_model(model, full_check=True)
    return model


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every main-graph initializer turned into a Constant node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
        for t in graph.initializer
    ]
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    del graph.initializer[:]
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(out, full_check=True)
    return out


def depthwise_cnn(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv -> depthwise Conv (group = channels) -> grouped ConvTranspose -> Conv1x1 ->
    GlobalAveragePool -> Flatten -> Gemm(transB, alpha, beta, bias [1, n])."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["x", "w_in", "b_in"], ["c0"], name="conv_in", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w_dw"], ["c1"], name="depthwise", group=6, pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "ConvTranspose", ["r1", "w_ct"], ["c2"], name="deconv_g", group=2, strides=[2, 2]
        ),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w_pw"], ["c3"], name="pointwise"),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node(
            "Gemm", ["f", "w_fc", "b_fc"], ["y"], name="fc", transB=1, alpha=0.75, beta=1.5
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "depthwise",
        [helper.make_tensor_value_info("x", f32, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", f32, ["N", 5])],
        [
            init("w_in", _weight(rng, (6, 2, 3, 3))),
            init("b_in", _weight(rng, (6,))),
            init("w_dw", _weight(rng, (6, 1, 3, 3))),
            init("w_ct", _weight(rng, (6, 2, 2, 2))),  # group 2: 4 output channels
            init("w_pw", _weight(rng, (8, 4, 1, 1))),
            init("w_fc", _weight(rng, (5, 8))),
            init("b_fc", _weight(rng, (1, 5))),
        ],
    )
    return _model(graph, opset)


def gemm_variants(seed: int = 0) -> onnx.ModelProto:
    """Gemm with transB + alpha/beta + a scalar bias, Gemm with transA (the input
    transposed) and a [n] bias, Gemm with the constant as A, a weight behind an Identity."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node(
            "Gemm", ["x", "w_tb", "c_scalar"], ["h0"], name="gemm_tb", transB=1, alpha=2.0, beta=0.5
        ),
        helper.make_node("Tanh", ["h0"], ["h0t"]),
        helper.make_node("Transpose", ["h0t"], ["h0T"], perm=[1, 0]),  # [7, N]
        helper.make_node("Gemm", ["h0T", "w_ta", "c_vec"], ["h1"], name="gemm_ta", transA=1),
        helper.make_node("Tanh", ["h1"], ["h1t"]),  # [N, 6]
        helper.make_node("Transpose", ["h1t"], ["h1T"], perm=[1, 0]),  # [6, N]
        # The constant on the left: [4, 6] @ [6, N] -> [4, N].
        helper.make_node("Gemm", ["w_left", "h1T"], ["h2T"], name="gemm_left", alpha=0.5),
        helper.make_node("Transpose", ["h2T"], ["h2"], perm=[1, 0]),
        helper.make_node("Identity", ["w_id_src"], ["w_id"]),
        helper.make_node("MatMul", ["h2", "w_id"], ["y"], name="mm_identity"),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm_variants",
        [helper.make_tensor_value_info("x", f32, ["N", 5])],
        [helper.make_tensor_value_info("y", f32, ["N", 3])],
        [
            init("w_tb", _weight(rng, (7, 5))),
            init("c_scalar", np.array(0.25, np.float32)),
            init("w_ta", _weight(rng, (7, 6))),
            init("c_vec", _weight(rng, (6,))),
            init("w_left", _weight(rng, (4, 6))),
            init("w_id_src", _weight(rng, (4, 3))),
        ],
    )
    return _model(graph)


def conv_1d_3d(seed: int = 0) -> onnx.ModelProto:
    """Conv1d (rank-3 weight) on one input and Conv3d (rank-5 weight) on another."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["a", "w_1d"], ["ca"], name="conv1d", pads=[1, 1]),
        helper.make_node("Conv", ["v", "w_3d"], ["cv"], name="conv3d"),
        helper.make_node("Relu", ["ca"], ["ya"]),
        helper.make_node("Relu", ["cv"], ["yv"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_1d_3d",
        [
            helper.make_tensor_value_info("a", f32, ["N", 3, 8]),
            helper.make_tensor_value_info("v", f32, ["N", 2, 3, 3, 3]),
        ],
        [
            helper.make_tensor_value_info("ya", f32, ["N", 4, 8]),
            helper.make_tensor_value_info("yv", f32, ["N", 4, 2, 2, 2]),
        ],
        [init("w_1d", _weight(rng, (4, 3, 3))), init("w_3d", _weight(rng, (4, 2, 2, 2, 2)))],
    )
    return _model(graph)


def float64_mlp(seed: int = 0) -> onnx.ModelProto:
    """MatMul and Gemm with float64 weights, inputs and outputs."""
    rng = np.random.default_rng(seed)
    f64 = TensorProto.DOUBLE
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm64"),
        helper.make_node("Tanh", ["h"], ["ht"]),
        helper.make_node("Gemm", ["ht", "w1", "b1"], ["y"], name="gemm64"),
    ]
    graph = helper.make_graph(
        nodes,
        "float64",
        [helper.make_tensor_value_info("x", f64, ["N", 6])],
        [helper.make_tensor_value_info("y", f64, ["N", 4])],
        [
            init("w0", rng.standard_normal((6, 9))),
            init("w1", rng.standard_normal((9, 4))),
            init("b1", rng.standard_normal(4)),
        ],
    )
    return _model(graph)


def multi_output(seed: int = 0) -> onnx.ModelProto:
    """Float logits, their int64 ArgMax, int64 TopK indices and an int32 Cast: four outputs,
    three of them integers."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    i64 = TensorProto.INT64
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "w1"], ["logits"], name="gemm1", transB=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
        helper.make_node("TopK", ["logits", "k"], ["top_values", "top_index"], axis=1),
        helper.make_node("Cast", ["top_values"], ["top_int"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_output",
        [helper.make_tensor_value_info("x", f32, ["N", 5])],
        [
            helper.make_tensor_value_info("logits", f32, ["N", 6]),
            helper.make_tensor_value_info("label", i64, ["N"]),
            helper.make_tensor_value_info("top_index", i64, ["N", 2]),
            helper.make_tensor_value_info("top_int", TensorProto.INT32, ["N", 2]),
        ],
        [
            init("w0", _weight(rng, (5, 8))),
            init("w1", _weight(rng, (6, 8))),
            init("k", np.array([2], np.int64)),
        ],
    )
    return _model(graph)


def loop_shared(seed: int = 0) -> onnx.ModelProto:
    """One initializer used by a MatMul in the main graph and by a MatMul in a Loop body,
    and a second weight that lives as an initializer inside the body itself."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w_shared"], ["h_a"], name="body_shared"),
            helper.make_node("Tanh", ["h_a"], ["h_t"]),
            helper.make_node("MatMul", ["h_t", "w_body"], ["h_out"], name="body_own"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", f32, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", f32, None),
        ],
        [init("w_body", _weight(rng, (5, 5), 0.5))],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w_shared"], ["h0"], name="main_shared"),
        helper.make_node("Loop", ["trip", "", "h0"], ["y"], name="loop", body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "loop_shared",
        [helper.make_tensor_value_info("x", f32, ["N", 5])],
        [helper.make_tensor_value_info("y", f32, ["N", 5])],
        [init("w_shared", _weight(rng, (5, 5), 0.5)), init("trip", np.array(2, np.int64))],
    )
    return _model(graph)


# ----------------------------------------------------------------------------------------------
# Comparing a model with its pruned copy


def _slots(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every constant tensor (initializers and Constant values, all scopes) by its name."""
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            yield tensor.name, tensor
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        yield node.output[0], attr.t


def constant_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor of the model as an array, keyed by the name its users read."""
    return {name: numpy_helper.to_array(tensor) for name, tensor in _slots(model)}


def without_values(model: onnx.ModelProto, names: set[str]) -> bytes:
    """The serialised model with the values of the named tensors cleared (dims, type and
    name kept), so that two models can be compared byte for byte outside those values."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name, tensor in _slots(copy):
        if name in names:
            for data in ("raw_data", "float_data", "int32_data", "double_data", "int64_data"):
                tensor.ClearField(data)
    return bytes(copy.SerializeToString(deterministic=True))
