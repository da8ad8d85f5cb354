"""Refit-aware rate-distortion curves (rdprune_onnx.reconstruct.refit_curves, --refit-curves)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rdprune_onnx.curves import grid, measure_curves, run_reference
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import prune_count
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, curve_entry, prune
from rdprune_onnx.reconstruct import RefitCandidates, SequentialRefitCandidates
from rdprune_onnx.runtime import SessionConfig
from rdprune_onnx_cli.main import cli
from tests import graphs
from tests.graphs_refit import CASES
from tests.graphs_refit import masked_weight as _masked
from tests.graphs_refit import normal as _normal
from tests.graphs_refit import run as _run

Data = dict[str, np.ndarray]


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


# --------------------------------------------------------------------------------------
# One layer at a time: the refit never makes the layer's calibration error worse


@pytest.mark.parametrize("case", ["cnn", "residual", "attention", "gemm_bias", "conv_stack"])
def test_refit_layer_error_never_above_plain_and_zeros_stay(case: str) -> None:
    model, data = CASES[case][0]()
    outputs = CASES[case][1]
    factory = RefitCandidates(model, data)
    layers = find_layers(model).layers
    dense_out = dict(zip(outputs.values(), _run(model, data, list(outputs.values())), strict=True))
    improved = 0
    for layer in layers:
        dense = read_weight(model, layer.name)
        candidates = factory(layer, dense)
        assert candidates is not None, factory.costs[layer.name]
        assert candidates.names[0] == layer.name
        out = outputs[layer.name]
        for ratio in (0.3, 0.6, 0.9):
            masked = _masked(dense, ratio)
            fed = candidates.make(masked, ratio)
            assert set(fed) == set(candidates.names)
            weight = fed[layer.name]
            assert weight.dtype == dense.dtype and weight.shape == dense.shape
            assert np.array_equal(weight == 0, masked == 0), (layer.name, ratio)
            # The layer's output error with the rest of the model dense, measured by ORT.
            (plain,) = _run(replace_weights(model, {layer.name: masked}), data, [out])
            (refit,) = _run(replace_weights(model, fed), data, [out])
            plain_error, refit_error = _mse(plain, dense_out[out]), _mse(refit, dense_out[out])
            assert refit_error <= plain_error * (1 + 1e-5) + 1e-10, (layer.name, ratio)
            improved += refit_error < plain_error * (1 - 1e-4)
            # The errors the factory computed from its statistics are the measured ones.
            _, before, after = factory.costs[layer.name].errors[-1]
            assert before == pytest.approx(plain_error, rel=1e-3, abs=1e-9)
            assert after == pytest.approx(refit_error, rel=1e-3, abs=1e-9)
    assert improved >= 2 * len(layers)


def test_bias_is_fed_with_the_weight() -> None:
    model, data = CASES["gemm_bias"][0]()
    factory = RefitCandidates(model, data)
    layers = {layer.name: layer for layer in find_layers(model).layers}
    for name, bias in (("w1", "c1"), ("w2", "b2")):
        dense = read_weight(model, name)
        candidates = factory(layers[name], dense)
        assert candidates is not None and candidates.names == [name, bias]
        fed = candidates.make(_masked(dense, 0.6), 0.6)
        assert not np.array_equal(fed[bias], read_weight(model, bias))
        # Pruning nothing feeds the dense layer, bias included.
        same = candidates.make(dense, 0.0)
        assert np.array_equal(same[name], dense)
        assert np.array_equal(same[bias], read_weight(model, bias))
    without = RefitCandidates(model, data, refit_bias=False)
    candidates = without(layers["w1"], read_weight(model, "w1"))
    assert candidates is not None and candidates.names == ["w1"]


def test_forced_solver_and_kept_mask() -> None:
    model, data = CASES["residual"][0]()
    layer = find_layers(model).layers[0]
    dense = read_weight(model, layer.name)
    factory = RefitCandidates(model, data, solver="sparsegpt")
    candidates = factory(layer, dense)
    assert candidates is not None
    for ratio in (0.2, 0.5, 0.8):
        candidates.make(_masked(dense, ratio), ratio)
    assert factory.costs[layer.name].methods == {"sparsegpt": 3}
    # A huge damping makes the refit worse than the mask: the mask is fed.
    factory = RefitCandidates(model, data, damping=1e6)
    candidates = factory(layer, dense)
    assert candidates is not None
    masked = _masked(dense, 0.5)
    assert np.array_equal(candidates.make(masked, 0.5)[layer.name], masked)
    assert factory.costs[layer.name].kept_mask == 1


@pytest.mark.parametrize(
    ("build", "shape", "reason"),
    [(graphs.conv_transpose, (8, 4, 5, 5), "ConvTranspose"), (graphs.loop_model, (8, 4), "sub")],
)
def test_unsupported_layers_get_plain_curves(
    build: Callable[[], onnx.ModelProto], shape: tuple[int, ...], reason: str
) -> None:
    model = build()
    factory = RefitCandidates(model, {"x": _normal(*shape)})
    (layer,) = find_layers(model).layers
    assert factory(layer, read_weight(model, layer.name)) is None
    cost = factory.costs[layer.name]
    assert not cost.refit and reason in (cost.reason or "")


def test_hessian_once_per_layer_and_shared_by_siblings(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = CASES["attention"][0]()
    calls: list[tuple[str, ...]] = []
    original = RefitCandidates._hessian

    def counted(self: RefitCandidates, plans: Any) -> Any:
        calls.append(tuple(p.activation for p in plans))
        return original(self, plans)

    monkeypatch.setattr(RefitCandidates, "_hessian", counted)
    factory = RefitCandidates(model, data)
    for layer in find_layers(model).layers:
        dense = read_weight(model, layer.name)
        candidates = factory(layer, dense)
        assert candidates is not None
        for ratio in grid(11):
            candidates.make(_masked(dense, float(ratio)), float(ratio))
        again = candidates.make(_masked(dense, 0.5), 0.5)  # a mask seen before: no solve
        assert np.count_nonzero(again[layer.name] == 0) == prune_count(0.5, dense.size)
    # wq, wk, wv read the same activation x: one pass; wo one more. Levels add none.
    assert calls == [("x",), ("merged",)]
    assert [factory.costs[n].levels for n in ("wq", "wk", "wv", "wo")] == [10] * 4
    assert factory.costs["wk"].hessian_s == 0.0


# --------------------------------------------------------------------------------------
# Whole curves: output distortion


def _mlp() -> tuple[onnx.ModelProto, Data]:
    return graphs.residual(), {"x": _normal(256, 8)}


def _cnn() -> tuple[onnx.ModelProto, Data]:
    return graphs.cnn(), {"x": _normal(512, 3, 8, 8)}  # more rows than fc1's 288 inputs


@pytest.mark.parametrize("build", [_cnn, _mlp], ids=["cnn", "mlp"])
def test_refit_curves_below_plain_curves(build: Callable[[], tuple[onnx.ModelProto, Data]]) -> None:
    model, data = build()
    layers = find_layers(model).layers
    config = SessionConfig()
    reference = run_reference(model, data, 64, config)
    ratios = grid(11)
    plain = measure_curves(model, layers, reference, ratios=ratios, config=config)
    factory = RefitCandidates(model, data, batch_size=64, config=config)
    refit = measure_curves(
        model, layers, reference, ratios=ratios, config=config, candidates=factory
    )
    improved = 0
    for layer in layers:
        p, r = plain[layer.name].distortion, refit[layer.name].distortion
        # Level 0 is the dense model (the refit curve feeds the dense weight as a graph
        # input, where ORT may pick other kernels than for the constant: float noise).
        assert p[0] == 0.0 and 0.0 <= r[0] <= 1e-12 * max(1.0, p[-1])
        # The layer error is never worse (tested strictly above); the output distortion
        # follows it loosely (a nonlinearity below the layer can weigh the refit's error
        # more): never much worse at a level, and lower over the curve.
        assert np.all(r[1:-1] <= p[1:-1] * 1.25 + 1e-9), (layer.name, r, p)
        improved += r[1:-1].sum() < 0.99 * p[1:-1].sum()
        cost = factory.costs[layer.name]
        assert cost.refit and cost.levels == len(ratios) - 1
    # The first layer reads the white-noise input, where a refit gains next to nothing.
    assert improved >= len(layers) - 1


# --------------------------------------------------------------------------------------
# Pipeline: cache key, settings, CLI


def test_cache_key_separates_plain_and_refit_curves() -> None:
    model, data = _mlp()
    layers = find_layers(model).layers
    plain = curve_entry(model, layers, data, PruneSettings(ratio=0.5), "cpu", 32)
    refit = curve_entry(model, layers, data, PruneSettings(ratio=0.5, refit_curves=True), "cpu", 32)
    other = curve_entry(
        model,
        layers,
        data,
        PruneSettings(ratio=0.5, refit_curves=True, refit_solver="sparsegpt"),
        "cpu",
        32,
    )
    assert "refit" not in plain.settings  # plain curves keep their old key
    assert refit.settings["refit"] == {"solver": "auto", "damping": 0.01}
    assert len({plain.key, refit.key, other.key}) == 3
    assert not plain.matches(refit)


def test_prune_with_refit_curves_uses_its_own_cache(tmp_path: Path) -> None:
    path = tmp_path / "mlp.onnx"
    onnx.save_model(graphs.residual(), str(path))
    spec = CalibrationSpec(synthetic=128, batch_size=64)
    cache = tmp_path / "cache"

    def run(**kwargs: Any) -> Any:
        settings = PruneSettings(ratio=0.6, levels=11, **kwargs)
        return prune(path, settings, spec, write=False, cache_dir=cache)

    plain = run(reconstruct=True)
    refit = run(refit_curves=True)
    assert len(list(cache.iterdir())) == 2
    assert refit.settings.reconstruct  # implied
    assert "curves_refit_solve" in refit.timings and "curves_refit_solve" not in plain.timings
    assert plain.curves is not None and refit.curves is not None
    assert any(
        not np.allclose(plain.curves[n].distortion, refit.curves[n].distortion)
        for n in plain.curves
    )
    again = run(refit_curves=True)  # from the cache: same curves, no refit measured
    assert "curves_refit_solve" not in again.timings
    assert again.curves is not None
    for name, curve in refit.curves.items():
        np.testing.assert_array_equal(again.curves[name].distortion, curve.distortion)


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_cli_refit_curves_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "cnn.onnx"
    onnx.save_model(graphs.cnn(), str(path))
    report = tmp_path / "r.json"
    common = ["--synthetic", "64", "--levels", "11", "--no-cache", "--no-progress"]
    code, text = _cli(
        "prune",
        str(path),
        "--ratio",
        "0.7",
        "--refit-curves",
        "-o",
        str(tmp_path / "p.onnx"),
        "--report",
        str(report),
        *common,
    )
    assert code == 0, text
    data = json.loads(report.read_text())
    assert data["settings"]["refit_curves"] is True
    assert data["settings"]["reconstruct"] is True  # --refit-curves implies --reconstruct
    assert all(layer["refit"] is not None for layer in data["layers"])
    assert data["timings_s"]["curves_refit_solve"] >= 0
    assert data["achieved_ratio"] >= 0.7
    # `curves --refit-curves` records it in the file.
    curves = tmp_path / "c.json"
    code, text = _cli(
        "curves", str(path), "-o", str(curves), "--refit-curves", "--refit-solver", "exact",
        "--synthetic", "64", "--levels", "11", "--no-cache", "--no-progress",
    )  # fmt: skip
    assert code == 0, text
    assert "each point pruned and refit" in text
    saved = json.loads(curves.read_text())
    assert saved["settings"]["refit"] == {"solver": "exact", "damping": 0.01}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "uniform", "--synthetic", "8"], "--refit-curves"),
        (["--steps", "2", "--synthetic", "8"], "--steps"),
        ([], "no calibration data"),
    ],
)
def test_cli_refit_curves_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    path = tmp_path / "cnn.onnx"
    onnx.save_model(graphs.cnn(), str(path))
    code, text = _cli(
        "prune", str(path), "--ratio", "0.5", "--refit-curves", "--no-cache", "--no-progress",
        *extra,
    )  # fmt: skip
    assert code == 1 and message in text, text


def test_sequential_candidates_take_the_options_of_refit_candidates() -> None:
    """SequentialRefitCandidates forwards its keyword options to RefitCandidates, which
    checks them (an unknown one or a bad solver is refused, not ignored)."""
    model, data = CASES["gemm_bias"][0]()
    base = {layer.name: read_weight(model, layer.name) for layer in find_layers(model).layers}
    factory = SequentialRefitCandidates(
        model, base, data, batch_size=7, solver="exact", damping=0.5, select=True
    )
    assert (factory.batch_size, factory.solver, factory.damping) == (7, "exact", 0.5)
    assert factory.select and factory.select_refits and factory.refit_bias
    with pytest.raises(TypeError):
        SequentialRefitCandidates(model, base, data, solvr="exact")
    with pytest.raises(UserError):
        SequentialRefitCandidates(model, base, data, solver="nope")
