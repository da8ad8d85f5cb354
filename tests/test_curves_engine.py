"""The curve engine's shortcuts give what full-model runs give: the shared dense pass (and
its grouping and streaming under a memory budget), levels answered without running, the
BatchNorm fold, concurrent workers, the IOBinding route, and per-layer candidates."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rdprune_onnx import curves as curves_module
from rdprune_onnx.calibration import model_inputs, synthesize
from rdprune_onnx.curves import (
    LayerCandidates,
    _Schedule,
    grid,
    measure_curves,
    measure_distortion,
    run_reference,
    worker_layout,
)
from rdprune_onnx.graph.batchnorm import fold_batchnorm
from rdprune_onnx.graph.cut import downstream
from rdprune_onnx.graph.layers import Layer, find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.graph.types import infer_types
from rdprune_onnx.masks import apply_mask, prune_count
from rdprune_onnx.runtime import Session, SessionConfig
from tests import graphs


def _data(model: onnx.ModelProto, n: int = 12) -> dict[str, np.ndarray]:
    specs = model_inputs(model)
    ranges = {"cond": (1.0, 2.0)} if any(s.name == "cond" for s in specs) else {}
    shapes = {"x": (1, 5, 8)} if any(s.shape == ("N", "T", 8) for s in specs) else {}
    return synthesize(specs, n, seed=1, ranges=ranges, shapes=shapes)


def conv_bn(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu twice (the second Conv without a bias), then a
    Gemm: the pattern an unfused export has, where a weight input stops ORT's BN fold."""
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT

    def bn(prefix: str, channels: int) -> list[onnx.TensorProto]:
        return [
            graphs.init(f"{prefix}_scale", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
            graphs.init(f"{prefix}_beta", rng.standard_normal(channels).astype(np.float32)),
            graphs.init(f"{prefix}_mean", rng.standard_normal(channels).astype(np.float32)),
            graphs.init(f"{prefix}_var", rng.uniform(0.5, 2.0, channels).astype(np.float32)),
        ]

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization",
            ["c1", "n1_scale", "n1_beta", "n1_mean", "n1_var"],
            ["n1"],
            epsilon=1e-3,
        ),
        helper.make_node("Relu", ["n1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=2),
        helper.make_node(
            "BatchNormalization", ["c2", "n2_scale", "n2_beta", "n2_mean", "n2_var"], ["n2"]
        ),
        helper.make_node("Relu", ["n2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", f32, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", f32, ["N", 5])],
        [
            graphs.init("w1", (rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32)),
            graphs.init("b1", rng.standard_normal(6).astype(np.float32)),
            *bn("n1", 6),
            graphs.init("w2", (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)),
            *bn("n2", 4),
            graphs.init("w3", (rng.standard_normal((5, 4 * 4 * 4)) * 0.1).astype(np.float32)),
        ],
    )
    return graphs._model(graph)


def _expected(
    model: onnx.ModelProto, layer: str, ratios: np.ndarray, reference, metric: str = "mse"
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Each point by pruning the layer for real and running the whole model."""
    weight = read_weight(model, layer)
    values = []
    for ratio in ratios:
        pruned = apply_mask(weight, prune_count(float(ratio), weight.size))
        session = Session(replace_weights(model, {layer: pruned}))
        values.append(measure_distortion(session, reference, metric))
    return np.array(values)


def _assert_same(got: dict, want: dict, rel: float = 1e-5) -> None:  # type: ignore[type-arg]
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(
            got[name].distortion, want[name].distortion, rtol=rel, atol=1e-9, err_msg=name
        )


@pytest.mark.parametrize("build", [graphs.residual, graphs.attention, graphs.cnn])
def test_budget_groups_and_streaming_equal_one_shared_pass(build) -> None:  # type: ignore[no-untyped-def]
    """One dense pass for every layer, a pass per group of layers, and batches streamed in
    chunks under a tiny budget all give the same curves."""
    model = build()
    layers = find_layers(model).layers
    reference = run_reference(model, _data(model), 4, SessionConfig())
    ratios = grid(6)
    shared = measure_curves(model, layers, reference, ratios=ratios)
    for budget in (1, 600, 4000):
        got = measure_curves(model, layers, reference, ratios=ratios, memory_budget=budget)
        _assert_same(got, shared)


def test_budget_groups_layers_in_order() -> None:
    model = graphs.cnn()
    layers = find_layers(model).layers
    reference = run_reference(model, _data(model), 4, SessionConfig())
    context = curves_module._Context(
        model,
        infer_types(model),
        reference,
        SessionConfig(),
        "auto",
        "mse",
        1,
        1,
        None,
        None,  # type: ignore[arg-type]
    )
    plans = [(layer, downstream(context.typed, layer.name, build=False)) for layer in layers]
    groups = curves_module._groups(context, plans)
    order = [layer.name for group, _ in groups for layer, _ in group]
    assert order == [layer.name for layer in layers]
    # With a 1-byte budget every layer fed by inner tensors streams its 3 batches one at a
    # time; the first layer is fed by the calibration input alone (already in memory).
    assert [len(chunks) for _, chunks in groups] == [1, 3, 3, 3]
    context.budget = 2**30
    assert len(curves_module._groups(context, plans)) == 1


def test_schedule_skips_exactly() -> None:
    # size 8 on 11 levels: counts 0,1,2,2,3,4,5,6,6,7,8 (round half to even)
    schedule = _Schedule(grid(11), 8, zeros=0, plain=True)
    assert schedule.counts == [0, 1, 2, 2, 3, 4, 5, 6, 6, 7, 8]
    assert schedule.base == [0]
    assert schedule.copies == {3: 2, 8: 7}
    assert schedule.runs == [1, 2, 4, 5, 6, 7, 9, 10]
    # two weights already zero: the levels pruning at most two change nothing
    schedule = _Schedule(grid(11), 8, zeros=2, plain=True)
    assert schedule.base == [0, 1, 2, 3]
    # candidates: every level runs (make may depend on the ratio)
    schedule = _Schedule(grid(11), 8, zeros=2, plain=False)
    assert schedule.runs == list(range(11)) and not schedule.base and not schedule.copies
    segments = _Schedule(grid(11), 100, 0, True).segments(2)
    assert segments == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


@pytest.mark.parametrize("engine", ["downstream", "full"])
def test_skipped_levels_equal_runs_on_a_partly_pruned_model(engine: str) -> None:
    """Levels at or below a layer's existing zeros are the measured model's own distortion
    (against the dense targets, via ``Reference.base``); duplicates copy their twin."""
    dense = graphs.residual()
    reference = run_reference(dense, _data(dense), 5, SessionConfig())
    weight = read_weight(dense, "wb")
    model = replace_weights(dense, {"wb": apply_mask(weight, 20)})  # 20 of 64 zero
    rebased = reference.rebased(model, SessionConfig())
    layers = find_layers(model).layers
    ratios = grid(41)  # 64 weights: some counts repeat
    got = measure_curves(model, layers, rebased, ratios=ratios, engine=engine)
    for layer in layers:
        want = _expected(model, layer.name, ratios, rebased)
        np.testing.assert_allclose(got[layer.name].distortion, want, rtol=1e-4, atol=1e-9)
    # wb's first levels are the partly pruned model's distortion, not 0
    assert got["wb"].distortion[0] > 0
    assert got["wb"].distortion[0] == got["wb"].distortion[12]  # 12/40 * 64 = 19 <= 20


def test_bn_fold_in_the_cut_equals_full_runs() -> None:
    model = conv_bn()
    typed = infer_types(model)
    for name, left in (("w1", 1), ("w2", 0)):
        cut = downstream(typed, name)
        assert cut is not None and cut.model is not None
        scale = fold_batchnorm(cut.model, name)
        assert scale is not None, name
        ops = [n.op_type for n in cut.model.graph.node]
        assert ops.count("BatchNormalization") == left  # w2's norm stays in w1's cut
    reference = run_reference(model, _data(model), 4, SessionConfig())
    ratios = grid(6)
    got = measure_curves(model, find_layers(model).layers, reference, ratios=ratios)
    for name in ("w1", "w2", "w3"):
        want = _expected(model, name, ratios, reference)
        np.testing.assert_allclose(got[name].distortion, want, rtol=1e-4, atol=1e-9)


def test_bn_fold_refuses_other_patterns() -> None:
    typed = infer_types(graphs.cnn())
    cut = downstream(typed, "w1")
    assert cut is not None and cut.model is not None
    assert fold_batchnorm(cut.model, "w1") is None  # Conv -> Relu


def test_workers_and_binding_route_give_the_same_curves(monkeypatch: pytest.MonkeyPatch) -> None:
    model = graphs.attention()
    layers = find_layers(model).layers
    reference = run_reference(model, _data(model), 4, SessionConfig())
    ratios = grid(5)
    one = measure_curves(model, layers, reference, ratios=ratios, workers=1)
    two = measure_curves(model, layers, reference, ratios=ratios, workers=2)
    _assert_same(two, one, rel=1e-6)
    # Large models build each layer's session only when its turn comes.
    monkeypatch.setattr(curves_module, "PREFETCH_MAX_BYTES", 0)
    _assert_same(measure_curves(model, layers, reference, ratios=ratios), one, rel=1e-6)
    # The CUDA route (IOBinding, values kept as OrtValues) run on the CPU provider.
    monkeypatch.setattr(curves_module, "_FORCE_BINDING", True)
    for engine in ("downstream", "full"):
        bound = measure_curves(model, layers, reference, ratios=ratios, engine=engine)
        _assert_same(bound, one, rel=1e-4)


def test_worker_layout() -> None:
    count, config = worker_layout(SessionConfig(intra_op_threads=2))
    assert (count, config.intra_op_threads) == (2, 1)
    count, config = worker_layout(SessionConfig(intra_op_threads=1))
    assert (count, config.intra_op_threads) == (1, 1)
    count, config = worker_layout(SessionConfig(intra_op_threads=8), workers=1)
    assert (count, config.intra_op_threads) == (1, 8)
    count, config = worker_layout(SessionConfig(provider="cuda", intra_op_threads=8))
    assert count == 1


def _bias_factory(scale: float, seen: list[str]):  # type: ignore[no-untyped-def]
    """Feeds the layer's bias times (1 + scale * ratio) next to the masked weight."""
    biases = {"w1": "b1", "w3": "b3"}

    def factory(layer: Layer, weight: np.ndarray) -> LayerCandidates | None:
        seen.append(layer.name)
        bias_name = biases.get(layer.name)
        if bias_name is None:
            return None
        bias = read_weight(graphs.cnn(), bias_name) + 0.25

        def make(masked: np.ndarray, ratio: float) -> dict[str, np.ndarray]:
            assert masked.shape == weight.shape
            return {layer.name: masked, bias_name: bias * (1 + scale * ratio)}

        return LayerCandidates([layer.name, bias_name], make)

    return factory


@pytest.mark.parametrize("engine", ["downstream", "full"])
def test_candidate_factory_equals_full_runs_with_the_same_tensors(engine: str) -> None:
    model = graphs.cnn()
    layers = find_layers(model).layers
    reference = run_reference(model, _data(model), 5, SessionConfig())
    ratios = grid(5)
    seen: list[str] = []
    got = measure_curves(
        model, layers, reference, ratios=ratios, engine=engine, candidates=_bias_factory(2.0, seen)
    )
    assert seen == [layer.name for layer in layers]  # once per layer
    bias_of = {"w1": "b1", "w3": "b3"}
    for layer in layers:
        weight = read_weight(model, layer.name)
        want = []
        for ratio in ratios:
            swap = {layer.name: apply_mask(weight, prune_count(float(ratio), weight.size))}
            if layer.name in bias_of:
                bias = read_weight(model, bias_of[layer.name]) + 0.25
                swap[bias_of[layer.name]] = bias * (1 + 2.0 * float(ratio))
            session = Session(replace_weights(model, swap))
            want.append(measure_distortion(session, reference, "mse"))
        np.testing.assert_allclose(got[layer.name].distortion, want, rtol=1e-4, atol=1e-9)
    # the changed bias shows at ratio 0 (no skipping for candidates)
    assert got["w1"].distortion[0] > 0
    assert got["w2"].distortion[0] == 0


def test_candidates_widening_the_cut_get_their_crossing_tensors() -> None:
    """A candidate tensor used upstream of the layer widens the cut (here wa, fed with wd)."""
    model = graphs.residual()
    layers = [find_layers(model).layer("wd")]
    reference = run_reference(model, _data(model), 4, SessionConfig())
    wa = read_weight(model, "wa")

    def factory(layer: Layer, weight: np.ndarray) -> LayerCandidates:
        return LayerCandidates(
            ["wd", "wa"], lambda masked, ratio: {"wd": masked, "wa": wa * (1 - ratio / 2)}
        )

    ratios = grid(4)
    got = measure_curves(model, layers, reference, ratios=ratios, candidates=factory)
    weight = read_weight(model, "wd")
    for i, ratio in enumerate(ratios):
        swap = {
            "wd": apply_mask(weight, prune_count(float(ratio), weight.size)),
            "wa": wa * (1 - float(ratio) / 2),
        }
        want = measure_distortion(Session(replace_weights(model, swap)), reference, "mse")
        assert got["wd"].distortion[i] == pytest.approx(want, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("unknown_sizes", [False, True])
@pytest.mark.parametrize("build", [graphs.attention, graphs.cnn])
def test_one_dense_session_for_all_layers(  # type: ignore[no-untyped-def]
    build, unknown_sizes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One dense session for all layers, also when the tensors' sizes are not known from
    the inferred shapes and a first batch is run to size them (its values and session are
    reused); plus one session per layer. The curves do not change."""
    model = build()
    layers = find_layers(model).layers
    reference = run_reference(model, _data(model), 4, SessionConfig())
    want = measure_curves(model, layers, reference, ratios=grid(3))
    made: list[int] = []
    real = curves_module.Session

    def counting(model: onnx.ModelProto, *args: object, **kwargs: object) -> object:
        made.append(len(model.graph.output))
        return real(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(curves_module, "Session", counting)
    if unknown_sizes:
        monkeypatch.setattr(
            curves_module._Context, "batch_bytes", lambda self, names: dict.fromkeys(names)
        )
    got = measure_curves(model, layers, reference, ratios=grid(3))
    assert len(made) == len(layers) + 1, made
    _assert_same(got, want, rel=1e-6)
