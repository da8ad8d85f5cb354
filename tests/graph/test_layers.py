from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from rdprune_onnx.graph.layers import find_layers, read_weight
from tests import graphs


def test_cnn_layers_in_graph_order() -> None:
    scan = find_layers(graphs.cnn())
    assert [layer.name for layer in scan.layers] == ["w1", "w2", "w3", "w4"]
    assert [layer.op_types for layer in scan.layers] == [
        ("Conv",),
        ("Conv",),
        ("Gemm",),
        ("MatMul",),
    ]
    assert scan.layer("w3").shape == (16, 288)
    assert scan.layer("w2").uses[0].attributes["group"] == 4
    assert scan.skipped == []


def test_every_storage_form() -> None:
    scan = find_layers(graphs.mlp_forms())
    by_name = {layer.name: layer for layer in scan.layers}
    assert set(by_name) == {"w_left", "w_const", "w_shared", "w_gemm", "w_if"}
    assert by_name["w_left"].uses[0].input_index == 0  # constant on the left
    assert by_name["w_const"].storage == "constant"
    assert [u.node for u in by_name["w_shared"].uses] == ["shared_a", "shared_b"]
    assert by_name["w_if"].in_subgraph
    assert by_name["w_gemm"].uses[0].attributes["alpha"] == 0.5
    reasons = {s.node: s.reason for s in scan.skipped}
    assert "activation x activation" in reasons["act_matmul"]
    assert "DequantizeLinear" in reasons["qdq_matmul"]


def test_loop_body_uses_outer_weight() -> None:
    scan = find_layers(graphs.loop_model())
    assert [layer.name for layer in scan.layers] == ["w_loop"]
    assert scan.layers[0].in_subgraph


def test_float16_and_conv_transpose() -> None:
    scan = find_layers(graphs.cnn(dtype=np.float16))
    assert {layer.dtype for layer in scan.layers} == {"float16"}
    ct = find_layers(graphs.conv_transpose())
    assert [(layer.name, layer.op_types) for layer in ct.layers] == [("w_ct", ("ConvTranspose",))]


def test_identity_chain_is_followed_and_sparsity_counted() -> None:
    model = graphs.cnn()
    weight = read_weight(model, "w4").copy()
    weight[:4] = 0
    for init in model.graph.initializer:
        if init.name == "w4":
            init.CopyFrom(onnx.numpy_helper.from_array(weight, "w4"))
    node = next(n for n in model.graph.node if n.name == "fc2")
    node.input[1] = "w4_alias"
    model.graph.node.insert(0, helper.make_node("Identity", ["w4"], ["w4_alias"]))
    scan = find_layers(model)
    layer = scan.layer("w4")
    assert layer.zeros == 40
    assert abs(layer.sparsity - 0.25) < 1e-12


def test_integer_weight_is_skipped_with_reason() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="int_mm")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.INT32, ["N", 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, ["N", 3])],
        [graphs.init("w", np.ones((3, 3), np.int32))],
    )
    scan = find_layers(helper.make_model(graph))
    assert scan.layers == []
    assert "not float" in scan.skipped[0].reason
