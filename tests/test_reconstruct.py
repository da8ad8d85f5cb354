"""Layer-wise weight reconstruction after masking (rdprune_onnx.reconstruct)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest

from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import prune_count
from rdprune_onnx.reconstruct import (
    Reconstruction,
    choose_solver,
    conv_pads,
    im2col,
    reconstruct,
    sequential,
    solve_exact,
    solve_sparsegpt,
)
from rdprune_onnx.runtime import Session
from tests import graphs, graphs_refit
from tests.graphs_refit import CASES, Data
from tests.graphs_refit import masked_layers as _masked
from tests.graphs_refit import normal as _normal
from tests.graphs_refit import output_mse as _output_mse
from tests.graphs_refit import run as _run


def _refit(case: str, ratio: float, **kwargs: Any) -> tuple[Reconstruction, Data, Data]:
    """Refit a graph of CASES masked by magnitude at ``ratio``: (result, masked, data)."""
    model, data = CASES[case][0]()
    pruned = _masked(model, ratio)
    rec = reconstruct(model, pruned, find_layers(model).layers, data, **kwargs)
    return rec, pruned, data


# --------------------------------------------------------------------------------------
# im2col against ONNX Runtime's Conv


def _conv_via_patches(x: np.ndarray, w: np.ndarray, attrs: dict, group: int) -> np.ndarray:
    k = w.ndim - 2
    kernel = w.shape[2:]
    strides = attrs.get("strides", [1] * k)
    dilations = attrs.get("dilations", [1] * k)
    pads = conv_pads(
        x.shape[2:], kernel, strides, dilations, attrs.get("auto_pad", "NOTSET"), attrs.get("pads")
    )
    patches = im2col(
        x.astype(np.float64), kernel, strides=strides, pads=pads, dilations=dilations, group=group
    )
    m = w.shape[0]
    wg = w.astype(np.float64).reshape(group, m // group, -1)
    out = patches @ wg.transpose(0, 2, 1)  # (group, rows, M/group)
    return out.transpose(1, 0, 2).reshape(x.shape[0], -1, m)  # (N, positions, M)


def _conv_cases() -> list[dict]:
    cases: list[dict] = [
        {"x": (2, 3, 7, 7), "w": (4, 3, 3, 3), "strides": [2, 2], "pads": [1, 1, 1, 1]},
        {"x": (1, 4, 9, 8), "w": (6, 2, 3, 2), "group": 2, "dilations": [2, 1]},
        {"x": (2, 4, 8, 8), "w": (4, 1, 3, 3), "group": 4, "auto_pad": "SAME_UPPER"},
        {"x": (2, 2, 8, 7), "w": (3, 2, 2, 3), "strides": [2, 3], "auto_pad": "SAME_LOWER"},
        {"x": (2, 2, 6, 6), "w": (3, 2, 3, 3), "auto_pad": "VALID", "strides": [2, 2]},
        {"x": (2, 3, 11), "w": (5, 3, 4), "strides": [3], "pads": [2, 1], "dilations": [2]},
        {"x": (1, 2, 5, 6, 4), "w": (4, 2, 2, 3, 2), "pads": [1, 0, 1, 0, 1, 1]},
    ]
    rng = np.random.default_rng(7)
    for _ in range(20):
        rank = int(rng.integers(1, 3))
        group = int(rng.choice([1, 2, 3]))
        c = group * int(rng.integers(1, 3))
        m = group * int(rng.integers(1, 3))
        kernel = [int(v) for v in rng.integers(1, 4, rank)]
        dil = [int(v) for v in rng.integers(1, 3, rank)]
        spatial = [int(rng.integers((k - 1) * d + 1, 10)) for k, d in zip(kernel, dil, strict=True)]
        case = {
            "x": (2, c, *spatial),
            "w": (m, c // group, *kernel),
            "group": group,
            "strides": [int(v) for v in rng.integers(1, 4, rank)],
            "dilations": dil,
        }
        if rng.random() < 0.3:
            case["auto_pad"] = str(rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID"]))
            if case["auto_pad"] != "VALID":  # ORT has no dilation with SAME padding
                case["dilations"] = [1] * rank
        else:
            case["pads"] = [int(v) for v in rng.integers(0, 3, 2 * rank)]
        cases.append(case)
    return cases


@pytest.mark.parametrize("case", _conv_cases())
def test_im2col_matches_ort_conv(case: dict) -> None:
    attrs = {k: v for k, v in case.items() if k not in ("x", "w", "group")}
    group = case.get("group", 1)
    model, w = graphs_refit.conv(case["x"], case["w"], group=group, **attrs)
    x = _normal(*case["x"])
    (expected,) = Session(model).run({"x": x})
    got = _conv_via_patches(x, w, attrs, group)
    n, m = expected.shape[:2]
    assert got.shape[1] == int(np.prod(expected.shape[2:]))
    np.testing.assert_allclose(got, expected.reshape(n, m, -1).transpose(0, 2, 1), atol=1e-4)


# --------------------------------------------------------------------------------------
# The refit guarantee, and the errors it reports


@pytest.mark.parametrize("case", ["cnn", "residual", "attention", "conv_stack", "gemm_bias"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_refit_never_worse_and_reports_measured_errors(case: str, ratio: float) -> None:
    model, data = CASES[case][0]()
    outputs = CASES[case][1]
    pruned = _masked(model, ratio)
    rec = reconstruct(model, pruned, find_layers(model).layers, data)
    assert {r.name for r in rec.layers} == set(outputs)
    names = [outputs[r.name] for r in rec.layers]
    dense = _run(model, data, names)
    refit = _run(replace_weights(model, rec.all_weights()), data, names)
    improved = 0
    for info, a, b in zip(rec.layers, dense, refit, strict=True):
        assert info.method in ("exact", "sparsegpt"), info
        assert info.error_after <= info.error_before
        improved += info.error_after < info.error_before
        # error_after is the layer's real output error in the refit model (its inputs come
        # from the refit upstream layers, as in the refit).
        direct = float(np.mean((a.astype(np.float64) - b) ** 2))
        assert info.error_after == pytest.approx(direct, rel=1e-3, abs=1e-9), info.name
    assert improved >= len(rec.layers) - 1
    # The first layer sees the dense inputs: its error before is plain masking's.
    first = rec.layers[0]
    (masked_out,) = _run(replace_weights(model, pruned), data, [outputs[first.name]])
    direct = float(np.mean((dense[0].astype(np.float64) - masked_out) ** 2))
    assert first.error_before == pytest.approx(direct, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_refit_improves_the_cnn_output(ratio: float) -> None:
    model = graphs.cnn()
    # More samples than fc1's 288 inputs: with fewer, the exact refit fits the calibration
    # set (and loses on held-out inputs).
    data = {"x": _normal(512, 3, 8, 8)}
    pruned = _masked(model, ratio)
    rec = reconstruct(model, pruned, find_layers(model).layers, data)
    plain = _output_mse(model, pruned, data)
    refit = _output_mse(model, rec.all_weights(), data)
    assert refit < 0.8 * plain
    held_out = {"x": _normal(256, 3, 8, 8, seed=99)}
    assert _output_mse(model, rec.all_weights(), held_out) < 0.9 * _output_mse(
        model, pruned, held_out
    )


def test_kept_mask_when_refit_does_not_help() -> None:
    # A huge damping shrinks the solution towards zero: worse than plain masking.
    rec, pruned, _ = _refit("residual", 0.5, damping=1e6)
    for info in rec.layers:
        assert info.reason == "refit did not help; kept mask"
        assert info.error_after == info.error_before
        assert np.array_equal(rec.weights[info.name], pruned[info.name])
    assert rec.biases == {}


# --------------------------------------------------------------------------------------
# Masks, dtypes, unchanged layers


@pytest.mark.parametrize("case", ["cnn", "conv_stack", "gemm_bias", "mlp_forms", "attention"])
def test_pruned_positions_stay_zero(case: str) -> None:
    rec, pruned, _ = _refit(case, 0.7)
    assert set(rec.weights) == set(pruned)
    for name, masked in pruned.items():
        refit = rec.weights[name]
        assert refit.dtype == masked.dtype and refit.shape == masked.shape
        assert np.array_equal(refit == 0, masked == 0), name
        assert np.count_nonzero(refit == 0) == prune_count(0.7, masked.size)
    changed = [n for n in pruned if not np.array_equal(rec.weights[n], pruned[n])]
    assert changed  # the refit did something


def test_unchanged_layer_is_returned_as_is() -> None:
    model, data = CASES["cnn"][0]()
    pruned = _masked(model, 0.6)
    dense_w2 = read_weight(model, "w2")
    pruned["w2"] = dense_w2.copy()  # nothing pruned in w2
    # w4 with zeros of its own, "pruned" only where it already was zero
    w4 = read_weight(model, "w4").copy()
    w4[:, :3] = 0
    model = replace_weights(model, {"w4": w4})
    pruned["w4"] = w4.copy()
    rec = reconstruct(model, pruned, find_layers(model).layers, data)
    info = {r.name: r for r in rec.layers}
    for name, expected in (("w2", dense_w2), ("w4", w4)):
        assert info[name].method == "skipped"
        assert info[name].reason == "mask removes nothing; unchanged"
        assert np.array_equal(rec.weights[name], expected)
    assert info["w1"].method != "skipped" and info["w3"].method != "skipped"


def test_float16_weights() -> None:
    model = graphs_refit.matmul_fp16()
    data = {"x": _normal(32, 5, 8, dtype=np.float16)}
    pruned = _masked(model, 0.6)
    rec = reconstruct(model, pruned, find_layers(model).layers, data)
    for info in rec.layers:
        assert info.method == "exact" and info.error_after < info.error_before
        assert rec.weights[info.name].dtype == np.float16
        assert np.array_equal(rec.weights[info.name] == 0, pruned[info.name] == 0)


# --------------------------------------------------------------------------------------
# Layer forms


def test_attention_matmuls_on_3d_activations() -> None:
    rec, _, _ = _refit("attention", 0.6)
    assert [r.name for r in rec.layers] == ["wq", "wk", "wv", "wo"]
    assert all(r.method == "exact" and r.error_after < r.error_before for r in rec.layers)


def test_gemm_trans_b_alpha_beta_and_matmul_add_bias() -> None:
    model, data = CASES["gemm_bias"][0]()
    pruned = _masked(model, 0.6)
    rec = reconstruct(model, pruned, find_layers(model).layers, data)
    info = {r.name: r for r in rec.layers}
    assert info["w1"].bias == "c1" and info["w2"].bias == "b2"
    assert set(rec.biases) == {"c1", "b2"}
    assert rec.biases["c1"].shape == (10,) and rec.biases["c1"].dtype == np.float32
    assert not np.array_equal(rec.biases["c1"], read_weight(model, "c1"))
    # Without bias refit: no biases, still an improvement, never a new bias.
    plain = reconstruct(model, pruned, find_layers(model).layers, data, refit_bias=False)
    assert plain.biases == {}
    assert all(r.bias is None and r.error_after < r.error_before for r in plain.layers)
    # Refitting the bias too does at least as well.
    for r in plain.layers:
        assert info[r.name].error_after <= r.error_after * (1 + 1e-9)


def test_mlp_forms_left_weight_shared_weight_and_subgraph() -> None:
    rec, _, _ = _refit("mlp_forms", 0.5)
    info = {r.name: r for r in rec.layers}
    for name in ("w_left", "w_const", "w_shared", "w_gemm"):
        assert info[name].method == "exact", info[name]
        assert info[name].error_after < info[name].error_before
    assert info["w_gemm"].bias == "c_gemm"  # Gemm alpha=0.5, beta=2 with C of shape (5,)
    assert info["w_if"].method == "skipped" and "subgraph" in (info["w_if"].reason or "")
    assert set(rec.biases) == {"c_gemm"}


@pytest.mark.parametrize(
    ("build", "shape", "reason"),
    [
        (graphs.loop_model, (32, 4), "subgraph"),
        (graphs.conv_transpose, (8, 4, 5, 5), "ConvTranspose"),
    ],
)
def test_unsupported_layers_are_skipped(
    build: Callable[[], onnx.ModelProto], shape: tuple[int, ...], reason: str
) -> None:
    model = build()
    pruned = _masked(model, 0.5)
    rec = reconstruct(model, pruned, find_layers(model).layers, {"x": _normal(*shape)})
    (info,) = rec.layers
    assert info.method == "skipped" and reason in (info.reason or "")
    assert np.array_equal(rec.weights[info.name], pruned[info.name])


# --------------------------------------------------------------------------------------
# Solvers


def _problem(d: int, r: int, n: int, keep: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ (rng.standard_normal((d, d)) / np.sqrt(d)) + 0.2
    y = x @ rng.standard_normal((d, r)) + 0.1 * rng.standard_normal((n, r))
    h = (x.T @ x)[None]
    g = (x.T @ y)[None]
    mask = rng.random((1, d, r)) < keep
    damped = h + 0.01 * np.mean(np.diag(h[0])) * np.eye(d)
    return damped, g, mask


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8])  # kept-set and pruned-set forms
def test_exact_solver_is_the_restricted_least_squares(keep: float) -> None:
    damped, g, mask = _problem(40, 12, 300, keep)
    w = solve_exact(damped, g, mask)
    assert np.all(w[~mask] == 0)
    gradient = damped[0] @ w[0] - g[0]
    np.testing.assert_allclose(gradient[mask[0]], 0, atol=1e-6 * np.abs(g).max())
    # Both solvers give the unconstrained solution when nothing is pruned.
    full = np.ones_like(mask)
    free = np.linalg.solve(damped[0], g[0])
    np.testing.assert_allclose(solve_exact(damped, g, full)[0], free, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(solve_sparsegpt(damped, g, full)[0], free, rtol=1e-6, atol=1e-9)


def test_sparsegpt_close_to_exact_on_a_layer() -> None:
    model = graphs_refit.linear(160, 48)
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((160, 160)) / np.sqrt(160)
    data = {"x": (rng.standard_normal((600, 160)) @ mix + 0.3).astype(np.float32)}
    pruned = _masked(model, 0.6)
    layers = find_layers(model).layers
    exact = reconstruct(model, pruned, layers, data, solver="exact").layers[0]
    sparse = reconstruct(model, pruned, layers, data, solver="sparsegpt").layers[0]
    assert exact.method == "exact" and sparse.method == "sparsegpt"
    assert exact.error_before == pytest.approx(sparse.error_before)
    assert exact.error_after < 0.7 * exact.error_before
    assert sparse.error_after < 0.9 * sparse.error_before
    # the exact refit is optimal; SparseGPT's fixed-mask OBS is within a small factor
    assert exact.error_after <= sparse.error_after
    assert sparse.error_after < 2.5 * exact.error_after


def test_solver_rule() -> None:
    rng = np.random.default_rng(0)
    assert choose_solver(rng.random((1, 385, 1536)) < 0.5) == "exact"  # MiniLM 384 -> 1536
    assert choose_solver(rng.random((1, 1537, 384)) < 0.5) == "exact"  # 1536 -> 384
    assert choose_solver(rng.random((1, 2049, 1024)) < 0.5) == "sparsegpt"  # too costly
    assert choose_solver(rng.random((1, 2049, 1024)) < 0.05) == "exact"  # 95% sparse
    assert choose_solver(rng.random((64, 10, 1)) < 0.5) == "exact"  # depthwise 3x3
    assert choose_solver(rng.random((1, 4609, 512)) < 0.5) == "sparsegpt"  # 3x3x512 conv
    with pytest.raises(Exception, match="unknown solver"):
        model, data = CASES["residual"][0]()
        reconstruct(model, _masked(model, 0.5), find_layers(model).layers, data, solver="x")


def test_dense_targets_recomputed_per_layer_when_over_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cached, _, _ = _refit("cnn", 0.7)
    monkeypatch.setattr(sequential, "DENSE_CACHE_BYTES", 0)
    again, _, _ = _refit("cnn", 0.7)
    assert [r.error_after for r in again.layers] == [r.error_after for r in cached.layers]
    for name, weight in cached.all_weights().items():
        np.testing.assert_array_equal(again.all_weights()[name], weight)
