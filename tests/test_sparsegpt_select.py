"""SparseGPT mask selection (rdprune_onnx.reconstruct.solve_sparsegpt_select) against a
straightforward dense OBS reference, and its use in reconstruct / refit-aware curves."""

from __future__ import annotations

import logging
import unittest.mock
from fractions import Fraction

import numpy as np
import pytest

from rdprune_onnx.curves import grid, measure_distortion, run_reference
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.reconstruct import (
    SELECT_METHOD,
    RefitCandidates,
    SequentialRefitCandidates,
    block_quotas,
    damped_hessian,
    reconstruct,
    refit,
    remeasure_curves,
    solve_sparsegpt_select,
)
from rdprune_onnx.runtime import Session, SessionConfig
from tests import graphs_refit
from tests.graphs_refit import CASES, masked_weight
from tests.graphs_refit import masked_layers as _masked
from tests.graphs_refit import output_mse as _output_mse


def _quotas_reference(eligible: list[int], count: int) -> list[int]:
    """Largest remainder, written out with exact fractions."""
    total = sum(eligible)
    shares = [Fraction(e * count, total) for e in eligible]
    quotas = [int(s) for s in shares]
    ranked = sorted(range(len(eligible)), key=lambda i: (-(shares[i] - quotas[i]), i))
    for i in ranked[: count - sum(quotas)]:
        quotas[i] += 1
    return quotas


def obs_reference(
    damped: np.ndarray,
    start: np.ndarray,
    count: int,
    block: int,
    prunable: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense OBS, one group: ``damped`` (D, D), ``start`` (D, r). Column by column, the
    inverse of the remaining Hessian recomputed at every step; the mask of each block
    chosen at its start by saliency w² / [H_F⁻¹]_00 (the block's quota, zeros first)."""
    d, r = start.shape
    rows_ok = np.ones(d, bool) if prunable is None else prunable
    w = start.T.copy()  # (r, D)
    zero = (start == 0).T & rows_ok[None, :]
    eligible = ~(start == 0).T & rows_ok[None, :]
    blocks = [(i1, min(i1 + block, d)) for i1 in range(0, d, block)]
    quotas = _quotas_reference(
        [int(eligible[:, a:b].sum()) for a, b in blocks], count - int(zero.sum())
    )
    keep = np.ones((r, d), bool)
    for (a, b), quota in zip(blocks, quotas, strict=True):
        scores = []
        for j in range(a, b):
            hf = np.linalg.inv(damped[j:, j:])[0, 0]
            for row in range(r):
                if eligible[row, j]:
                    scores.append((w[row, j] ** 2 / hf, j, row))
        for _, j, row in sorted(scores)[:quota]:
            keep[row, j] = False
        keep[:, a:b] &= ~zero[:, a:b]
        for j in range(a, b):
            hf = np.linalg.inv(damped[j:, j:])
            target = np.where(keep[:, j], w[:, j], 0.0)
            err = (w[:, j] - target) / hf[0, 0]
            w[:, j:] -= np.outer(err, hf[0, :])
            w[:, j] = target
    w[~keep] = 0.0
    return w.T, keep.T


def _layer(d: int, r: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d))
    w = rng.standard_normal((d, r))
    h = x.T @ x
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(d)
    return damped, w, h @ w


@pytest.mark.parametrize("block", [4, 7, 128])
@pytest.mark.parametrize("count", [3, 4, 37, 90, 144])
def test_select_matches_dense_obs_reference(block: int, count: int) -> None:
    damped, w, _ = _layer(18, 8, 200)
    w[3, 2] = w[11, 5] = w[0, 0] = 0.0  # already-zero entries: pruned first
    out, keep = solve_sparsegpt_select(damped[None], w[None], count, block_size=block)
    ref_w, ref_keep = obs_reference(damped, w, count, block)
    np.testing.assert_array_equal(keep[0], ref_keep)
    np.testing.assert_allclose(out[0], ref_w, atol=1e-5, rtol=0)
    assert int((~keep).sum()) == count
    assert np.all(out[~keep] == 0) and not np.any(keep[0][w == 0])


def test_select_from_the_least_squares_optimum_with_a_bias_row() -> None:
    """``cross`` given: the sweep starts from (H + λI)⁻¹ cross; the bias row (last) is
    never pruned, only updated."""
    damped, w, cross = _layer(13, 6, 120, seed=4)
    prunable = np.arange(13) < 12
    count = 40
    out, keep = solve_sparsegpt_select(
        damped[None], w[None], count, cross=cross[None], prunable=prunable, block_size=5
    )
    start = np.linalg.solve(damped, cross)
    ref_w, ref_keep = obs_reference(damped, start, count, 5, prunable)
    np.testing.assert_array_equal(keep[0], ref_keep)
    np.testing.assert_allclose(out[0], ref_w, atol=1e-5, rtol=0)
    assert keep[0, 12].all() and int((~keep).sum()) == count


def test_grouped_layer_each_group_against_the_reference() -> None:
    """Grouped Conv: one Hessian per group; the count splits over all (group, block) units."""
    layers = [_layer(10, 4, 80, seed=s) for s in (1, 2, 3)]
    damped = np.stack([h for h, _, _ in layers])
    w = np.stack([x for _, x, _ in layers])
    w[1, 2, :] = 0.0  # a dead input in group 1
    count = 61
    out, keep = solve_sparsegpt_select(damped, w, count, block_size=4)
    assert int((~keep).sum()) == count
    eligible = [int((w[k][a : a + 4] != 0).sum()) for k in range(3) for a in (0, 4, 8)]
    quotas = _quotas_reference(eligible, count - int((w == 0).sum()))
    for k in range(3):
        per_group = sum(quotas[3 * k : 3 * k + 3]) + int((w[k] == 0).sum())
        ref_w, ref_keep = obs_reference(damped[k], w[k], per_group, 4)
        np.testing.assert_array_equal(keep[k], ref_keep)
        np.testing.assert_allclose(out[k], ref_w, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("eligible", "count"),
    [([128, 128, 44], 150), ([5, 5, 5], 7), ([3, 0, 9, 4], 11), ([1, 1, 1, 1], 2), ([7], 7)],
)
def test_block_quotas_largest_remainder(eligible: list[int], count: int) -> None:
    quotas = block_quotas(np.array(eligible), count)
    assert quotas.tolist() == _quotas_reference(eligible, count)
    assert int(quotas.sum()) == count and np.all(quotas <= np.array(eligible))


def test_select_refuses_impossible_counts() -> None:
    damped, w, _ = _layer(6, 3, 40)
    w[0, 0] = 0.0
    with pytest.raises(ValueError):
        solve_sparsegpt_select(damped[None], w[None], 0)  # below the dense zeros
    with pytest.raises(ValueError):
        solve_sparsegpt_select(damped[None], w[None], 19)  # more than the entries


# --------------------------------------------------------------------------------------
# reconstruct(select=True, inputs=...)


@pytest.mark.parametrize("inputs", ["sequential", "dense"])
@pytest.mark.parametrize("case", ["cnn", "conv_stack", "gemm_bias", "attention", "residual"])
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_select_keeps_counts_and_is_never_worse(case: str, ratio: float, inputs: str) -> None:
    model, data = CASES[case][0]()
    pruned = _masked(model, ratio)
    layers = find_layers(model).layers
    given = reconstruct(model, pruned, layers, data, inputs=inputs)
    chosen = reconstruct(model, pruned, layers, data, inputs=inputs, select=True)
    refit = [r for r in chosen.layers if r.method != "skipped"]
    assert refit and all(r.method == SELECT_METHOD for r in refit)
    for name, weight in chosen.weights.items():
        assert np.count_nonzero(weight == 0) == np.count_nonzero(pruned[name] == 0), name
        assert weight.dtype == pruned[name].dtype
        dense = read_weight(model, name)
        assert not np.any(weight[dense == 0]), "dense zeros stay zero"
    for info in refit:
        assert info.error_after <= info.error_before
    # The first layer reads the same statistics in both runs: never worse than the
    # given mask's refit there (later layers see different upstream weights).
    first_given = next(r for r in given.layers if r.name == refit[0].name)
    assert refit[0].error_after <= first_given.error_after
    if inputs == "dense":  # the statistics never depend on upstream choices
        for info in refit:
            plain = next(r for r in given.layers if r.name == info.name)
            assert info.error_after <= plain.error_after
            assert info.error_before == pytest.approx(plain.error_before)


def test_select_beats_the_magnitude_mask_refit_on_a_correlated_layer() -> None:
    model = graphs_refit.linear(96, 24)
    rng = np.random.default_rng(3)
    scale = np.exp(rng.standard_normal(96))  # uneven input norms: magnitude is misled
    data = {"x": (rng.standard_normal((500, 96)) * scale + 0.2).astype(np.float32)}
    pruned = _masked(model, 0.7)
    layers = find_layers(model).layers
    given = reconstruct(model, pruned, layers, data).layers[0]
    chosen = reconstruct(model, pruned, layers, data, select=True)
    info = chosen.layers[0]
    assert "kept" not in str(info.reason) and info.bias == "b"  # the selected mask won
    assert info.error_after < 0.5 * given.error_after
    assert np.count_nonzero(chosen.weights["w"] == 0) == np.count_nonzero(pruned["w"] == 0)
    assert not np.array_equal(chosen.weights["w"] == 0, pruned["w"] == 0)
    assert _output_mse(model, chosen.all_weights(), data) < _output_mse(model, pruned, data)


def test_select_falls_back_to_the_given_mask_when_not_better(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, data = CASES["gemm_bias"][0]()
    pruned = _masked(model, 0.6)
    layers = find_layers(model).layers
    given = reconstruct(model, pruned, layers, data, inputs="dense")

    def bad(damped: np.ndarray, dense: np.ndarray, count: int, **kw: object) -> tuple:
        keep = np.ones(dense.shape, bool)
        keep.reshape(-1)[:count] = False
        return np.where(keep, 50.0, 0.0), keep

    monkeypatch.setattr(refit, "solve_sparsegpt_select", bad)
    chosen = reconstruct(model, pruned, layers, data, inputs="dense", select=True)
    for info, plain in zip(chosen.layers, given.layers, strict=True):
        assert info.method == SELECT_METHOD and "not better" in str(info.reason)
        assert info.error_after == plain.error_after
    for name, weight in given.all_weights().items():
        np.testing.assert_array_equal(chosen.all_weights()[name], weight)


def test_dense_and_sequential_inputs_differ_where_they_should() -> None:
    """gemm -> tanh -> matmul + add: the first layer reads the dense input either way; the
    second reads tanh(pruned first layer) only in sequential mode."""
    model, data = CASES["gemm_bias"][0]()
    pruned = _masked(model, 0.7)
    layers = find_layers(model).layers
    seq = reconstruct(model, pruned, layers, data, inputs="sequential", solver="exact")
    den = reconstruct(model, pruned, layers, data, inputs="dense", solver="exact")
    np.testing.assert_allclose(den.weights["w1"], seq.weights["w1"], rtol=1e-4, atol=1e-6)
    assert not np.allclose(den.weights["w2"], seq.weights["w2"], rtol=1e-3, atol=1e-4)
    # dense mode: the second layer's error before the refit is the masked layer on the
    # dense activation, computed here by hand
    x = data["x"].astype(np.float64)
    w1, c1 = read_weight(model, "w1").astype(np.float64), read_weight(model, "c1")
    t = np.tanh(0.5 * x @ w1.T + 2.0 * c1)
    w2 = read_weight(model, "w2").astype(np.float64)
    expected = np.mean((t @ pruned["w2"].astype(np.float64) - t @ w2) ** 2)
    second = next(r for r in den.layers if r.name == "w2")
    assert second.error_before == pytest.approx(expected, rel=1e-6)
    seq_second = next(r for r in seq.layers if r.name == "w2")
    assert seq_second.error_before > second.error_before  # it sees the pruned first layer
    with pytest.raises(UserError, match="unknown refit inputs"):
        reconstruct(model, pruned, layers, data, inputs="calibration")


def test_select_is_deterministic() -> None:
    model, data = CASES["conv_stack"][0]()
    pruned = _masked(model, 0.8)
    layers = find_layers(model).layers
    runs = [reconstruct(model, pruned, layers, data, select=True) for _ in range(2)]
    a, b = (r.all_weights() for r in runs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes()


# --------------------------------------------------------------------------------------
# Refit hygiene: padded rows, damping relative to the Hessian


def _token_data(junk: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, t = 40, 9
    lengths = rng.integers(2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    x = rng.standard_normal((n, t, 6)).astype(np.float32)
    pad = mask == 0
    x[pad] = (junk * np.random.default_rng(seed + 1).standard_normal((int(pad.sum()), 6))).astype(
        np.float32
    )
    return {"x": x, "attention_mask": mask}


def _rename(data: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {("x" if k == "x" else name): v for k, v in data.items()}


@pytest.mark.parametrize("inputs", ["sequential", "dense"])
@pytest.mark.parametrize("select", [False, True])
def test_padded_rows_are_not_rows(
    inputs: str, select: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = graphs_refit.token_mlp()
    layers = find_layers(model).layers
    quiet, loud = _token_data(1.0), _token_data(1e3)
    pruned = _masked(model, 0.5)
    kw = {"inputs": inputs, "select": select, "solver": "exact"}
    a = reconstruct(model, pruned, layers, quiet, **kw)
    b = reconstruct(model, pruned, layers, loud, **kw)
    for name in ("w1", "w2"):  # padded positions do not change the refit at all
        np.testing.assert_array_equal(a.weights[name], b.weights[name])
    # the same model with an input the rule does not recognise counts every row
    other = graphs_refit.token_mlp(mask="segments")
    c = reconstruct(other, pruned, layers, _rename(loud, "segments"), **kw)
    assert not np.allclose(c.weights["w1"], b.weights["w1"], rtol=1e-3)
    # the few-rows warning counts real rows only: one sample, 3 real positions of 9
    one = _token_data(1.0)
    one["attention_mask"] = (np.arange(9) < 3).astype(np.int64)[None]
    one["x"] = one["x"][:1]
    with caplog.at_level(logging.WARNING, logger="rdprune_onnx.reconstruct"):
        reconstruct(model, pruned, layers, one, **kw)
    assert "w1: 3 calibration rows for 7 inputs" in caplog.text


def test_damping_is_relative_to_the_hessian() -> None:
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 7, 7))
    h = h @ h.transpose(0, 2, 1) + np.eye(7)
    out = damped_hessian(h, 0.01, 6)  # 6 weight inputs + a bias column
    for k in range(2):
        lam = 0.01 * np.mean(np.diag(h[k])[:6])
        np.testing.assert_allclose(np.diag(out[k] - h[k])[:6], lam)
        assert out[k, 6, 6] - h[k, 6, 6] == pytest.approx(0.01 * h[k, 6, 6])
        off = ~np.eye(7, dtype=bool)
        np.testing.assert_array_equal(out[k][off], h[k][off])


@pytest.mark.parametrize("select", [False, True])
def test_scaling_the_activations_scales_the_refit(select: bool) -> None:
    """x -> 1000 x with W -> W / 1000 is the same layer: the refit weights scale back."""
    model = graphs_refit.linear(20, 6)
    w = read_weight(model, "w")
    big = replace_weights(model, {"w": w / np.float32(1000)})
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((200, 20)) + 0.5).astype(np.float32)
    layers = find_layers(model).layers
    pruned = _masked(model, 0.6)
    small = reconstruct(model, pruned, layers, {"x": x}, select=select, solver="exact")
    scaled_pruned = {"w": pruned["w"] / np.float32(1000)}
    large = reconstruct(
        big, scaled_pruned, layers, {"x": x * np.float32(1000)}, select=select, solver="exact"
    )
    np.testing.assert_allclose(large.weights["w"] * 1000, small.weights["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(large.biases["b"], small.biases["b"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(large.weights["w"] == 0, small.weights["w"] == 0)


# --------------------------------------------------------------------------------------
# Refit-aware curves with SparseGPT selection


@pytest.mark.parametrize("case", ["cnn", "gemm_bias", "conv_stack", "attention"])
def test_refit_curves_select_counts_and_never_worse(case: str) -> None:
    model, data = CASES[case][0]()
    plain = RefitCandidates(model, data)
    chosen = RefitCandidates(model, data, select=True)
    selected_somewhere = False
    for layer in find_layers(model).layers:
        dense = read_weight(model, layer.name)
        a, b = plain(layer, dense), chosen(layer, dense)
        assert a is not None and b is not None and a.names == b.names
        for ratio in (0.5, 0.8, 0.95):
            masked = masked_weight(dense, ratio)
            fed = b.make(masked, ratio)
            weight = fed[layer.name]
            assert np.count_nonzero(weight == 0) == np.count_nonzero(masked == 0)
            again = b.make(masked.copy(), ratio)  # the memo answers: the same arrays
            assert all(again[k] is fed[k] for k in fed)
            a.make(masked, ratio)
            _, before, after = chosen.costs[layer.name].errors[-1]
            _, before_plain, after_plain = plain.costs[layer.name].errors[-1]
            assert before == pytest.approx(before_plain)
            assert after <= after_plain
            selected_somewhere |= not np.array_equal(weight == 0, masked == 0)
    assert selected_somewhere
    assert all(cost.levels == 3 for cost in chosen.costs.values())  # memo: no second solve


# --------------------------------------------------------------------------------------
# Curves re-measured on the pruned-and-refit model


def test_sequential_candidates_reproduce_the_sequential_refit() -> None:
    """At the base's own ratio, a layer's candidate is exactly what reconstruct applied
    (same X̂ from the upstream pruned-and-refit layers, same dense targets), and the
    re-measured curve there is the base model's distortion."""
    model, data = CASES["gemm_bias"][0]()
    layers = find_layers(model).layers
    pruned = _masked(model, 0.7)
    rec = reconstruct(model, pruned, layers, data, solver="exact")
    base = rec.all_weights()
    factory = SequentialRefitCandidates(model, base, data, solver="exact")
    for layer in layers:
        candidates = factory(layer, base[layer.name])
        assert candidates is not None
        fed = candidates.make(base[layer.name], 0.7)
        np.testing.assert_allclose(fed[layer.name], rec.weights[layer.name], rtol=1e-5, atol=1e-7)
        dense = read_weight(model, layer.name)
        low = candidates.make(base[layer.name], 0.2)  # below the base's ratio: from dense
        assert np.count_nonzero(low[layer.name] == 0) == round(0.2 * dense.size)
        np.testing.assert_array_equal(candidates.make(base[layer.name], 0.0)[layer.name], dense)
    reference = run_reference(model, data, 32, SessionConfig())
    curves, _ = remeasure_curves(model, layers, base, data, reference, ratios=grid(11))
    measured = measure_distortion(Session(replace_weights(model, base)), reference, "mse")
    for layer in layers:
        curve = curves[layer.name]
        at = int(np.argmin(np.abs(np.asarray(curve.ratios) - 0.7)))
        assert curve.distortion[at] == pytest.approx(measured, rel=1e-4)
        assert curve.distortion[-1] > curve.distortion[at]


def test_select_keeps_dense_zeros_pruned_in_reconstruct() -> None:
    model = graphs_refit.linear(40, 12)
    w = read_weight(model, "w").copy()
    w[::3, ::2] = 0.0  # a partly sparse dense model
    model = replace_weights(model, {"w": w})
    rng = np.random.default_rng(2)
    data = {"x": rng.standard_normal((300, 40)).astype(np.float32)}
    layers = find_layers(model).layers
    for ratio in (0.3, 0.6, 0.9):
        pruned = _masked(model, ratio)
        chosen = reconstruct(model, pruned, layers, data, select=True, inputs="dense")
        out = chosen.weights["w"]
        assert np.count_nonzero(out == 0) == np.count_nonzero(pruned["w"] == 0)
        assert np.all(out[w == 0] == 0)
        assert chosen.layers[0].method == SELECT_METHOD


def test_select_without_the_fixed_mask_refits() -> None:
    """select_refits=False: SparseGPT's own weights (no exact solves), kept unless worse
    than plain masking; counts exact, never worse than the plain mask."""
    model = graphs_refit.linear(96, 24)
    rng = np.random.default_rng(3)
    scale = np.exp(rng.standard_normal(96))
    data = {"x": (rng.standard_normal((500, 96)) * scale + 0.2).astype(np.float32)}
    pruned = _masked(model, 0.7)
    layers = find_layers(model).layers
    calls: list[str] = []
    original = refit.refit_masked

    def counting(*args: object, **kw: object) -> object:
        calls.append("solve")
        return original(*args, **kw)  # type: ignore[arg-type]

    with unittest.mock.patch.object(refit, "refit_masked", counting):
        fast = reconstruct(model, pruned, layers, data, select=True, select_refits=False)
    assert calls == []
    info = fast.layers[0]
    assert info.method == SELECT_METHOD and info.reason is None
    assert info.error_after < info.error_before
    assert np.count_nonzero(fast.weights["w"] == 0) == np.count_nonzero(pruned["w"] == 0)
    full = reconstruct(model, pruned, layers, data, select=True).layers[0]
    assert full.error_after <= info.error_after
    factory = RefitCandidates(model, data, select=True, select_refits=False)
    candidates = factory(layers[0], read_weight(model, "w"))
    assert candidates is not None
    fed = candidates.make(pruned["w"], 0.7)
    assert np.count_nonzero(fed["w"] == 0) == np.count_nonzero(pruned["w"] == 0)
