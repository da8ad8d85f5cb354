"""Multiply-accumulates per weight per sample (the ``flops`` budget), counted by hand for
Conv (grouped, strided, padded, dilated, 1-D/3-D), ConvTranspose, Gemm and MatMul."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rdprune_onnx import macs
from rdprune_onnx.graph.layers import find_layers
from tests import graphs

F32 = TensorProto.FLOAT


def _model(
    nodes: list[onnx.NodeProto],
    x: list[int | str],
    weights: dict[str, np.ndarray],
    out: str,
    extra: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """``nodes`` reading input ``x`` and the given constants; ``out`` feeds an Identity so
    that its shape comes from inference (a graph output's declared shape would not)."""
    inits = [graphs.init(n, a) for n, a in {**weights, **(extra or {})}.items()]
    graph = helper.make_graph(
        [*nodes, helper.make_node("Identity", [out], ["y"])],
        "macs",
        [helper.make_tensor_value_info("x", F32, x)],
        [helper.make_tensor_value_info("y", F32, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    model.ir_version = 8
    return model


def _w(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _conv(
    x: list[int | str], w: tuple[int, ...], op: str = "Conv", **attrs: Any
) -> onnx.ModelProto:
    node = helper.make_node(op, ["x", "w"], ["c"], name="layer", **attrs)
    return _model([node], x, {"w": _w(*w)}, "c")


def _macs(model: onnx.ModelProto, sample_shape: tuple[int, ...]) -> dict[str, int]:
    sample = {"x": np.ones(sample_shape, np.float32)}
    return macs.macs_per_weight(model, find_layers(model).layers, sample)


# Each weight of a Conv is used once per output position (of its own output channel): the
# output's spatial size; padded taps count, as in every MAC count of a padded Conv.
CONVS: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[int, ...] | None, int]] = {
    # 8x8 input, 3x3 kernel, no padding: 6x6 outputs
    "plain": (lambda: _conv(["N", 3, 8, 8], (4, 3, 3, 3)), (1, 3, 8, 8), 36),
    # 9x9, stride 2, pads 1: floor((9 + 2 - 3) / 2) + 1 = 5 -> 5x5
    "strided-padded": (
        lambda: _conv(["N", 3, 9, 9], (4, 3, 3, 3), strides=[2, 2], pads=[1] * 4),
        None,
        25,
    ),
    # 4 -> 6 channels in 2 groups: each weight still meets every output position once
    # (total 6 * 25 * (2 * 3 * 3) = 2700 MACs over 108 weights = 25)
    "grouped": (
        lambda: _conv(["N", 4, 9, 9], (6, 2, 3, 3), group=2, strides=[2, 2], pads=[1] * 4),
        None,
        25,
    ),
    # depthwise, dilation 2 (a 5x5 reach), pads top 0 / left 1 / bottom 2 / right 0:
    # H = 10 + 0 + 2 - 5 + 1 = 8, W = 10 + 1 + 0 - 5 + 1 = 7
    "depthwise-dilated": (
        lambda: _conv(["N", 4, 10, 10], (4, 1, 3, 3), group=4, dilations=[2, 2], pads=[0, 1, 2, 0]),
        None,
        56,
    ),
    # SAME_UPPER, stride 2 on 9x9: ceil(9 / 2) = 5 -> 5x5
    "same-upper": (
        lambda: _conv(["N", 2, 9, 9], (2, 2, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
        None,
        25,
    ),
    # 1-D: length 20, kernel 5, stride 3: floor(15 / 3) + 1 = 6
    "1d": (lambda: _conv(["N", 2, 20], (3, 2, 5), strides=[3]), None, 6),
    # 3-D: 4x6x6, kernel 2x3x3: 3x4x4 = 48
    "3d": (lambda: _conv(["N", 1, 4, 6, 6], (2, 1, 2, 3, 3)), None, 48),
    # dynamic height and width, fixed by the sample: 10x10 -> 8x8
    "dynamic": (lambda: _conv(["N", 3, "H", "W"], (4, 3, 3, 3)), (1, 3, 10, 10), 64),
    # ConvTranspose: each weight once per INPUT position, whatever the stride: 5x5
    "transpose": (
        lambda: _conv(["N", 4, 5, 5], (4, 2, 3, 3), op="ConvTranspose", strides=[2, 2]),
        None,
        25,
    ),
    "transpose-grouped": (
        lambda: _conv(["N", 4, 5, 5], (4, 1, 3, 3), op="ConvTranspose", group=2, pads=[1] * 4),
        None,
        25,
    ),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_macs_by_hand(case: str) -> None:
    build, sample_shape, want = CONVS[case]
    model = build()
    before = model.SerializeToString()
    if sample_shape is None:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        sample_shape = (1, *[d.dim_value for d in dims[1:]])
    assert _macs(model, sample_shape) == {"w": want}
    assert model.SerializeToString() == before  # shapes are fixed on a copy


def _matmul(x: list[int | str], w: tuple[int, ...], left: bool = False) -> onnx.ModelProto:
    inputs = ["w", "x"] if left else ["x", "w"]
    return _model([helper.make_node("MatMul", inputs, ["m"], name="mm")], x, {"w": _w(*w)}, "m")


# A MatMul's weight (K, M) is used once per row of the activation (every leading axis);
# on the left, (M, K) @ x, once per column of x.
MATMULS: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[int, ...], int]] = {
    "2d": (lambda: _matmul(["N", 12], (12, 8)), (1, 12), 1),
    "3d": (lambda: _matmul(["N", 7, 12], (12, 8)), (1, 7, 12), 7),
    "4d": (lambda: _matmul(["N", 2, 3, 12], (12, 8)), (1, 2, 3, 12), 6),
    "left": (lambda: _matmul(["N", 12, 5], (8, 12), left=True), (1, 12, 5), 5),
    "dynamic-sequence": (lambda: _matmul(["N", "T", 12], (12, 8)), (1, 9, 12), 9),
}


@pytest.mark.parametrize("case", sorted(MATMULS))
def test_matmul_macs_by_hand(case: str) -> None:
    build, sample_shape, want = MATMULS[case]
    model = build()
    assert _macs(model, sample_shape) == {"w": want}


def test_gemm_macs_by_hand() -> None:
    """Gemm (M, K) x (K, N): the weight as B is used once per row of A (M); as A, once per
    column of B. Three rows per sample come from reshaping (N, 3, 12) to (3N, 12)."""
    shape = {"s": np.array([-1, 12], np.int64)}
    rows = [helper.make_node("Reshape", ["x", "s"], ["a"])]
    gemm = [*rows, helper.make_node("Gemm", ["a", "w"], ["g"], name="fc", transB=1)]
    model = _model(gemm, ["N", 3, 12], {"w": _w(8, 12)}, "g", shape)
    assert _macs(model, (1, 3, 12)) == {"w": 3}
    # transA: A stored (K, M) = (12, 3N)
    trans_a = [
        *rows,
        helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
        helper.make_node("Gemm", ["at", "w"], ["g"], name="fc", transA=1),
    ]
    model = _model(trans_a, ["N", 3, 12], {"w": _w(12, 8)}, "g", shape)
    assert _macs(model, (1, 3, 12)) == {"w": 3}
    # the weight as A: (8, 12) x B with B = a^T (12, 3N): once per column of B
    left = [
        *rows,
        helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0]),
        helper.make_node("Gemm", ["w", "b"], ["g"], name="fc"),
    ]
    model = _model(left, ["N", 3, 12], {"w": _w(8, 12)}, "g", shape)
    assert _macs(model, (1, 3, 12)) == {"w": 3}
    # ... and with transB: B stored (3N, 12)
    left_t = [*rows, helper.make_node("Gemm", ["w", "a"], ["g"], name="fc", transB=1)]
    model = _model(left_t, ["N", 3, 12], {"w": _w(8, 12)}, "g", shape)
    assert _macs(model, (1, 3, 12)) == {"w": 3}


def test_a_shared_weight_counts_every_use() -> None:
    """The same (12, 8) weight after a (7, 12) and a (3, 12) activation: 7 + 3."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m1"], name="mm1"),
        helper.make_node("Slice", ["x", "z", "three", "one"], ["x3"]),
        helper.make_node("MatMul", ["x3", "w"], ["m2"], name="mm2"),
        helper.make_node("Concat", ["m1", "m2"], ["m"], axis=1),
    ]
    extra = {
        "z": np.array([0], np.int64),
        "three": np.array([3], np.int64),
        "one": np.array([1], np.int64),
    }
    model = _model(nodes, ["N", 7, 12], {"w": _w(12, 8)}, "m", extra)
    assert _macs(model, (1, 7, 12)) == {"w": 10}


def test_shapes_known_only_at_run_time_are_measured() -> None:
    """Rows repeated by a count read from the data (Tile by max(x)): inference cannot tell
    the MatMul's rows; one run on the sample does (max 3 -> 3 rows)."""
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
        helper.make_node("Cast", ["mx"], ["r"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["r", "axis0"], ["r1"]),
        helper.make_node("Concat", ["r1", "one"], ["reps"], axis=0),
        helper.make_node("Tile", ["x", "reps"], ["t"]),
        helper.make_node("MatMul", ["t", "w"], ["m"], name="mm"),
    ]
    extra = {"axis0": np.array([0], np.int64), "one": np.array([1], np.int64)}
    model = _model(nodes, ["N", 12], {"w": _w(12, 8)}, "m", extra)
    sample = np.ones((1, 12), np.float32)
    sample[0, 4] = 3.0
    layers = find_layers(model).layers
    assert macs.macs_per_weight(model, layers, {"x": sample}) == {"w": 3}


def test_whole_models() -> None:
    cnn = _macs(graphs.cnn(), (1, 3, 8, 8))
    assert cnn == {"w1": 64, "w2": 36, "w3": 1, "w4": 1}  # 8x8 (padded), 6x6, one row each
    forms = macs.macs_per_weight(
        graphs.mlp_forms(),
        find_layers(graphs.mlp_forms()).layers,
        {"x": np.ones((1, 4), np.float32), "cond": np.array(True)},
    )
    assert forms["w_shared"] == 2  # two MatMuls, one row each
    assert forms["w_if"] == 1  # inside a branch: one pass
    attention = _macs(graphs.attention(), (1, 6, 8))
    assert attention == {"wq": 6, "wk": 6, "wv": 6, "wo": 6}  # six tokens
