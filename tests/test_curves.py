from __future__ import annotations

import numpy as np
import onnx
import pytest

from rdprune_onnx.calibration import model_inputs, synthesize
from rdprune_onnx.curves import (
    grid,
    measure_curves,
    measure_distortion,
    run_reference,
)
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.cut import downstream
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import expose_as_inputs, replace_weights
from rdprune_onnx.graph.types import infer_types
from rdprune_onnx.masks import apply_mask, prune_count
from rdprune_onnx.runtime import Session, SessionConfig
from tests import graphs


def _data(model: onnx.ModelProto, n: int = 12) -> dict[str, np.ndarray]:
    specs = model_inputs(model)
    ranges = {"cond": (1.0, 2.0)} if any(s.name == "cond" for s in specs) else {}
    shapes = {"x": (1, 5, 8)} if any(s.shape == ("N", "T", 8) for s in specs) else {}
    return synthesize(specs, n, seed=1, ranges=ranges, shapes=shapes)


BUILDERS = [
    graphs.cnn,
    graphs.mlp_forms,
    graphs.loop_model,
    graphs.residual,
    graphs.attention,
    graphs.conv_transpose,
]


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("metric", ["mse", "worst"])
@pytest.mark.parametrize("engine", ["downstream", "full"])
def test_curves_equal_full_model_runs(build, metric: str, engine: str) -> None:  # type: ignore[no-untyped-def]
    """Each curve point must equal pruning that layer for real and running the model."""
    model = build()
    layers = find_layers(model).layers
    reference = run_reference(model, _data(model), 5, SessionConfig())
    ratios = grid(5)
    curves = measure_curves(model, layers, reference, ratios=ratios, metric=metric, engine=engine)
    for layer in layers:
        weight = read_weight(model, layer.name)
        for i, ratio in enumerate(ratios):
            pruned = apply_mask(weight, prune_count(float(ratio), weight.size))
            session = Session(replace_weights(model, {layer.name: pruned}))
            expected = measure_distortion(session, reference, metric)
            got = curves[layer.name].distortion[i]
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-9), (layer.name, ratio)
        assert curves[layer.name].distortion[0] == pytest.approx(0.0, abs=1e-9)
        assert curves[layer.name].distortion[-1] > 0


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


def test_curves_resume_from_done() -> None:
    model = graphs.cnn()
    layers = find_layers(model).layers
    reference = run_reference(model, _data(model), 6, SessionConfig())
    first = measure_curves(model, layers[:2], reference, ratios=grid(3))
    seen: list[str] = []
    full = measure_curves(
        model,
        layers,
        reference,
        ratios=grid(3),
        done=first,
        on_curve=lambda name, curve: seen.append(name),
    )
    assert seen == ["w3", "w4"]
    assert full["w1"] is first["w1"]


def test_worst_is_at_least_mse() -> None:
    model = graphs.cnn()
    layers = find_layers(model).layers
    reference = run_reference(model, _data(model), 4, SessionConfig())
    mse = measure_curves(model, layers, reference, ratios=grid(3), metric="mse")
    worst = measure_curves(model, layers, reference, ratios=grid(3), metric="worst")
    for name in mse:
        assert np.all(worst[name].distortion >= mse[name].distortion - 1e-12)


def test_grid_and_no_float_output() -> None:
    np.testing.assert_allclose(grid(101)[:3], [0, 0.01, 0.02])
    with pytest.raises(UserError):
        grid(1)
    from rdprune_onnx.curves import float_outputs

    model = graphs.cnn()
    assert float_outputs(model) == ["y"]
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    with pytest.raises(UserError, match="no float output"):
        float_outputs(model)


def test_softmax_metrics_refuse_embeddings_and_accept_probabilities() -> None:
    from rdprune_onnx.distortion import check_metric

    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    check_metric("kl", ["y"], [logits])  # fine
    embedding = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    with pytest.raises(UserError, match="embedding"):
        check_metric("kl", ["y"], [embedding])
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    check_metric("prob-mse", ["y"], [probs])  # read as probabilities (see test_distortion_kinds)
    with pytest.raises(UserError, match="class axis"):
        check_metric("kl", ["y"], [np.ones((4, 1))])
    check_metric("mse", ["y"], [embedding])  # mse applies to anything


def test_softmax_metric_values() -> None:
    from rdprune_onnx.distortion import DistortionMeter

    ref = np.array([[1.0, 0.0], [0.0, 0.0]])
    out = np.array([[0.0, 0.0], [0.0, 0.0]])
    p = np.exp(ref) / np.exp(ref).sum(axis=1, keepdims=True)
    q = np.full((2, 2), 0.5)
    kl = DistortionMeter("kl")
    kl.add([ref], [out])
    assert kl.value() == pytest.approx(float((p * np.log(p / q)).sum(axis=1).mean()))
    pm = DistortionMeter("prob-mse")
    pm.add([ref], [out])
    assert pm.value() == pytest.approx(float(((p - q) ** 2).mean()))
    worst = DistortionMeter("worst")
    worst.add([ref], [out])
    assert worst.value() == pytest.approx(0.5)  # sample 0: (1 + 0) / 2
