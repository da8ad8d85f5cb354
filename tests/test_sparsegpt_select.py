"""SparseGPT mask selection (rdprune_onnx.reconstruct.solve_sparsegpt_select) against a
straightforward dense OBS reference, and its use in reconstruct / refit-aware curves."""

from __future__ import annotations

import numpy as np
import pytest

from rdprune_onnx.reconstruct import block_quotas, solve_sparsegpt_select


def _quotas_reference(eligible: list[int], count: int) -> list[int]:
    """Largest remainder, written out with exact fractions."""
    from fractions import Fraction

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
