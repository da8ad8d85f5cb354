"""Property-based tests: random small MLP and CNN graphs (depth 1-4, widths 2-12, Gemm with or
without transB and bias, MatMul, Conv with groups and depthwise, float16 or float32, some
weights already zero) and random settings (ratio, every method, levels 3-21, metric mse or
worst, 1-2 rd steps, layer removal, min/max layer ratios, --exclude) pushed through
:func:`rdprune_onnx.prune`, checking the invariants every prune must keep:

* The count is exact: ``ceil(ratio * total)`` zeros over the prunable weights (with the
  allocators' 1e-9 tolerance), or the sum of the layers' lower bounds when that is larger
  (a layer's lower bound is its zeros before pruning, or ``min_layer_ratio``: weights already
  zero stay zero, so a model that is sparser than the target keeps exactly its zeros).
* Each layer's zeros lie within the counts its bounds and its method allow (rd: the grid's
  counts and the bounds, never the whole layer without ``allow_layer_removal``; uniform-plus:
  first layer dense, last layer at most 80%).
* Only prunable weights change, and only to zero; every other tensor, node and attribute is
  byte-identical; the output passes the ONNX checker and runs in onnxruntime.
* A combination that cannot be met raises :class:`~rdprune_onnx.errors.InfeasibleError`
  (contradictory min/max bounds: a plain ``UserError``), never another exception, and writes
  nothing; one that can be met does not raise.
* The same model, settings and seed give the same bytes (checked on a quarter of examples).

The examples are derandomized (the same ones on every run, no example database) and few,
so the file takes about 15 s on two cores.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.allocate import METHODS
from rdprune_onnx.calibration import model_inputs, synthesize
from rdprune_onnx.errors import InfeasibleError, UserError
from rdprune_onnx.graph.layers import find_layers
from tests.graphs import init
from tests.graphs_corpus import constant_tensors, without_values

SPATIAL = 5  # height and width of a CNN's input
TOL = 1e-9  # the allocators' relative tolerance when turning ratio * size into weights


@dataclass(frozen=True)
class LayerDraw:
    op: str  # "Gemm", "MatMul" or "Conv"
    width: int  # output features / channels
    trans_b: bool = False
    bias: bool = False
    group: int = 1
    kernel: int = 1
    zeros: float = 0.0  # fraction of the weight set to exactly zero before pruning


@dataclass(frozen=True)
class GraphDraw:
    inputs: int
    layers: tuple[LayerDraw, ...]
    conv: bool
    float16: bool
    seed: int


@st.composite
def graph_draws(draw: st.DrawFn) -> GraphDraw:
    depth = draw(st.integers(1, 4))
    conv = draw(st.booleans())
    inputs = draw(st.integers(2, 12))
    zeros = st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.6])
    layers: list[LayerDraw] = []
    channels = inputs
    # A CNN: Conv layers, then GlobalAveragePool, Flatten and (from depth 2) a linear head.
    n_conv = max(1, depth - 1) if conv else 0
    for index in range(depth):
        width = draw(st.integers(2, 12))
        if conv and index < n_conv:
            if draw(st.booleans()) and channels > 1:
                width = channels  # depthwise or grouped with the same channel count
            common = [g for g in range(1, min(channels, width) + 1) if not channels % g]
            group = draw(st.sampled_from([g for g in common if not width % g]))
            kernel = draw(st.sampled_from([1, 3]))
            layers.append(LayerDraw("Conv", width, group=group, kernel=kernel, zeros=draw(zeros)))
        else:
            op = draw(st.sampled_from(["Gemm", "MatMul"]))
            layers.append(
                LayerDraw(
                    op,
                    width,
                    trans_b=op == "Gemm" and draw(st.booleans()),
                    bias=op == "Gemm" and draw(st.booleans()),
                    zeros=draw(zeros),
                )
            )
        channels = width
    return GraphDraw(inputs, tuple(layers), conv, draw(st.booleans()), draw(st.integers(0, 99)))


def build(spec: GraphDraw) -> onnx.ModelProto:
    rng = np.random.default_rng(spec.seed)
    dtype = np.float16 if spec.float16 else np.float32
    elem = TensorProto.FLOAT16 if spec.float16 else TensorProto.FLOAT
    nodes: list[onnx.NodeProto] = []
    tensors: list[onnx.TensorProto] = []
    current, channels = "x", spec.inputs
    if spec.conv:
        x_shape: list[int | str] = ["N", spec.inputs, SPATIAL, SPATIAL]
    else:
        x_shape = ["N", spec.inputs]
    flattened = not spec.conv
    for i, layer in enumerate(spec.layers):
        w = f"w{i}"
        if layer.op == "Conv":
            shape: tuple[int, ...] = (
                layer.width,
                channels // layer.group,
                layer.kernel,
                layer.kernel,
            )
            pad = layer.kernel // 2
            nodes.append(
                helper.make_node("Conv", [current, w], [f"h{i}"], group=layer.group, pads=[pad] * 4)
            )
        else:
            if not flattened:
                nodes += [
                    helper.make_node("GlobalAveragePool", [current], ["pooled"]),
                    helper.make_node("Flatten", ["pooled"], ["flat"]),
                ]
                current, flattened = "flat", True
            shape = (layer.width, channels) if layer.trans_b else (channels, layer.width)
            if layer.op == "Gemm":
                inputs = [current, w] + ([f"b{i}"] if layer.bias else [])
                nodes.append(helper.make_node("Gemm", inputs, [f"h{i}"], transB=int(layer.trans_b)))
                if layer.bias:
                    tensors.append(init(f"b{i}", rng.standard_normal(layer.width).astype(dtype)))
            else:
                nodes.append(helper.make_node("MatMul", [current, w], [f"h{i}"]))
        weight = rng.standard_normal(shape) * (1.0 / math.sqrt(max(1, math.prod(shape[1:]))))
        size = weight.size
        zero = rng.permutation(size)[: min(size - 1, int(layer.zeros * size))]
        weight.reshape(-1)[zero] = 0.0
        tensors.append(init(w, weight.astype(dtype)))
        channels = layer.width
        nodes.append(helper.make_node("Tanh", [f"h{i}"], [f"a{i}"]))
        current = f"a{i}"
    if not flattened:
        nodes += [
            helper.make_node("GlobalAveragePool", [current], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
        ]
        current = "flat"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "random",
        [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, ["N", channels])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@st.composite
def prune_settings(draw: st.DrawFn) -> PruneSettings:
    method = draw(st.sampled_from(METHODS))
    return PruneSettings(
        ratio=draw(st.floats(0.05, 0.95)),
        method=method,
        metric=draw(st.sampled_from(["mse", "worst"])),
        levels=draw(st.integers(3, 21)),
        provider="cpu",
        steps=draw(st.integers(1, 2)) if method == "rd" else 1,
        allow_layer_removal=draw(st.booleans()),
        min_layer_ratio=draw(st.one_of(st.none(), st.none(), st.floats(0.0, 0.6))),
        max_layer_ratio=draw(st.one_of(st.none(), st.floats(0.3, 1.0))),
        exclude=draw(st.sampled_from([(), (), (), ("w0",), ("w[13]",)])),
    )


def _count(x: float, up: bool) -> int:
    return math.ceil(x - TOL * max(1.0, x)) if up else math.floor(x + TOL * max(1.0, x))


def _count_range(
    settings: PruneSettings, names: list[str], sizes: dict[str, int], zeros: dict[str, int]
) -> dict[str, tuple[int, int]] | None:
    """Per layer, the fewest and most weights the method may prune under the settings'
    bounds and its own documented rules; None when some layer has no allowed count.

    A layer's bounds are [max(min_layer_ratio, sparsity), max(max_layer_ratio, sparsity)].
    rd picks among the grid's counts (round half up of level * n), the bounds and n - 1,
    without n unless allow_layer_removal; uniform-plus keeps the first layer at its floor
    and the last at most 80% (its floor wins over these caps).
    """
    out: dict[str, tuple[int, int]] = {}
    for index, name in enumerate(names):
        n = sizes[name]
        low = max(settings.min_layer_ratio or 0.0, zeros[name] / n)
        high = 1.0 if settings.max_layer_ratio is None else settings.max_layer_ratio
        high = max(high, zeros[name] / n)
        lo, hi = min(n, _count(low * n, up=True)), min(n, _count(high * n, up=False))
        if lo > hi:
            return None
        if settings.method == "rd" and not settings.allow_layer_removal and hi == n:
            grid = np.linspace(0.0, 1.0, settings.levels) * n
            counts = {int(c) for c in np.floor(grid + 0.5 + TOL * np.maximum(1.0, grid))}
            # n - 1 (all but one weight) is offered when the grid cannot meet the target.
            allowed = [c for c in counts | {lo, n - 1} if lo <= c < n]
            if not allowed:
                return None
            hi = max(allowed)
        if settings.method == "uniform-plus":
            if index == 0:
                hi = lo
            if index == len(names) - 1:
                hi = max(lo, min(hi, _count(0.8 * n, up=False)))
        out[name] = (lo, hi)
    return out


def _run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    spec=graph_draws(),
    prune_settings=prune_settings(),
    seed=st.integers(0, 3),
    twice=st.sampled_from([False, False, False, True]),
)
def test_prune_keeps_its_invariants(
    spec: GraphDraw, prune_settings: PruneSettings, seed: int, twice: bool
) -> None:
    model = build(spec)
    found = [layer.name for layer in find_layers(model).layers]
    assert found == [f"w{i}" for i in range(len(spec.layers))]
    # Excluded layers stay dense: they are checked like every other non-layer tensor.
    layers = [n for n in found if not any(fnmatchcase(n, p) for p in prune_settings.exclude)]
    before = constant_tensors(model)
    sizes = {name: int(before[name].size) for name in layers}
    zeros_before = {name: int(np.count_nonzero(before[name] == 0)) for name in layers}
    ranges = _count_range(prune_settings, layers, sizes, zeros_before)
    required = _count(prune_settings.ratio * sum(sizes.values()), up=True)
    feasible = ranges is not None and required <= sum(hi for _lo, hi in ranges.values())
    calibration = CalibrationSpec(synthetic=8, batch_size=8, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "model.onnx"
        onnx.save_model(model, str(source))
        out = folder / "a.onnx"
        try:
            result = prune(source, prune_settings, calibration, output=out, cache_dir=None)
        except UserError as exc:
            assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]
            if not layers:
                assert "no prunable layer" in str(exc)
                return
            event("infeasible")
            assert not feasible, f"feasible, yet: {exc}"
            low, high = prune_settings.min_layer_ratio, prune_settings.max_layer_ratio
            if low is None or high is None or low <= high:
                # Contradictory bounds are a plain UserError; everything else is infeasible.
                assert isinstance(exc, InfeasibleError), f"{type(exc).__name__}: {exc}"
            return
        assert feasible, "an infeasible target was met"
        assert ranges is not None
        event(f"pruned with {prune_settings.method}")
        event(f"{'cnn' if spec.conv else 'mlp'}, {'float16' if spec.float16 else 'float32'}")
        written_bytes = out.read_bytes()
        written = onnx.load_model_from_string(written_bytes)
        onnx.checker.check_model(written, full_check=True)
        if twice:
            again = folder / "b.onnx"
            prune(source, prune_settings, calibration, output=again, cache_dir=None)
            assert again.read_bytes() == written_bytes

    after = constant_tensors(written)
    assert set(after) == set(before)
    for name, value in before.items():
        if name not in layers:
            np.testing.assert_array_equal(after[name], value, err_msg=name)
            continue
        new = after[name]
        assert new.dtype == value.dtype and new.shape == value.shape
        assert np.all(new[new != value] == 0), f"{name}: a weight changed to a nonzero"
        zeros = int(np.count_nonzero(new == 0))
        assert zeros >= zeros_before[name], name
        lo, hi = ranges[name]
        assert lo <= zeros <= hi, f"{name}: {zeros} zeros, outside [{lo}, {hi}]"
    assert without_values(written, set(layers)) == without_values(model, set(layers))

    total = sum(sizes.values())
    zeros_total = sum(int(np.count_nonzero(after[name] == 0)) for name in layers)
    assert zeros_total == max(required, sum(lo for lo, _hi in ranges.values()))
    assert math.isclose(result.achieved_ratio, zeros_total / total)

    feeds = synthesize(model_inputs(model), 2, seed=seed)
    dense, pruned = _run(model.SerializeToString(), feeds), _run(written_bytes, feeds)
    assert [(v.dtype, v.shape) for v in pruned] == [(v.dtype, v.shape) for v in dense]
    assert all(np.all(np.isfinite(v)) for v in pruned)
