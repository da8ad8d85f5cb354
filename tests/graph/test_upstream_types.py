"""The upstream cut (graph.cut.upstream) and the graph's type facts (graph.types, graph.walk
labels): what the refit, the statistics and the MAC count build their models from."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from rdprune_onnx.graph.cut import upstream, with_outputs
from rdprune_onnx.graph.types import elem_bytes, infer_types, static_model, value_types
from rdprune_onnx.graph.walk import node_attributes, node_label
from rdprune_onnx.runtime import Session
from tests import graphs


def _x(rows: int = 5) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)}


def test_upstream_keeps_only_what_computes_the_names() -> None:
    typed = infer_types(graphs.residual())
    cut = upstream(typed, ["c", "a", "c"])  # repeated names: one output each
    assert [o.name for o in cut.graph.output] == ["c", "a"]
    assert [n.name for n in cut.graph.node] == ["mm_a", "", "mm_c"]  # mm_a, Relu, mm_c
    assert sorted(t.name for t in cut.graph.initializer) == ["wa", "wc"]
    assert [i.name for i in cut.graph.input] == ["x"]
    assert cut.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # inferred
    onnx.checker.check_model(cut)
    full = Session(with_outputs(typed, ["c", "a"])).run(_x(), ["c", "a"])
    got = Session(cut).run(_x(), ["c", "a"])
    for a, b in zip(got, full, strict=True):
        np.testing.assert_array_equal(a, b)


def test_upstream_drops_graph_inputs_it_does_not_need() -> None:
    model = graphs.residual()
    extra = helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1])
    model.graph.input.append(extra)
    cut = upstream(model, ["ar"])
    assert [i.name for i in cut.graph.input] == ["x"]


def test_upstream_output_types_given_or_left_to_the_runtime() -> None:
    model = graphs.residual()  # not shape-inferred: "c" has no type
    plain = upstream(model, ["c"])
    assert not plain.graph.output[0].type.HasField("tensor_type")
    np.testing.assert_array_equal(
        Session(plain).run(_x(), ["c"])[0],
        Session(with_outputs(infer_types(model), ["c"])).run(_x(), ["c"])[0],
    )
    rank2 = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", None])
    typed = upstream(model, ["c"], output_types={"c": rank2})
    assert typed.graph.output[0] == rank2


def test_static_model_fixes_the_input_shapes_of_one_sample() -> None:
    model = graphs.residual()
    fixed = static_model(model, {"x": (8,)})  # one sample's shape: batch axis becomes 1
    dims = [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 8]
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in fixed.graph.value_info
    }
    assert shapes["c"] == [1, 8] and shapes["skip"] == [1, 8]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # a copy


def test_value_types_and_element_sizes() -> None:
    typed = infer_types(graphs.residual())
    types = value_types(typed)
    assert {"x", "y", "ar", "a", "c", "skip"} <= set(types)
    assert types["ar"] is typed.graph.output[1]  # a graph output wins over value_info
    assert elem_bytes(types["x"]) == 4
    half = helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2])
    assert elem_bytes(half) == 2
    assert elem_bytes(helper.make_tensor_value_info("s", TensorProto.STRING, [2])) == 8


def test_node_labels_and_attributes() -> None:
    named = helper.make_node("Gemm", ["a", "b"], ["c"], name="fc", alpha=2.0, transB=1)
    unnamed = helper.make_node("Relu", ["c"], ["d"])
    assert node_label(named, 3) == "fc"
    assert node_label(unnamed, 3) == "Relu#3"
    assert node_attributes(named) == {"alpha": 2.0, "transB": 1}
