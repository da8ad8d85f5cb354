"""Tiny ONNX graphs built in code, one per layer kind and storage form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Save ``model`` with every tensor in one external data file (``location``, by default
    ``<name>.data`` beside it); the caller's model is left as it was."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model turns the tensors it writes into references
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location or path.name + ".data",
        size_threshold=0,
    )
    return path


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def cnn(seed: int = 0, dtype: type = np.float32) -> onnx.ModelProto:
    """Conv -> Relu -> Conv (grouped) -> Relu -> Flatten -> Gemm(transB) -> MatMul."""
    rng = _rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(dtype) * 0.3
    w2 = rng.standard_normal((8, 2, 3, 3)).astype(dtype) * 0.3  # group=4
    w3 = rng.standard_normal((16, 8 * 6 * 6)).astype(dtype) * 0.05  # transB
    w4 = rng.standard_normal((16, 10)).astype(dtype) * 0.2
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=4),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], name="fc1", transB=1),
        helper.make_node("Relu", ["g"], ["r3"]),
        helper.make_node("MatMul", ["r3", "w4"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", elem, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", elem, ["N", 10])],
        [
            init("w1", w1),
            init("b1", np.zeros(8, dtype)),
            init("w2", w2),
            init("w3", w3),
            init("b3", np.zeros(16, dtype)),
            init("w4", w4),
        ],
    )
    return _model(graph)


def mlp_forms(seed: int = 0) -> onnx.ModelProto:
    """Every weight storage form: MatMul with the constant on the left, a Constant-node
    weight, an initializer shared by two MatMuls, Gemm with alpha/beta and transA, a
    weight used inside an If branch, an activation x activation MatMul, and a QDQ weight."""
    rng = _rng(seed)
    f32 = TensorProto.FLOAT
    w_left = rng.standard_normal((6, 4)).astype(np.float32)
    w_const = rng.standard_normal((5, 5)).astype(np.float32)
    w_shared = rng.standard_normal((5, 5)).astype(np.float32)
    w_gemm = rng.standard_normal((5, 5)).astype(np.float32)
    w_if = rng.standard_normal((5, 5)).astype(np.float32)
    w_q = rng.integers(-100, 100, (5, 5)).astype(np.int8)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h4", "w_if"], ["t_out"], name="if_matmul")],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", f32, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["h4"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", f32, None)],
    )
    nodes = [
        # (x^T) is 4xN... keep it simple: y0 = w_left @ xT with xT: [4, N]
        helper.make_node("Transpose", ["x"], ["xT"], perm=[1, 0]),
        helper.make_node("MatMul", ["w_left", "xT"], ["h0T"], name="left_matmul"),
        helper.make_node("Transpose", ["h0T"], ["h0"], perm=[1, 0]),  # [N, 6]
        helper.make_node("Slice", ["h0", "s0", "s1", "s_ax"], ["h0s"]),  # [N, 5]
        helper.make_node("Constant", [], ["w_const"], value=init("w_const_value", w_const)),
        helper.make_node("MatMul", ["h0s", "w_const"], ["h1"], name="const_matmul"),
        helper.make_node("MatMul", ["h1", "w_shared"], ["h2"], name="shared_a"),
        helper.make_node("Tanh", ["h2"], ["h2t"]),
        helper.make_node("MatMul", ["h2t", "w_shared"], ["h3"], name="shared_b"),
        helper.make_node(
            "Gemm", ["h3", "w_gemm", "c_gemm"], ["h4"], name="gemm_ab", alpha=0.5, beta=2.0
        ),
        helper.make_node(
            "If", ["cond"], ["h5"], name="branch", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("MatMul", ["h5", "h5T"], ["gram"], name="act_matmul"),
        helper.make_node("Transpose", ["h5"], ["h5T"], perm=[1, 0]),
        helper.make_node("DequantizeLinear", ["w_q", "q_scale"], ["w_dq"]),
        helper.make_node("MatMul", ["h5", "w_dq"], ["y"], name="qdq_matmul"),
    ]
    # The Transpose producing h5T must come before act_matmul in topological order.
    nodes[11], nodes[12] = nodes[12], nodes[11]
    graph = helper.make_graph(
        nodes,
        "forms",
        [
            helper.make_tensor_value_info("x", f32, ["N", 4]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("y", f32, ["N", 5]),
            helper.make_tensor_value_info("gram", f32, ["N", "N"]),
        ],
        [
            init("w_left", w_left),
            init("s0", np.array([0], np.int64)),
            init("s1", np.array([5], np.int64)),
            init("s_ax", np.array([1], np.int64)),
            init("w_shared", w_shared),
            init("w_gemm", w_gemm),
            init("c_gemm", np.ones(5, np.float32)),
            init("w_if", w_if),
            init("w_q", w_q),
            init("q_scale", np.array(0.01, np.float32)),
        ],
    )
    return _model(graph)


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """A Loop whose body applies an outer-scope weight three times."""
    rng = _rng(seed)
    f32 = TensorProto.FLOAT
    w = (rng.standard_normal((4, 4)) * 0.5).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w_loop"], ["h_mm"], name="loop_matmul"),
            helper.make_node("Tanh", ["h_mm"], ["h_out"]),
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
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)],
        "loop",
        [helper.make_tensor_value_info("x", f32, ["N", 4])],
        [helper.make_tensor_value_info("y", f32, ["N", 4])],
        [init("w_loop", w), init("trip", np.array(3, np.int64))],
    )
    return _model(graph)


def conv_transpose(seed: int = 0) -> onnx.ModelProto:
    rng = _rng(seed)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "w_ct"], ["y"], name="deconv", strides=[2, 2])],
        "ct",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 11, 11])],
        [init("w_ct", w)],
    )
    return _model(graph)


def residual(seed: int = 0) -> onnx.ModelProto:
    """Two branches and a skip connection that reuses the input after the first layer."""
    rng = _rng(seed)
    f32 = TensorProto.FLOAT
    wa = (rng.standard_normal((8, 8)) * 0.4).astype(np.float32)
    wb = (rng.standard_normal((8, 8)) * 0.4).astype(np.float32)
    wc = (rng.standard_normal((8, 8)) * 0.4).astype(np.float32)
    wd = (rng.standard_normal((8, 3)) * 0.4).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("MatMul", ["ar", "wb"], ["b"], name="mm_b"),  # branch 1
        helper.make_node("MatMul", ["ar", "wc"], ["c"], name="mm_c"),  # branch 2
        helper.make_node("Tanh", ["c"], ["ct"]),
        helper.make_node("Add", ["b", "ct"], ["bc"]),
        helper.make_node("Add", ["bc", "x"], ["skip"]),  # the input again
        helper.make_node("MatMul", ["skip", "wd"], ["y"], name="mm_d"),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", f32, ["N", 8])],
        [
            helper.make_tensor_value_info("y", f32, ["N", 3]),
            helper.make_tensor_value_info("ar", f32, ["N", 8]),  # an early second output
        ],
        [init("wa", wa), init("wb", wb), init("wc", wc), init("wd", wd)],
    )
    return _model(graph)


def attention(seed: int = 0, hidden: int = 8, heads: int = 2) -> onnx.ModelProto:
    """One self-attention block as exporters write it: Q/K/V projections, shape arithmetic
    (Shape, Gather, Concat, Reshape), Softmax over activation x activation MatMuls, an
    output projection and a residual LayerNorm."""
    rng = _rng(seed)
    f32 = TensorProto.FLOAT
    d = hidden // heads

    def w(name: str) -> onnx.TensorProto:
        return init(name, (rng.standard_normal((hidden, hidden)) * 0.3).astype(np.float32))

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i0"], ["batch"], axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["seq"], axis=0),
        helper.make_node("Concat", ["batch", "seq", "heads", "dhead"], ["split_shape"], axis=0),
        helper.make_node("Concat", ["batch", "seq", "hid"], ["merge_shape"], axis=0),
    ]
    for p in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"proj_{p}"),
            helper.make_node("Reshape", [f"{p}0", "split_shape"], [f"{p}1"]),
            helper.make_node(
                "Transpose", [f"{p}1"], [f"{p}2"], perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]
            ),
        ]
    nodes += [
        helper.make_node("MatMul", ["q2", "k2"], ["scores"], name="qk"),
        helper.make_node("Div", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v2"], ["ctx"], name="pv"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"]),
        helper.make_node("MatMul", ["merged", "wo"], ["attn"], name="proj_o"),
        helper.make_node("Add", ["attn", "x"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", f32, ["N", "T", hidden])],
        [helper.make_tensor_value_info("y", f32, ["N", "T", hidden])],
        [
            w("wq"),
            w("wk"),
            w("wv"),
            w("wo"),
            init("i0", np.array([0], np.int64)),
            init("i1", np.array([1], np.int64)),
            init("heads", np.array([heads], np.int64)),
            init("dhead", np.array([d], np.int64)),
            init("hid", np.array([hidden], np.int64)),
            init("scale", np.array(np.sqrt(d), np.float32)),
            init("gamma", np.ones(hidden, np.float32)),
            init("beta", np.zeros(hidden, np.float32)),
        ],
    )
    return _model(graph)
