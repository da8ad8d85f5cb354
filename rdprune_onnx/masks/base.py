"""What every mask criterion is: a protocol, the layer statistics it may use, and the
per-row interleaved order that turns per-row scores into one nested global order.

A criterion decides WHICH weights of a layer go at a given count; the allocation decides
HOW MANY. Its :meth:`MaskCriterion.order` is a permutation of the layer's flat indices,
first = pruned first, so that the mask at count k is exactly ``order[:k]``: masks are
nested across counts (the curve engine masks incrementally) and counts are exact. Ties are
broken by flat index; weights already zero come first, so a layer's ratio is its total
fraction of zeros, as with magnitude masks.

This module is pure numpy (no onnx, no onnxruntime): the statistics are computed by
:mod:`rdprune_onnx.activations` and handed in as :class:`LayerStats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class LayerStats:
    """What the calibration data says about one layer's weight, in the weight's layout.

    ``norms``: for every weight entry, the L2 norm over the calibration data of the input
    feature it multiplies (times |alpha| for a Gemm), as an array broadcastable to the
    weight's shape. ``rows``: for every entry, the id of the output row (output channel,
    output column) it contributes to, broadcastable to the weight's shape; criteria that
    compare weights per output row (Wanda) use it.
    """

    norms: np.ndarray
    rows: np.ndarray

    def full_norms(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(self.norms, shape)

    def full_rows(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(self.rows, shape)


class MaskCriterion(Protocol):
    """Chooses which weights of a layer are pruned first."""

    name: str
    # True: scores and order need the layer's LayerStats (calibration data).
    needs_statistics: bool
    # True: the mask is chosen again, and the kept weights rewritten, by the refit
    # (sparsegpt): ``order`` is only its starting mask, and the refit is implied.
    rewrites_weights: bool

    def scores(self, weight: np.ndarray, stats: LayerStats | None) -> np.ndarray:
        """Non-negative importance of every weight (same shape); smaller = less important.
        Global and LAMP allocation compare these across layers."""
        ...

    def order(self, weight: np.ndarray, stats: LayerStats | None) -> np.ndarray:
        """Flat indices, first pruned first (see the module docstring)."""
        ...


def interleaved_order(scores: np.ndarray, rows: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """A nested order that prunes every output row evenly, each by its own scores.

    Entries are ranked within their row (by score, then flat index); the order takes the
    weights already zero first, then every row's rank-0 entry, then every row's rank-1
    entry, ..., each rank's entries by (score, flat index). So at count k (beyond the
    existing zeros) the rows have been lowered evenly: without existing zeros every row
    has floor(k/rows) or ceil(k/rows) entries pruned, and a row with existing zeros gets
    new ones only once the others reach its level (zeros count in the rank).

    ``scores``, ``rows`` (integer row ids) and ``zero`` are flat arrays of one length.
    """
    n = scores.size
    index = np.arange(n)
    by_row = np.lexsort((index, scores, rows))
    sorted_rows = rows[by_row]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    lengths = np.diff(np.r_[starts, n])
    rank = np.empty(n, dtype=np.int64)
    rank[by_row] = index - np.repeat(starts, lengths)
    order: np.ndarray = np.lexsort((index, scores, rank, ~zero))
    return order
