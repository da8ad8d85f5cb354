"""Compact storage: checker, bitwise-identical outputs, folding at load, size, round trip."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx.compact import (
    STORAGES,
    compact_weights,
    compacted_weights,
    densify,
    weight_storage_bytes,
)
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask, prune_count
from tests import graphs

RATIOS = (0.0, 0.5, 0.95, 1.0)


def _cnn_feeds(dtype: type) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(dtype)}


CASES: dict[str, tuple[Callable[[], onnx.ModelProto], list[dict[str, np.ndarray]]]] = {
    "cnn_f32": (graphs.cnn, [_cnn_feeds(np.float32)]),
    "cnn_f16": (lambda: graphs.cnn(dtype=np.float16), [_cnn_feeds(np.float16)]),
    "mlp_forms": (
        graphs.mlp_forms,
        [
            {
                "x": np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32),
                "cond": np.array(flag),
            }
            for flag in (True, False)
        ],
    ),
    "conv_transpose": (
        graphs.conv_transpose,
        [{"x": np.random.default_rng(3).standard_normal((2, 4, 5, 5)).astype(np.float32)}],
    ),
}


def dense_zeros(model: onnx.ModelProto, ratio: float) -> tuple[onnx.ModelProto, list[str]]:
    scan = find_layers(model)
    weights = {
        layer.name: apply_mask(read_weight(model, layer.name), prune_count(ratio, layer.size))
        for layer in scan.layers
    }
    return replace_weights(model, weights), [layer.name for layer in scan.layers]


def session(
    model: onnx.ModelProto,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    optimized: Path | None = None,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def assert_same_outputs(
    a: onnx.ModelProto, b: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]
) -> None:
    sa, sb = session(a), session(b)
    for feed in feeds:
        for x, y in zip(sa.run(None, feed), sb.run(None, feed), strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert bits(x) == bits(y)


def rebuild_nodes(graph: onnx.GraphProto) -> list[str]:
    return [n.name for n in graph.node if "::compact/" in n.name]


def test_storages() -> None:
    assert STORAGES == ("dense", "compact")


@pytest.mark.parametrize("encoding", ["bitmask", "delta"])
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("case", list(CASES))
def test_compact_is_valid_and_identical(
    case: str, ratio: float, encoding: str, tmp_path: Path
) -> None:
    make, feeds = CASES[case]
    zeros, names = dense_zeros(make(), ratio)
    compact = compact_weights(zeros, names, min_size=0, force=True, encoding=encoding)

    onnx.checker.check_model(compact, full_check=True)
    done = compacted_weights(compact)
    main = {t.name for t in zeros.graph.initializer}
    assert set(done) == {n for n in names if n in main}
    assert set(done.values()) == ({"zeros"} if ratio == 1.0 else {encoding})
    assert not ({t.name for t in compact.graph.initializer} & set(done))
    assert_same_outputs(zeros, compact, feeds)

    # ONNX Runtime folds every rebuild at load: the optimised graph keeps none of the
    # rebuild nodes, and no node computes a weight. (Identical all-zero weights may be
    # merged into one initializer by ORT's common subexpression elimination.)
    optimized = tmp_path / "optimized.onnx"
    session(compact, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, optimized)
    folded = onnx.load(str(optimized))
    assert rebuild_nodes(folded.graph) == []
    assert not {o for n in folded.graph.node for o in n.output} & set(done)
    if ratio < 1.0:
        assert set(done) <= {t.name for t in folded.graph.initializer}


@pytest.mark.parametrize("case", list(CASES))
def test_densify_round_trip(case: str) -> None:
    make, _ = CASES[case]
    for ratio in RATIOS:
        zeros, names = dense_zeros(make(), ratio)
        for encoding in (None, "bitmask", "delta"):
            compact = compact_weights(zeros, names, min_size=0, force=True, encoding=encoding)
            back = densify(compact)
            assert compacted_weights(back) == {}
            assert rebuild_nodes(back.graph) == []
            assert [n.SerializeToString() for n in back.graph.node] == [
                n.SerializeToString() for n in zeros.graph.node
            ]
            assert sorted(t.name for t in back.graph.initializer) == sorted(
                t.name for t in zeros.graph.initializer
            )
            for name in names:
                rebuilt = read_weight(back, name)
                expected = read_weight(zeros, name)
                assert rebuilt.dtype == expected.dtype and rebuilt.shape == expected.shape
                assert bits(rebuilt) == bits(expected)
            onnx.checker.check_model(back, full_check=True)


def test_densify_leaves_a_plain_model_alone() -> None:
    model = graphs.cnn()
    assert densify(model).SerializeToString() == model.SerializeToString()


def test_mlp_forms_storage_forms() -> None:
    zeros, names = dense_zeros(graphs.mlp_forms(), 0.5)
    compact = compact_weights(zeros, names, min_size=0, force=True)
    done = compacted_weights(compact)
    # main-graph initializers, including the shared one and the one an If branch reads
    assert {"w_left", "w_shared", "w_gemm", "w_if"} <= set(done)
    # the Constant-node weight stays a Constant node; the quantized weight is untouched
    assert "w_const" not in done
    assert any(n.op_type == "Constant" and n.output[0] == "w_const" for n in compact.graph.node)
    assert "w_q" in {t.name for t in compact.graph.initializer}
    # every original node is unchanged (consumers read the weights under their names)
    originals = [n.SerializeToString() for n in zeros.graph.node]
    kept = [n.SerializeToString() for n in compact.graph.node if "::compact/" not in n.name]
    assert kept == originals


def test_shrinks_with_sparsity() -> None:
    model = graphs.cnn()  # w3 is 16 x 288 = 4608 weights
    dense_bytes = read_weight(model, "w3").nbytes
    sizes = []
    for ratio in (0.5, 0.8, 0.9, 0.95):
        zeros, names = dense_zeros(model, ratio)
        compact = compact_weights(zeros, names)
        assert "w3" in compacted_weights(compact)
        stored = weight_storage_bytes(compact, ["w3"])["w3"]
        graph_cost = sum(n.ByteSize() for n in compact.graph.node if "w3::" in n.name)
        sizes.append(stored)
        assert compact.ByteSize() < zeros.ByteSize()
        if ratio == 0.9:
            assert stored + graph_cost < dense_bytes / 3
    assert sizes == sorted(sizes, reverse=True)


def test_input_is_not_mutated() -> None:
    zeros, names = dense_zeros(graphs.mlp_forms(), 0.95)
    before = zeros.SerializeToString()
    compact = compact_weights(zeros, names, min_size=0, force=True)
    assert zeros.SerializeToString() == before
    before = compact.SerializeToString()
    densify(compact)
    assert compact.SerializeToString() == before


def test_min_size_and_size_rule_keep_weights_dense() -> None:
    zeros, names = dense_zeros(graphs.cnn(), 0.95)
    # only w3 (4608) reaches the default min_size of 1024
    assert set(compacted_weights(compact_weights(zeros, names))) == {"w3"}
    assert compacted_weights(compact_weights(zeros, names, min_size=10**6)) == {}
    # a weight whose compact form is larger (no zeros) stays dense unless forced
    dense, _ = dense_zeros(graphs.cnn(), 0.0)
    assert compacted_weights(compact_weights(dense, names, min_size=0)) == {}
    assert set(compacted_weights(compact_weights(dense, names, min_size=0, force=True))) == set(
        names
    )


def _single_matmul(weight: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "one",
        [helper.make_tensor_value_info("x", elem, ["N", weight.shape[0]])],
        [helper.make_tensor_value_info("y", elem, ["N", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def test_long_gaps_negative_zero_and_nan_are_exact() -> None:
    weight = np.zeros((64, 128), np.float32)
    flat = weight.reshape(-1)
    # gaps of 255, 256 (one more than a uint8 delta holds) and thousands
    flat[[0, 255, 256, 512, 700, 956, 5000, 8191]] = [1.5, -0.0, 2.0, 5.0, np.nan, 6.0, -3.0, 4.0]
    model = _single_matmul(weight)
    feeds = [{"x": np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)}]
    for encoding in (None, "bitmask", "delta"):
        compact = compact_weights(model, ["w"], encoding=encoding)
        assert "w" in compacted_weights(compact)
        onnx.checker.check_model(compact, full_check=True)
        assert bits(read_weight(densify(compact), "w")) == bits(weight)
        assert_same_outputs(model, compact, feeds)
    auto = compact_weights(model, ["w"])
    assert compacted_weights(auto) == {"w": "delta"}
    # ScatterND needs distinct positions: every gap after the first is at least 1
    deltas = read_weight(auto, "w::compact/deltas")
    assert deltas.dtype == np.uint8 and deltas[0] == 0 and np.all(deltas[1:] >= 1)
    assert int(deltas.astype(np.int64).sum()) == 8191


@pytest.mark.parametrize("opset", [11, 13, 21])
def test_opsets(opset: int) -> None:
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((48, 64)).astype(np.float16)
    weight[rng.random(weight.shape) < 0.7] = 0
    model = _single_matmul(weight, opset)
    feeds = [{"x": rng.standard_normal((2, 48)).astype(np.float16)}]
    for encoding in ("bitmask", "delta"):
        compact = compact_weights(model, ["w"], encoding=encoding)
        assert compacted_weights(compact) == {"w": encoding}
        assert compact.opset_import[0].version == opset
        onnx.checker.check_model(compact, full_check=True)
        assert_same_outputs(model, compact, feeds)


def test_low_opset_or_ir_left_dense(caplog: pytest.LogCaptureFixture) -> None:
    weight = np.zeros((48, 64), np.float32)
    weight[0, :3] = 1.0
    with caplog.at_level(logging.WARNING, logger="rdprune_onnx.compact"):
        old = compact_weights(_single_matmul(weight, 10), ["w"])
    assert compacted_weights(old) == {}
    assert "opset" in caplog.text
    model = _single_matmul(weight)
    model.ir_version = 3
    assert compacted_weights(compact_weights(model, ["w"])) == {}


def test_overridable_initializer_left_dense() -> None:
    weight = np.zeros((48, 64), np.float32)
    model = _single_matmul(weight)
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [48, 64]))
    assert compacted_weights(compact_weights(model, ["w"])) == {}


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="nope"):
        compact_weights(graphs.cnn(), ["nope"])


def test_compacting_twice_keeps_both() -> None:
    zeros, _ = dense_zeros(graphs.cnn(), 0.9)
    once = compact_weights(zeros, ["w1"], min_size=0, force=True)
    twice = compact_weights(once, ["w1", "w3"], min_size=0, force=True)
    assert set(compacted_weights(twice)) == {"w1", "w3"}
    onnx.checker.check_model(twice, full_check=True)
    assert_same_outputs(zeros, twice, [_cnn_feeds(np.float32)])
    assert bits(read_weight(densify(twice), "w1")) == bits(read_weight(zeros, "w1"))
