"""Global magnitude pruning: one threshold on |w| over all layers.

The weights of all layers are ranked together by a score (here |w|; LAMP reuses this with its
own score) and pruned smallest first until the removed cost reaches the budget. The ranking is
total and deterministic: by score, then layer order (graph order, first layer first), then
position in the layer's ascending score order (for equal magnitudes: flat index, when the mask
is built with a stable sort). With unit costs of 1 exactly ``required_cost`` weights go; with a
FLOPs budget weights are taken in that order until the removed cost first reaches the
requirement. Layer bounds are respected: a layer's ``ceil(min_ratio * size)`` lowest-scored
weights are pruned whatever their rank (and count towards the budget), and a layer stops
taking weights once it reaches ``floor(max_ratio * size)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from rdprune_onnx.allocate.base import Allocation, AllocationProblem, FloatArray, LayerSpec
from rdprune_onnx.allocate.rounding import (
    check_feasible,
    count_bounds,
    method_info,
    validate_target,
)


def layer_magnitudes(
    layers: Sequence[LayerSpec], magnitudes: Mapping[str, FloatArray] | None, method: str
) -> list[FloatArray]:
    """Each layer's flattened |w| (fresh arrays), checked against the layer's size.

    Floating-point weights keep their type (|w| is exact in it and orders like float64,
    at half the memory of a float64 copy for float32 models); others become float64.
    Layers are read one at a time, so ``magnitudes`` may compute them on access.
    """
    if magnitudes is None:
        raise ValueError(f"the {method} allocator needs problem.magnitudes")
    out: list[FloatArray] = []
    for layer in layers:
        if layer.name not in magnitudes:
            raise ValueError(f"{method}: no magnitudes for layer {layer.name}")
        raw = np.asarray(magnitudes[layer.name])
        if not np.issubdtype(raw.dtype, np.floating):
            raw = raw.astype(np.float64)
        values = np.abs(raw.reshape(-1))
        del raw
        if values.size != layer.size:
            raise ValueError(
                f"{method}: layer {layer.name} has {layer.size} weights but "
                f"{values.size} magnitudes"
            )
        if np.isnan(values).any():
            raise ValueError(f"{method}: layer {layer.name} has NaN weights")
        out.append(values)
    return out


def counts_from_scores(
    layers: Sequence[LayerSpec], sorted_scores: Sequence[FloatArray], required_cost: int
) -> tuple[dict[str, int], float]:
    """Prune counts from one global threshold over per-layer scores.

    ``sorted_scores[l]`` holds layer l's scores in ascending order (the order in which its
    weights are pruned; its length is the layer's size). Returns the counts and the threshold
    score (the score of the last weight taken; NaN when the minimum bounds alone meet the
    budget). See the module docstring for the tie-break and the bound handling.

    Raises :class:`InfeasibleError` when the budget cannot be met under the bounds.
    """
    layers = list(layers)
    if len(sorted_scores) != len(layers):
        raise ValueError("need one score array per layer")
    required = max(0, int(required_cost))
    check_feasible(layers, required)
    bounds = np.array([count_bounds(layer) for layer in layers], dtype=np.int64).reshape(-1, 2)
    costs = [int(layer.unit_cost) for layer in layers]
    _check_scores(layers, sorted_scores)
    ranking = _Ranking(sorted_scores, bounds[:, 0], bounds[:, 1], costs)
    counts = ranking.lo.copy()
    if ranking.cost_of(counts) >= required:
        return _named(layers, counts), math.nan
    tau = ranking.threshold(required)
    return _named(layers, ranking.take(tau, required)), float(tau)


def _check_scores(layers: Sequence[LayerSpec], sorted_scores: Sequence[FloatArray]) -> None:
    for layer, scores in zip(layers, sorted_scores, strict=True):
        if scores.size != layer.size:
            raise ValueError(f"layer {layer.name}: {scores.size} scores for {layer.size} weights")
        if scores.size and (np.isnan(scores).any() or scores[0] < 0):
            raise ValueError(f"layer {layer.name}: scores must be non-negative numbers")


class _Ranking:
    """Every layer's ascending scores in one floating type, with the layers' count bounds
    (``lo``, ``hi``) and unit costs: what one global threshold over them prunes."""

    def __init__(
        self,
        sorted_scores: Sequence[FloatArray],
        lo: npt.NDArray[np.int64],
        hi: npt.NDArray[np.int64],
        costs: list[int],
    ) -> None:
        # All scores compared in one floating type (float32 models stay float32: no copies).
        found = np.result_type(*[s.dtype for s in sorted_scores]) if sorted_scores else None
        dtype = found if found is not None and np.issubdtype(found, np.floating) else None
        self.dtype = np.dtype(np.float64) if dtype is None else dtype
        self.scores = [s if s.dtype == self.dtype else s.astype(self.dtype) for s in sorted_scores]
        self.bits = np.dtype(f"i{self.dtype.itemsize}")  # same-width integers: bit patterns
        self.lo, self.hi, self.costs = lo, hi, costs

    def cost_of(self, counts: npt.NDArray[np.int64]) -> int:
        return sum(int(k) * c for k, c in zip(counts.tolist(), self.costs, strict=True))

    def clipped(self, tau: np.floating, side: Literal["left", "right"]) -> npt.NDArray[np.int64]:
        """Per layer, the weights scored below ``tau`` (``left``) or up to it (``right``)."""
        found = [int(np.searchsorted(s, tau, side=side)) for s in self.scores]
        return np.clip(np.array(found, dtype=np.int64), self.lo, self.hi)

    def from_bits(self, pattern: int) -> np.floating:
        value: np.floating = np.array(pattern, dtype=self.bits).view(self.dtype).reshape(-1)[0]
        return value

    def threshold(self, required: int) -> np.floating:
        """Smallest threshold tau (a score value) with cost(scores <= tau) >= required:
        bisection on the bit patterns of non-negative floats, which order like the values."""
        zero = self.from_bits(0)
        if self.cost_of(self.clipped(zero, "right")) >= required:
            return zero
        top = max((s[-1] for s in self.scores if s.size), default=zero)
        low_bits = 0
        high_bits = int(np.array(top, dtype=self.dtype).view(self.bits))
        while high_bits - low_bits > 1:
            mid = (low_bits + high_bits) // 2
            if self.cost_of(self.clipped(self.from_bits(mid), "right")) >= required:
                high_bits = mid
            else:
                low_bits = mid
        return self.from_bits(high_bits)

    def take(self, tau: np.floating, required: int) -> npt.NDArray[np.int64]:
        """Everything scored below ``tau`` goes; weights scored exactly ``tau`` go in layer
        order until the removed cost reaches ``required``."""
        counts = self.clipped(tau, "left")
        upper = self.clipped(tau, "right")
        left = required - self.cost_of(counts)
        for i, c in enumerate(self.costs):
            if left <= 0:
                break
            avail = int(upper[i] - counts[i])
            if avail > 0:
                take = min(avail, -(-left // c))
                counts[i] += take
                left -= take * c
        return counts


def _named(layers: Sequence[LayerSpec], counts: np.ndarray) -> dict[str, int]:
    return {layer.name: int(k) for layer, k in zip(layers, counts.tolist(), strict=True)}


def threshold_allocation(
    problem: AllocationProblem,
    method: str,
    to_scores: Callable[[list[FloatArray]], list[FloatArray]],
) -> Allocation:
    """One global threshold over ``to_scores(magnitudes)``: each layer's scores in ascending
    order, made from its flattened |w| (fresh arrays the function may sort or drop)."""
    validate_target(problem.target_ratio)
    layers = list(problem.layers)
    scores = to_scores(layer_magnitudes(layers, problem.magnitudes, method))
    counts, threshold = counts_from_scores(layers, scores, problem.required_cost)
    info = method_info(method, layers, counts, threshold=threshold)
    return Allocation(counts=counts, info=info)


def _sorted_in_place(magnitudes: list[FloatArray]) -> list[FloatArray]:
    for m in magnitudes:
        m.sort()  # fresh arrays from layer_magnitudes: sort in place
    return magnitudes


class GlobalMagnitudeAllocator:
    """One magnitude threshold over all layers' weights."""

    name: str = "global"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        return threshold_allocation(problem, self.name, _sorted_in_place)
