"""rdprune_onnx.graph.cut: the part of a graph below some weights. Fed with the tensors
that cross the cut (from one run of the full model), the cut computes what the full model
computes, for the dense weight and for any other value of it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest

from rdprune_onnx.curves import infer_types
from rdprune_onnx.graph.cut import build_cut, downstream, node_inputs, with_outputs
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import expose_as_inputs, replace_weights
from rdprune_onnx.masks import apply_mask, prune_count
from rdprune_onnx.runtime import Session
from tests import graphs
from tests.graphs_external import rng_inputs

CUT = [graphs.cnn, graphs.residual, graphs.attention, graphs.mlp_forms, graphs.conv_transpose]


def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = Session(model)
    return dict(zip(session.output_names, session.run(feeds), strict=True))


@pytest.mark.parametrize("build", CUT)
def test_each_cut_computes_what_the_full_model_computes(
    build: Callable[[], onnx.ModelProto],
) -> None:
    model = build()
    typed = infer_types(model)
    feeds = rng_inputs(model)
    constants = {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    for layer in find_layers(model).layers:
        cut = downstream(typed, layer.name)
        if cut is None:
            continue
        assert cut.model is not None and cut.weights == [layer.name]
        assert not set(cut.crossing) & constants  # constant producers are copied in
        inputs = [i.name for i in cut.model.graph.input]
        assert inputs == [*cut.crossing, layer.name]
        upstream = _outputs(with_outputs(typed, cut.crossing), feeds)
        dense = read_weight(model, layer.name)
        pruned = apply_mask(dense, prune_count(0.6, dense.size))
        for weight in (dense, pruned):
            fed = {n: upstream[n] for n in cut.crossing} | {layer.name: weight}
            got = _outputs(cut.model, fed)
            want = _outputs(replace_weights(model, {layer.name: weight}), feeds)
            assert sorted(got) == sorted(cut.outputs)
            for name in cut.outputs:
                np.testing.assert_allclose(
                    got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=layer.name
                )


def test_outputs_that_do_not_depend_on_the_weight_stay_out() -> None:
    typed = infer_types(graphs.residual())
    first = downstream(typed, "wa")
    assert first is not None and first.outputs == ["y", "ar"]  # both below wa
    later = downstream(typed, "wd")
    assert later is not None and later.outputs == ["y"] and later.crossing == ["skip"]
    two = downstream(infer_types(graphs.mlp_forms()), "w_left")
    assert two is not None and two.outputs == ["y", "gram"]


def test_with_outputs_adds_named_tensors_and_leaves_the_model_alone() -> None:
    model = graphs.cnn()
    typed = infer_types(model)
    before = typed.SerializeToString()
    wider = with_outputs(typed, ["r1", "y", "c2"])
    assert typed.SerializeToString() == before
    assert [o.name for o in wider.graph.output] == ["y", "r1", "c2"]  # no duplicate y
    feeds = rng_inputs(model)
    y, r1, c2 = Session(wider).run(feeds)
    np.testing.assert_array_equal(y, Session(model).run(feeds)[0])
    # r1 = Relu(Conv(x, w1, b1), pads 1), computed here with numpy.
    x = np.pad(feeds["x"], ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
    conv = np.einsum("nchwij,ocij->nohw", patches, read_weight(model, "w1"))
    want = np.maximum(conv + read_weight(model, "b1")[None, :, None, None], 0)
    np.testing.assert_allclose(r1, want, rtol=1e-5, atol=1e-5)
    assert c2.shape == (3, 8, 6, 6)


def test_no_cut_where_one_cannot_be_made() -> None:
    forms = infer_types(graphs.mlp_forms())
    assert downstream(forms, "w_if") is None  # read inside the If's branch
    assert downstream(forms, "nope") is None  # nothing reads it
    # Without inferred types the crossing tensors' types are unknown; the first layer's
    # cut crosses only the graph input, whose type is declared.
    untyped = graphs.cnn()
    assert downstream(untyped, "w2") is None
    first = downstream(untyped, "w1")
    assert first is not None and first.crossing == ["x"]


def test_build_cut_refuses_weights_the_model_lacks() -> None:
    typed = infer_types(graphs.cnn())
    planned = downstream(typed, "w3", build=False)
    assert planned is not None and planned.model is None
    other = infer_types(graphs.residual())
    with pytest.raises(ValueError, match="not in this model"):
        build_cut(other, planned)


def test_node_inputs_include_what_subgraphs_read() -> None:
    model = graphs.mlp_forms()
    branch = next(n for n in model.graph.node if n.op_type == "If")
    assert node_inputs(branch) == {"cond", "h4", "w_if"}
    loop = next(n for n in graphs.loop_model().graph.node if n.op_type == "Loop")
    assert "w_loop" in node_inputs(loop) and "" not in node_inputs(loop)


@pytest.mark.parametrize(
    ("build", "cut_layers"),
    [
        (graphs.cnn, {"w1", "w2", "w3", "w4"}),
        (graphs.residual, {"wa", "wb", "wc", "wd"}),
        (graphs.attention, {"wq", "wk", "wv", "wo"}),
        (graphs.mlp_forms, {"w_left", "w_const", "w_shared", "w_gemm"}),  # not w_if
    ],
)
def test_downstream_cut_is_used(build, cut_layers: set[str]) -> None:  # type: ignore[no-untyped-def]
    model = build()
    typed = infer_types(model)
    got = set()
    for layer in find_layers(model).layers:
        cut = downstream(expose_as_inputs(typed, [layer.name]), layer.name)
        if cut is not None:
            got.add(layer.name)
            assert layer.name not in cut.crossing
    assert got == cut_layers


def test_downstream_crossing_includes_skip_input() -> None:
    typed = infer_types(graphs.residual())
    cut = downstream(expose_as_inputs(typed, ["wb"]), "wb")
    assert cut is not None
    assert set(cut.crossing) == {"ar", "c", "x"} or set(cut.crossing) == {"ar", "ct", "x"}
    assert cut.outputs == ["y"]  # "ar" is upstream of wb: not affected
    assert {n.name for n in cut.model.graph.node if n.name} == {"mm_b", "mm_d"}


def test_cut_takes_initializer_and_constant_weights_directly() -> None:
    """No expose_as_inputs copy needed: the cut of a constant equals the exposed one."""
    for build, name in ((graphs.cnn, "w2"), (graphs.mlp_forms, "w_const")):
        typed = infer_types(build())
        direct = downstream(typed, name)
        exposed = downstream(expose_as_inputs(typed, [name]), name)
        assert direct is not None and exposed is not None
        assert direct.model is not None and exposed.model is not None
        assert direct.crossing == exposed.crossing and direct.outputs == exposed.outputs
        assert [i.name for i in direct.model.graph.input][-1] == name
        assert name not in {t.name for t in direct.model.graph.initializer}
        assert not any(name in n.output for n in direct.model.graph.node)
        planned = downstream(typed, name, build=False)
        assert planned is not None and planned.model is None
        rebuilt = build_cut(typed, planned)
        assert rebuilt.SerializeToString() == direct.model.SerializeToString()


def test_cut_of_several_weights_is_the_union() -> None:
    typed = infer_types(graphs.residual())
    both = downstream(typed, ["wb", "wc"])
    assert both is not None and both.model is not None
    assert both.weights == ["wb", "wc"]
    kept = {n.name for n in both.model.graph.node if n.name}
    assert {"mm_b", "mm_d"} <= kept and "mm_a" not in kept
    assert "ar" in both.crossing
