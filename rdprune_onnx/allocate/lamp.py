"""LAMP: layer-adaptive magnitude-based pruning (Lee et al., ICLR 2021).

Within a layer, sort the weights ascending by |w| (u = 0, 1, ...). The LAMP score of weight u
is ``w_u^2 / sum_{v >= u} w_v^2``: its squared magnitude over the squared magnitudes of itself
and every larger weight of the same layer. Scores are non-decreasing along the sorted order
(so a layer always loses its smallest weights), lie in [0, 1], and the largest weight of every
layer scores 1. One global threshold on the scores then decides, with the exact-count
semantics, tie-break and bound handling of :mod:`rdprune_onnx.allocate.global_magnitude`.
A weight of magnitude 0 scores 0.
"""

from __future__ import annotations

import numpy as np

from rdprune_onnx.allocate.base import Allocation, AllocationProblem, FloatArray
from rdprune_onnx.allocate.global_magnitude import threshold_allocation


def lamp_scores(magnitudes: FloatArray) -> FloatArray:
    """LAMP scores of one layer, in ascending |w| order (the order its weights are pruned)."""
    ordered = np.sort(np.abs(np.asarray(magnitudes, dtype=np.float64).reshape(-1)))
    squares = ordered * ordered
    tails = np.cumsum(squares[::-1])[::-1]  # tails[u] = sum of squares[u:]
    scores = np.zeros_like(squares)
    np.divide(squares, tails, out=scores, where=tails > 0)
    # Exact arithmetic makes the scores non-decreasing; keep that under rounding too.
    out: FloatArray = np.maximum.accumulate(scores) if scores.size else scores
    return out


def _lamp_scores_of(magnitudes: list[FloatArray]) -> list[FloatArray]:
    return [lamp_scores(m) for m in magnitudes]


class LampAllocator:
    """One global threshold on LAMP scores."""

    name: str = "lamp"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        return threshold_allocation(problem, self.name, _lamp_scores_of)
