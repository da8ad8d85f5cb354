"""Magnitude masks: zero the smallest-magnitude weights of a tensor, exactly k of them.

Ties are broken by flat index (a stable sort), so the same tensor and count always give the
same mask. Weights already zero are the smallest and are counted in k: the ratio of a layer
is its total fraction of zeros.
"""

from __future__ import annotations

import numpy as np


def magnitude_order(weight: np.ndarray) -> np.ndarray:
    """Flat indices of ``weight`` from smallest to largest magnitude (stable)."""
    magnitude = np.abs(weight.astype(np.float64, copy=False)).ravel()
    return np.argsort(magnitude, kind="stable")


def prune_count(ratio: float, size: int) -> int:
    """Whole weights pruned at ``ratio`` of ``size`` (round half to even, clipped)."""
    return int(min(size, max(0, round(ratio * size))))


def apply_mask(weight: np.ndarray, count: int, order: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``weight`` with its ``count`` smallest-magnitude entries set to zero."""
    if order is None:
        order = magnitude_order(weight)
    pruned = np.array(weight, copy=True)
    pruned.reshape(-1)[order[:count]] = 0
    return pruned


def sparsity(weight: np.ndarray) -> float:
    return float(np.count_nonzero(weight == 0)) / weight.size if weight.size else 0.0
