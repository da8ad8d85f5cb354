"""rdprune_onnx.graph.surgery: weights swapped for other values, or turned into graph
inputs, in every place a constant can live (initializers, Constant nodes, subgraphs, data
kept on disk); the caller's model is never changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rdprune_onnx.graph.external import is_lazy, tensor_array
from rdprune_onnx.graph.layers import read_weight
from rdprune_onnx.graph.load import iter_all_tensors, read_model
from rdprune_onnx.graph.surgery import expose_as_inputs, replace_weights
from rdprune_onnx.graph.walk import iter_graphs
from rdprune_onnx.runtime import Session
from tests import graphs
from tests.graphs_external import all_lazy, nested_scopes, rng_inputs, save_in


def _values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant of the model by slot name (Constant nodes by their output)."""
    out: dict[str, np.ndarray] = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            if node.op_type == "Constant":
                out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        out.update({t.name: tensor_array(t) for t in graph.initializer})
    return out


def _random_like(array: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(array.shape).astype(array.dtype)


def test_replaced_weights_are_swapped_in_every_scope_and_nothing_else() -> None:
    """An initializer, a Constant node's value and an initializer read inside an If."""
    model = graphs.mlp_forms()
    before = model.SerializeToString()
    old = _values(model)
    new = {n: _random_like(old[n], i) for i, n in enumerate(["w_left", "w_const", "w_if"])}
    swapped = replace_weights(model, new)
    assert model.SerializeToString() == before
    got = _values(swapped)
    assert got.keys() == old.keys()
    for name, value in got.items():
        np.testing.assert_array_equal(value, new.get(name, old[name]), err_msg=name)
    # The nodes, names and everything but the values are as they were.
    restored = replace_weights(swapped, {n: old[n] for n in new})
    assert restored.SerializeToString() == before


def test_the_swapped_model_computes_with_the_new_values() -> None:
    model = graphs.residual()
    feeds = rng_inputs(model)
    x = feeds["x"].astype(np.float64)
    weights = {n: read_weight(model, n).astype(np.float64) for n in ("wa", "wb", "wc", "wd")}
    weights["wd"] = np.zeros_like(weights["wd"])
    weights["wd"][:3, :] = np.eye(3)
    swapped = replace_weights(model, {"wd": weights["wd"].astype(np.float32)})
    y, ar = Session(swapped).run(feeds)
    a = np.maximum(x @ weights["wa"], 0)
    skip = a @ weights["wb"] + np.tanh(a @ weights["wc"]) + x
    np.testing.assert_allclose(y, skip @ weights["wd"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ar, a, rtol=1e-5, atol=1e-6)


def test_replacements_keep_type_and_shape() -> None:
    model = graphs.cnn()
    w4 = read_weight(model, "w4")
    with pytest.raises(ValueError, match="type or shape"):
        replace_weights(model, {"w4": w4.T.copy()})
    with pytest.raises(ValueError, match="type or shape"):
        replace_weights(model, {"w4": w4.astype(np.float16)})
    with pytest.raises(KeyError):
        replace_weights(model, {"nope": w4})


def test_weights_on_disk_are_swapped_and_the_rest_stays_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    all_lazy(monkeypatch)
    model = graphs.cnn()
    path = save_in(model, tmp_path)
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    lazy, _ = read_model(path)
    w3 = _random_like(read_weight(model, "w3"), 5)
    swapped = replace_weights(lazy, {"w3": w3})
    tensors = {t.name: t for t in iter_all_tensors(swapped)}
    assert not is_lazy(tensors["w3"])
    assert all(is_lazy(t) for name, t in tensors.items() if name != "w3")
    np.testing.assert_array_equal(tensor_array(tensors["w3"]), w3)
    assert all(is_lazy(t) for t in iter_all_tensors(lazy))  # the loaded model is unchanged
    feeds = rng_inputs(model)
    want = Session(replace_weights(model, {"w3": w3})).run(feeds)[0]
    np.testing.assert_array_equal(Session(swapped).run(feeds)[0], want)
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before


@pytest.mark.parametrize(
    ("build", "names"),
    [
        (graphs.cnn, ["w2"]),
        (graphs.mlp_forms, ["w_const", "w_if", "w_left"]),  # a Constant node, an If's weight
        (graphs.attention, ["wq", "wo"]),
        (nested_scopes, ["w_typed", "w_in"]),  # a typed Constant; a branch's initializer
    ],
)
def test_exposed_weights_are_inputs_and_compute_the_same(build: object, names: list[str]) -> None:
    assert callable(build)
    model = build()
    before = model.SerializeToString()
    values = _values(model)
    exposed = expose_as_inputs(model, names)
    assert model.SerializeToString() == before
    inputs = {i.name: i for i in exposed.graph.input}
    assert {i.name for i in exposed.graph.input[-len(names) :]} == set(names)
    for name in names:
        kind = inputs[name].type.tensor_type
        dims = [d.dim_value for d in kind.shape.dim]
        assert kind.elem_type == onnx.helper.np_dtype_to_tensor_dtype(values[name].dtype)
        assert dims == list(values[name].shape)
    assert not set(names) & set(_values(exposed))  # no longer constants anywhere
    feeds = rng_inputs(model)
    want = Session(model).run(feeds)
    fed = feeds | {n: values[n] for n in names}
    for a, b in zip(Session(exposed).run(fed), want, strict=True):
        np.testing.assert_array_equal(a, b)
    other = {n: _random_like(values[n], 9) for n in names}
    changed = Session(exposed).run(feeds | other)
    np.testing.assert_array_equal(changed[0], Session(replace_weights(model, other)).run(feeds)[0])


def test_exposing_an_input_again_adds_nothing() -> None:
    exposed = expose_as_inputs(graphs.cnn(), ["w1"])
    again = expose_as_inputs(exposed, ["w1"])
    assert [i.name for i in again.graph.input] == ["x", "w1"]
    assert again.SerializeToString() == exposed.SerializeToString()
