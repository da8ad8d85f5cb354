"""Magnitude masks: zero the smallest-magnitude weights of a tensor, exactly k of them.

The default mask criterion (``--mask magnitude``); also the exact-count helpers every
criterion shares (:func:`apply_mask` with a criterion's order, :func:`prune_count`).

Ties are broken by flat index (a stable sort), so the same tensor and count always give the
same mask. Weights already zero are the smallest and are counted in k: the ratio of a layer
is its total fraction of zeros.
"""

from __future__ import annotations

import numpy as np

from rdprune_onnx.masks.base import LayerStats


def magnitude_order(weight: np.ndarray) -> np.ndarray:
    """Flat indices of ``weight`` from smallest to largest magnitude (stable).

    Floating-point weights are ranked in their own type (|w| is exact there, so the order
    is the float64 one without a float64 copy); others as float64.
    """
    if not np.issubdtype(weight.dtype, np.floating):
        weight = weight.astype(np.float64)
    order: np.ndarray = np.argsort(np.abs(weight).reshape(-1), kind="stable")
    return order


def prune_count(ratio: float, size: int) -> int:
    """Whole weights pruned at ``ratio`` of ``size`` (round half to even, clipped)."""
    return int(min(size, max(0, round(ratio * size))))


def apply_mask(weight: np.ndarray, count: int, order: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``weight`` with its ``count`` smallest-magnitude entries set to zero.

    Without ``order`` the entries are found by selection, not a sort (linear time, no index
    array): everything below the ``count``-th smallest magnitude, then entries equal to it
    by flat index, which is exactly ``magnitude_order(weight)[:count]``.
    """
    pruned = np.array(weight, copy=True)
    flat = pruned.reshape(-1)
    if order is not None:
        flat[order[:count]] = 0
        return pruned
    count = max(0, min(int(count), flat.size))
    if count == 0:
        return pruned
    if count == flat.size:
        flat[:] = 0
        return pruned
    magnitude = np.abs(flat)
    threshold = np.partition(magnitude, count - 1)[count - 1]
    if np.isnan(threshold):  # NaNs sort last: every number goes, then NaNs by index
        below = ~np.isnan(magnitude)
        ties = np.isnan(magnitude)
    else:
        below = magnitude < threshold
        ties = magnitude == threshold
    taken = int(np.count_nonzero(below))
    flat[below] = 0
    del below
    flat[np.flatnonzero(ties)[: count - taken]] = 0
    return pruned


def sparsity(weight: np.ndarray) -> float:
    return float(np.count_nonzero(weight == 0)) / weight.size if weight.size else 0.0


class MagnitudeMask:
    """|w|: the smallest magnitudes go first, whatever the data (needs no statistics)."""

    name: str = "magnitude"
    needs_statistics: bool = False
    rewrites_weights: bool = False

    def scores(self, weight: np.ndarray, stats: LayerStats | None = None) -> np.ndarray:
        if not np.issubdtype(weight.dtype, np.floating):
            weight = weight.astype(np.float64)
        result: np.ndarray = np.abs(weight)
        return result

    def order(self, weight: np.ndarray, stats: LayerStats | None = None) -> np.ndarray:
        return magnitude_order(weight)
