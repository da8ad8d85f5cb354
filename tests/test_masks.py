from __future__ import annotations

import numpy as np
import pytest

from rdprune_onnx.masks import apply_mask, magnitude_order, prune_count, sparsity


def test_prunes_exactly_the_smallest() -> None:
    w = np.array([[0.5, -0.1, 0.3], [-0.7, 0.2, 0.05]], np.float32)
    out = apply_mask(w, 3)
    np.testing.assert_array_equal(out, np.array([[0.5, 0, 0.3], [-0.7, 0, 0]], np.float32))
    assert w[0, 1] == np.float32(-0.1)  # input untouched


def test_ties_break_by_flat_index() -> None:
    w = np.array([1.0, -1.0, 1.0, 1.0], np.float32)
    np.testing.assert_array_equal(apply_mask(w, 2), [0, 0, 1, 1])
    np.testing.assert_array_equal(magnitude_order(w), [0, 1, 2, 3])


@pytest.mark.parametrize("count", [0, 1, 17, 99, 100])
def test_count_is_exact_with_existing_zeros(count: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(100).astype(np.float16)
    w[:10] = 0
    out = apply_mask(w, count)
    assert out.dtype == np.float16
    assert np.count_nonzero(out == 0) == max(count, 10)
    kept = out != 0
    if count and kept.any():
        assert np.abs(w[~kept]).max() <= np.abs(out[kept]).min()


def test_prune_count_and_sparsity() -> None:
    assert prune_count(0.5, 7) == 4 or prune_count(0.5, 7) == 3
    assert prune_count(1.2, 7) == 7
    assert prune_count(-0.1, 7) == 0
    assert sparsity(np.array([0, 1, 0, 2])) == 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_selection_equals_stable_sort(dtype: type, seed: int) -> None:
    """apply_mask's selection prunes exactly the first ``count`` of magnitude_order."""
    rng = np.random.default_rng(seed)
    w = rng.choice([0.0, -0.0, 0.5, -0.5, 1.0, 2.0, -3.0], size=(7, 9)).astype(dtype)
    w = w * rng.choice([1.0, 1.0, 1.5], size=w.shape).astype(dtype)
    if seed % 2:
        w.reshape(-1)[rng.integers(0, w.size, 3)] = np.nan
    order = magnitude_order(w)
    for count in range(w.size + 1):
        np.testing.assert_array_equal(
            np.isnan(apply_mask(w, count)), np.isnan(apply_mask(w, count, order))
        )
        np.testing.assert_array_equal(
            np.nan_to_num(apply_mask(w, count)), np.nan_to_num(apply_mask(w, count, order))
        )
