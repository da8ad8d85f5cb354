"""Data-aware masks: Wanda statistics and orders (hand-computed), nesting and exact counts,
the pipeline (every method, curves, global/LAMP scores, sequential statistics, steps,
determinism, cache key, allocate warning) and the CLI options."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import rdprune_onnx.curves as curves_module
import rdprune_onnx.job as job_module
import rdprune_onnx.pipeline as pipeline_module
from rdprune_onnx import CalibrationSpec, PruneSettings, UserError, prune
from rdprune_onnx.activations import input_statistics, passes, sequential_masks
from rdprune_onnx.allocate import METHODS
from rdprune_onnx.allocate.base import LayerSpec
from rdprune_onnx.allocate.global_magnitude import counts_from_scores
from rdprune_onnx.curves import measure_curves, measure_distortion, run_reference
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import (
    MASKS,
    LayerStats,
    apply_mask,
    get_mask,
    interleaved_order,
    magnitude_order,
)
from rdprune_onnx.pipeline import curve_entry, measure
from rdprune_onnx.runtime import Session, SessionConfig
from rdprune_onnx_cli.main import cli
from tests import graphs, graphs_masks

CPU = SessionConfig()
WANDA = get_mask("wanda")


def _stats(model: onnx.ModelProto, x: np.ndarray, batch_size: int = 1) -> LayerStats:
    layers = find_layers(model).layers
    assert len(layers) == 1
    found = input_statistics(
        model, layers, {"x": x.astype(np.float32)}, batch_size=batch_size, config=CPU
    )
    assert not found.missing
    return found.layers[layers[0].name]


# --------------------------------------------------------------------------------------
# Hand-computed statistics, scores and orders


X_GEMM = np.array([[1, 0, 2], [2, 1, 0]], np.float32)
W_GEMM = np.array([[1, -3, 0.5], [-2, 1, 1]], np.float32)  # (N=2 outputs, K=3 features)


def test_gemm_trans_b_alpha_by_hand() -> None:
    # Feature sums of squares over the 2 samples: [5, 1, 4]; alpha^2 = 4 -> [20, 4, 16].
    stats = _stats(graphs_masks.gemm(W_GEMM, trans_b=1, alpha=2.0, features=3), X_GEMM)
    np.testing.assert_allclose(stats.full_norms((2, 3)), [[math.sqrt(20), 2, 4]] * 2)
    np.testing.assert_array_equal(stats.full_rows((2, 3)), [[0, 0, 0], [1, 1, 1]])
    scores = WANDA.scores(W_GEMM, stats)
    s20 = math.sqrt(20)
    np.testing.assert_allclose(scores, [[s20, 6, 2], [2 * s20, 2, 4]])
    # Row ranks: row 0 = (2, 0, 1), row 1 = (4, 5, 3); rank 0 ties at score 2 -> flat index.
    np.testing.assert_array_equal(WANDA.order(W_GEMM, stats), [2, 4, 5, 0, 1, 3])
    np.testing.assert_array_equal(magnitude_order(W_GEMM), [2, 0, 4, 5, 3, 1])


def test_gemm_no_trans_b_by_hand() -> None:
    weight = np.ascontiguousarray(W_GEMM.T)  # (K=3, N=2): outputs are columns
    stats = _stats(graphs_masks.gemm(weight, trans_b=0, alpha=2.0, features=3), X_GEMM)
    np.testing.assert_allclose(
        stats.full_norms((3, 2)), [[math.sqrt(20)] * 2, [2, 2], [4, 4]], rtol=1e-12
    )
    np.testing.assert_array_equal(stats.full_rows((3, 2)), [[0, 1]] * 3)
    # The same scores transposed; ties now break by the new flat indices.
    np.testing.assert_array_equal(WANDA.order(weight, stats), [3, 4, 5, 0, 2, 1])


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_weight_as_a(trans_a: int) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 4)).astype(np.float32)  # B = x, B' = x^T: features = axis 1
    weight = rng.standard_normal((4, 3) if trans_a else (3, 4)).astype(np.float32)
    stats = _stats(graphs_masks.gemm_left(weight, trans_a=trans_a, alpha=0.5, features=4), x)
    per_feature = 0.5 * np.sqrt((x.astype(np.float64) ** 2).sum(axis=0))
    norms = stats.full_norms(weight.shape)
    rows = stats.full_rows(weight.shape)
    if trans_a:  # A (K, M): features on axis 0, output rows on axis 1
        np.testing.assert_allclose(norms[:, 0], per_feature, rtol=1e-6)
        np.testing.assert_array_equal(rows[0], [0, 1, 2])
    else:  # A (M, K)
        np.testing.assert_allclose(norms[0], per_feature, rtol=1e-6)
        np.testing.assert_array_equal(rows[:, 0], [0, 1, 2])


def test_matmul_3d_activations_by_hand() -> None:
    """(batch, seq, hidden) activations: the norm is over batch AND sequence."""
    x = np.array([[[1, 0], [0, 2]], [[1, 1], [2, 0]]], np.float32)  # (2, 2, 2)
    weight = np.array([[1, 2, 3], [3, 2, 1]], np.float32)  # (K=2, N=3)
    stats = _stats(graphs_masks.matmul_3d(weight, seq=2), x)
    # k0: 1 + 0 + 1 + 4 = 6, k1: 0 + 4 + 1 + 0 = 5
    np.testing.assert_allclose(stats.full_norms((2, 3)), [[math.sqrt(6)] * 3, [math.sqrt(5)] * 3])
    np.testing.assert_array_equal(stats.full_rows((2, 3)), [[0, 1, 2]] * 2)
    # Per column: n0 = (0, 3), n1 = (4, 1), n2 = (5, 2); rank 0 by score: 5, 0, 4.
    order = WANDA.order(weight, stats)
    np.testing.assert_array_equal(order, [5, 0, 4, 1, 3, 2])
    assert not np.array_equal(order, magnitude_order(weight))  # no |W| fallback
    # Batched in 1s: the sums add up to the same statistics.
    again = _stats(graphs_masks.matmul_3d(weight, seq=2), x, batch_size=1)
    np.testing.assert_allclose(again.norms, stats.norms)


def test_padded_token_positions_are_not_counted() -> None:
    x = np.array([[[1, 0], [5, 5]], [[1, 1], [2, 0]]], np.float32)  # (2, 2, 2)
    tokens = np.array([[1, 0], [1, 1]], np.int64)  # sample 0's second token is padding
    weight = np.array([[1, 2, 3], [3, 2, 1]], np.float32)
    model = graphs_masks.masked_matmul(weight, seq=2)
    layers = find_layers(model).layers
    data = {"x": x, "attention_mask": tokens}
    for found in (
        input_statistics(model, layers, data, batch_size=1, config=CPU),
        sequential_masks(
            model, layers, {"w": weight}, {"w": 2}, data, mask="wanda", batch_size=1, config=CPU
        )[1],
    ):
        # k0: 1 + 1 + 4 = 6 and k1: 0 + 1 + 0 = 1 (the padded [5, 5] is left out)
        norms = found.layers["w"].full_norms((2, 3))
        np.testing.assert_allclose(norms, [[math.sqrt(6)] * 3, [1, 1, 1]])


def test_matmul_weight_on_the_left_by_hand() -> None:
    x = np.array([[1, 2], [3, 4]], np.float32)  # samples; W @ x^T reads x^T's rows
    weight = np.array([[1, 1], [2, 0.5]], np.float32)  # (M=2, K=2)
    stats = _stats(graphs_masks.matmul_left(weight), x)
    np.testing.assert_allclose(stats.full_norms((2, 2)), [[math.sqrt(10), math.sqrt(20)]] * 2)
    np.testing.assert_array_equal(stats.full_rows((2, 2)), [[0, 0], [1, 1]])
    # scores: [[3.16, 4.47], [6.32, 2.24]] -> rank 0: 0 (3.16), 3 (2.24) -> [3, 0, 1, 2]
    np.testing.assert_array_equal(WANDA.order(weight, stats), [3, 0, 1, 2])


def test_batched_matmul_weight_keeps_one_norm_per_matrix() -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((2, 3, 4)).astype(np.float32)  # (H, K, M)
    x = rng.standard_normal((5, 2, 6, 3)).astype(np.float32)  # (N, H, S, K)
    stats = _stats(graphs_masks.batched_matmul(weight, seq=6), x, batch_size=2)
    expected = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(0, 2)))  # (H, K)
    np.testing.assert_allclose(stats.full_norms(weight.shape)[:, :, 0], expected, rtol=1e-6)
    rows = stats.full_rows(weight.shape)
    np.testing.assert_array_equal(rows[1, 2], [4, 5, 6, 7])  # matrix 1, columns 0..3
    assert len(np.unique(rows)) == 8


def _channels(samples: int = 1) -> np.ndarray:
    """Channel c holds c + 1 at every position (2x2); a second sample holds -(c + 1)."""
    one = np.broadcast_to(np.arange(1, 5, dtype=np.float32)[:, None, None], (4, 2, 2))
    return np.stack([one, -one][:samples])


def test_grouped_conv_by_hand() -> None:
    weight = np.array([[1, 1], [1, 0.5]], np.float32).reshape(2, 2, 1, 1)  # group=2
    stats = _stats(graphs_masks.conv(weight, group=2, channels=4), _channels())
    # ||x_c|| = 2 (c + 1) over the 4 positions; output 1 reads channels 2 and 3.
    np.testing.assert_allclose(stats.full_norms(weight.shape).reshape(2, 2), [[2, 4], [6, 8]])
    np.testing.assert_array_equal(stats.full_rows(weight.shape).reshape(2, 2), [[0, 0], [1, 1]])
    # scores [[2, 4], [6, 4]]: rank 0 = 0 (2), 3 (4); rank 1 = 1 (4), 2 (6)
    np.testing.assert_array_equal(WANDA.order(weight, stats), [0, 3, 1, 2])
    np.testing.assert_array_equal(magnitude_order(weight), [3, 0, 1, 2])
    two = _stats(graphs_masks.conv(weight, group=2, channels=4), _channels(2), batch_size=2)
    np.testing.assert_allclose(two.norms, stats.norms * math.sqrt(2))  # over the batch


def test_depthwise_conv_and_conv_transpose_by_hand() -> None:
    weight = np.ones((4, 1, 1, 1), np.float32)
    depthwise = _stats(graphs_masks.conv(weight, group=4, channels=4), _channels())
    np.testing.assert_allclose(depthwise.full_norms(weight.shape).reshape(-1), [2, 4, 6, 8])
    np.testing.assert_array_equal(depthwise.full_rows(weight.shape).reshape(-1), [0, 1, 2, 3])
    # ConvTranspose (C_in=4, C_out/g=1) with group=2: axis 0 is the input channel, and
    # input channels 0, 1 feed output channel 0, channels 2, 3 output channel 1.
    ct = _stats(graphs_masks.conv(weight, group=2, channels=4, transpose=True), _channels())
    np.testing.assert_allclose(ct.full_norms(weight.shape).reshape(-1), [2, 4, 6, 8])
    np.testing.assert_array_equal(ct.full_rows(weight.shape).reshape(-1), [0, 0, 1, 1])
    np.testing.assert_array_equal(WANDA.order(weight, ct), [0, 2, 1, 3])


def test_shared_weight_combines_norms_of_its_uses() -> None:
    x = np.array([[1, -2], [-3, 4]], np.float32)
    weight = np.array([[1, 2], [3, 4]], np.float32)
    stats = _stats(graphs_masks.shared(weight), x)
    relu = np.maximum(x, 0)
    expected = np.sqrt((x**2).sum(0) + (relu**2).sum(0))
    np.testing.assert_allclose(stats.full_norms((2, 2))[:, 0], expected)


# --------------------------------------------------------------------------------------
# Order properties


@pytest.mark.parametrize("seed", range(4))
def test_interleaved_order_is_nested_exact_and_even(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = 5, 7
    weight = rng.standard_normal((rows, cols)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.15] = 0
    weight[0, :3] = 0  # one row with more zeros
    norms = rng.random((1, cols)) + 0.1
    stats = LayerStats(norms=norms, rows=np.arange(rows).reshape(rows, 1))
    order = WANDA.order(weight, stats)
    assert sorted(order.tolist()) == list(range(weight.size))  # a permutation
    zeros = int(np.count_nonzero(weight == 0))
    assert set(order[:zeros].tolist()) == set(np.flatnonzero(weight == 0).tolist())
    scores = np.abs(weight) * norms
    previous = np.zeros(weight.shape, bool)
    for count in range(weight.size + 1):
        masked = apply_mask(weight, count, order)
        pruned = masked == 0
        assert np.count_nonzero(pruned) == max(count, zeros)  # exact
        assert np.all(pruned[previous])  # nested
        previous = pruned
        if count >= zeros:
            per_row = pruned.sum(axis=1)
            base = (weight == 0).sum(axis=1)
            # Water-filling: rows are pruned to a common level, never above it needlessly.
            level = per_row.min()
            assert np.all((per_row <= level + 1) | (per_row == base))
        for r in range(rows):  # within a row, the smallest scores go first
            kept, gone = scores[r][~pruned[r]], scores[r][pruned[r]]
            if kept.size and gone.size:
                assert gone.max() <= kept.min()


def test_interleaved_counts_are_floor_or_ceil_without_zeros() -> None:
    rng = np.random.default_rng(7)
    scores = rng.random(24)
    rows = np.repeat(np.arange(4), 6)
    order = interleaved_order(scores, rows, np.zeros(24, bool))
    for count in range(25):
        per_row = np.bincount(rows[order[:count]], minlength=4)
        assert set(per_row.tolist()) <= {count // 4, -(-count // 4)}


def test_ties_break_by_flat_index() -> None:
    weight = np.ones((2, 3), np.float32)
    stats = LayerStats(norms=np.ones((1, 3)), rows=np.arange(2).reshape(2, 1))
    np.testing.assert_array_equal(WANDA.order(weight, stats), [0, 3, 1, 4, 2, 5])


# --------------------------------------------------------------------------------------
# Pipeline


def _save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    onnx.save_model(model, str(path))
    return path


CALIB = CalibrationSpec(synthetic=16, batch_size=8, seed=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mask", [*MASKS, "wanda-sequential"])
def test_every_mask_and_method_meets_the_exact_count(
    tmp_path: Path, method: str, mask: str
) -> None:
    path = _save(graphs.cnn(), tmp_path)
    name, inputs = ("wanda", "sequential") if mask == "wanda-sequential" else (mask, "dense")
    settings = PruneSettings(ratio=0.7, method=method, levels=11, mask=name, mask_inputs=inputs)
    result = prune(path, settings, CALIB, write=False)
    total = sum(layer.size for layer in result.layers)
    assert sum(layer.pruned for layer in result.layers) == math.ceil(0.7 * total)
    assert result.to_dict()["settings"]["mask"] == name
    assert result.to_dict()["settings"]["mask_inputs"] == inputs


def _cnn_data() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)}


def test_final_masks_are_the_wanda_masks(tmp_path: Path) -> None:
    """uniform + wanda: every layer is its dense-statistics Wanda mask at its count."""
    model = graphs.cnn()
    path = _save(model, tmp_path)
    data = _cnn_data()
    np.savez(tmp_path / "d.npz", **data)
    spec = CalibrationSpec(data=tmp_path / "d.npz", batch_size=8)
    result = prune(
        path, PruneSettings(ratio=0.6, method="uniform", mask="wanda"), spec, write=False
    )
    assert result.model is not None
    layers = find_layers(model).layers
    stats = input_statistics(model, layers, data, batch_size=8, config=CPU)
    for layer in layers:
        weight = read_weight(model, layer.name)
        got = read_weight(result.model, layer.name)
        count = int(np.count_nonzero(got == 0))
        expected = apply_mask(weight, count, WANDA.order(weight, stats.layers[layer.name]))
        np.testing.assert_array_equal(got, expected)
        assert not np.array_equal(got, apply_mask(weight, count))  # not magnitude


def test_lazy_model_gets_the_same_wanda_masks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose weights stay on disk (external data) is masked as in memory."""
    from rdprune_onnx.graph import load

    model = graphs.cnn()
    dense_path = _save(model, tmp_path)
    settings = PruneSettings(ratio=0.7, levels=11, mask="wanda", mask_inputs="sequential")
    expected = prune(dense_path, settings, CALIB, write=False)
    monkeypatch.setattr(load, "LAZY_MIN_BYTES", 0)
    lazy_path = graphs.save_external(model, tmp_path / "lazy.onnx")
    assert load.has_lazy(load.read_model(lazy_path)[0])
    out = tmp_path / "out.onnx"
    got = prune(lazy_path, settings, CALIB, output=out)
    assert expected.model is not None
    written = onnx.load(str(out))
    for layer in got.layers:
        np.testing.assert_array_equal(
            read_weight(written, layer.name), read_weight(expected.model, layer.name)
        )


def test_global_wanda_is_one_threshold_on_the_scores(tmp_path: Path) -> None:
    model = graphs.cnn()
    path = _save(model, tmp_path)
    data = _cnn_data()
    np.savez(tmp_path / "d.npz", **data)
    spec = CalibrationSpec(data=tmp_path / "d.npz", batch_size=8)
    got = prune(path, PruneSettings(ratio=0.8, method="global", mask="wanda"), spec, write=False)
    plain = prune(path, PruneSettings(ratio=0.8, method="global"), spec, write=False)
    layers = find_layers(model).layers
    stats = input_statistics(model, layers, data, batch_size=8, config=CPU)
    specs = [LayerSpec(layer.name, layer.shape) for layer in layers]
    scores = [
        np.sort(WANDA.scores(read_weight(model, la.name), stats.layers[la.name]).reshape(-1))
        for la in layers
    ]
    counts, _ = counts_from_scores(specs, scores, math.ceil(0.8 * sum(s.size for s in specs)))
    assert {r.name: r.pruned for r in got.layers} == counts
    assert counts != {r.name: r.pruned for r in plain.layers}


@pytest.mark.parametrize("binding", [False, True])
def test_curves_with_wanda_equal_whole_model_runs(
    binding: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU route and on the IOBinding (CUDA) route, run here on the CPU provider."""
    monkeypatch.setattr(curves_module, "_FORCE_BINDING", binding)
    model = graphs.cnn()
    layers = find_layers(model).layers
    data = _cnn_data()
    reference = run_reference(model, data, 8, CPU)
    stats = input_statistics(model, layers, data, batch_size=8, config=CPU)

    def order(layer: object, weight: np.ndarray) -> np.ndarray:
        return WANDA.order(weight, stats.layers[layer.name])  # type: ignore[attr-defined]

    ratios = np.array([0.0, 0.3, 0.55, 0.8, 1.0])
    curves = measure_curves(model, layers, reference, ratios=ratios, config=CPU, mask_order=order)
    for layer in layers:
        weight = read_weight(model, layer.name)
        layer_order = WANDA.order(weight, stats.layers[layer.name])
        for i, ratio in enumerate(ratios):
            count = round(ratio * weight.size)
            pruned = replace_weights(model, {layer.name: apply_mask(weight, count, layer_order)})
            expected = measure_distortion(Session(pruned, CPU), reference, "mse")
            got = curves[layer.name].distortion[i]
            assert got == pytest.approx(expected, rel=1e-6, abs=1e-12), (layer.name, ratio)
    plain = measure_curves(model, layers, reference, ratios=ratios, config=CPU)
    assert any(
        not np.allclose(plain[la.name].distortion, curves[la.name].distortion) for la in layers
    )


def test_sequential_statistics_come_from_the_pruned_upstream_model() -> None:
    model = graphs.cnn()
    layers = find_layers(model).layers
    data = _cnn_data()
    weights = {layer.name: read_weight(model, layer.name) for layer in layers}
    counts = {name: int(0.6 * w.size) for name, w in weights.items()}
    masked, found = sequential_masks(
        model, layers, weights, counts, data, mask="wanda", batch_size=8, config=CPU
    )
    assert passes(model, layers) == len(layers)  # a chain: one pass per layer
    dense = input_statistics(model, layers, data, batch_size=8, config=CPU)
    first, last = layers[0].name, layers[-1].name
    np.testing.assert_allclose(found.layers[first].norms, dense.layers[first].norms)
    assert not np.allclose(found.layers[last].norms, dense.layers[last].norms)
    upstream = {n: w for n, w in masked.items() if n != last}
    seen = input_statistics(model, layers, data, batch_size=8, config=CPU, weights=upstream)
    np.testing.assert_allclose(found.layers[last].norms, seen.layers[last].norms, rtol=1e-6)
    expected = apply_mask(
        weights[last], counts[last], WANDA.order(weights[last], seen.layers[last])
    )
    np.testing.assert_array_equal(masked[last], expected)


def test_steps_recompute_statistics_on_the_partly_pruned_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    original = job_module.input_statistics

    def spy(*args: object, **kwargs: object) -> object:
        weights = kwargs.get("weights")
        seen.append(sum(int(np.count_nonzero(w == 0)) for w in weights.values()) if weights else 0)  # type: ignore[attr-defined]
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(job_module, "input_statistics", spy)
    path = _save(graphs.cnn(), tmp_path)
    settings = PruneSettings(ratio=0.8, steps=2, levels=11, mask="wanda")
    result = prune(path, settings, CALIB, write=False)
    total = sum(layer.size for layer in result.layers)
    assert seen[0] == 0 and seen[1] >= math.ceil(0.4 * total)
    assert sum(layer.pruned for layer in result.layers) == math.ceil(0.8 * total)


@pytest.mark.parametrize("inputs", ["dense", "sequential"])
def test_prune_with_wanda_is_byte_deterministic(tmp_path: Path, inputs: str) -> None:
    path = _save(graphs.cnn(), tmp_path)
    outs = []
    for i in range(2):
        out = tmp_path / f"p{i}.onnx"
        settings = PruneSettings(ratio=0.75, levels=11, mask="wanda", mask_inputs=inputs)
        prune(path, settings, CALIB, output=out, cache_dir=None)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_cache_key_includes_only_data_aware_masks() -> None:
    model = graphs.cnn()
    layers = find_layers(model).layers
    data = _cnn_data()
    plain = curve_entry(model, layers, data, PruneSettings(ratio=0.5), "cpu", 8)
    wanda = curve_entry(model, layers, data, PruneSettings(ratio=0.5, mask="wanda"), "cpu", 8)
    assert "mask" not in plain.settings  # magnitude curves keep their old key
    assert wanda.settings["mask"] == "wanda"
    assert plain.key != wanda.key


def test_settings_refuse_unknown_masks() -> None:
    with pytest.raises(UserError, match="unknown mask"):
        PruneSettings(ratio=0.5, mask="bogus").check()
    with pytest.raises(UserError, match="unknown mask inputs"):
        PruneSettings(ratio=0.5, mask_inputs="bogus").check()


def test_sequential_inputs_without_a_data_aware_mask_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _save(graphs.cnn(), tmp_path)
    settings = PruneSettings(ratio=0.5, method="uniform", mask_inputs="sequential")
    with caplog.at_level(logging.WARNING):
        prune(path, settings, CALIB, write=False)
    assert "has no effect with --mask magnitude" in caplog.text


def test_allocate_warns_when_the_curves_mask_differs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _save(graphs.cnn(), tmp_path)
    curves = tmp_path / "c.json"
    measure(path, PruneSettings(ratio=0.5, levels=11), CALIB, output=curves)
    with caplog.at_level(logging.WARNING):
        result = pipeline_module.prune_from_curves(
            curves,
            path,
            PruneSettings(ratio=0.6, levels=11, mask="wanda"),
            calibration=CALIB,
            write=False,
        )
    assert "measured with --mask magnitude" in caplog.text
    assert result.allocation_info["mask"] == "wanda"
    with pytest.raises(UserError, match="needs calibration data"):
        pipeline_module.prune_from_curves(
            curves, path, PruneSettings(ratio=0.6, levels=11, mask="wanda"), write=False
        )


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_cli_mask_options(tmp_path: Path) -> None:
    path = _save(graphs.cnn(), tmp_path)
    out = tmp_path / "p.onnx"
    report = tmp_path / "r.json"
    code, text = _run(
        "prune", str(path), "--ratio", "0.6", "--synthetic", "8", "--levels", "11",
        "--mask", "wanda", "--mask-inputs", "sequential", "-o", str(out),
        "--report", str(report), "--no-progress", "--no-cache",
    )  # fmt: skip
    assert code == 0, text
    assert "mask wanda (sequential input statistics)" in text
    assert '"mask": "wanda"' in report.read_text()
    code, text = _run("prune", str(path), "--ratio", "0.6", "--synthetic", "8", "--mask", "bogus")
    assert code == 1
    assert "--mask" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) <= 3
    curves = tmp_path / "c.json"
    code, text = _run(
        "curves", str(path), "-o", str(curves), "--synthetic", "8", "--levels", "11",
        "--mask", "wanda", "--no-progress", "--no-cache",
    )  # fmt: skip
    assert code == 0, text
    code, text = _run(
        "allocate", str(curves), "--model", str(path), "--ratio", "0.5", "--mask", "wanda",
        "-o", str(tmp_path / "a.onnx"),
    )  # fmt: skip
    assert code == 1 and "needs calibration data" in text and "Traceback" not in text
