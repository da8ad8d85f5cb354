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
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from rdprune_onnx.allocate.base import Allocation, AllocationProblem, FloatArray, LayerSpec
from rdprune_onnx.allocate.rounding import (
    achieved_ratio,
    check_feasible,
    count_bounds,
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
    lo, hi = bounds[:, 0], bounds[:, 1]
    costs = [int(layer.unit_cost) for layer in layers]
    for layer, scores in zip(layers, sorted_scores, strict=True):
        if scores.size != layer.size:
            raise ValueError(f"layer {layer.name}: {scores.size} scores for {layer.size} weights")
        if scores.size and (np.isnan(scores).any() or scores[0] < 0):
            raise ValueError(f"layer {layer.name}: scores must be non-negative numbers")

    def cost_of(counts: np.ndarray) -> int:
        return sum(int(k) * c for k, c in zip(counts.tolist(), costs, strict=True))

    # All scores compared in one floating type (float32 models stay float32: no copies).
    dtype = np.result_type(*[s.dtype for s in sorted_scores]) if sorted_scores else np.float64
    if not np.issubdtype(dtype, np.floating):
        dtype = np.dtype(np.float64)
    sorted_scores = [s if s.dtype == dtype else s.astype(dtype) for s in sorted_scores]
    bits = np.dtype(f"i{dtype.itemsize}")  # same-width integers: the values' bit patterns

    def clipped(tau: np.floating, side: Literal["left", "right"]) -> np.ndarray:
        found = [int(np.searchsorted(s, tau, side=side)) for s in sorted_scores]
        return np.clip(np.array(found, dtype=np.int64), lo, hi)

    def from_bits(pattern: int) -> np.floating:
        value: np.floating = np.array(pattern, dtype=bits).view(dtype).reshape(-1)[0]
        return value

    counts = lo.copy()
    if cost_of(counts) >= required:
        return _named(layers, counts), math.nan

    # Smallest threshold tau (a score value) with cost(scores <= tau) >= required: bisection
    # on the bit patterns of non-negative floats, which order like the values themselves.
    zero = from_bits(0)
    if cost_of(clipped(zero, "right")) >= required:
        tau = zero
    else:
        top = max((s[-1] for s in sorted_scores if s.size), default=zero)
        low_bits = 0
        high_bits = int(np.array(top, dtype=dtype).view(bits))
        while high_bits - low_bits > 1:
            mid = (low_bits + high_bits) // 2
            if cost_of(clipped(from_bits(mid), "right")) >= required:
                high_bits = mid
            else:
                low_bits = mid
        tau = from_bits(high_bits)

    # Everything scored below tau goes; weights scored exactly tau go in layer order.
    counts = clipped(tau, "left")
    upper = clipped(tau, "right")
    left = required - cost_of(counts)
    for i, c in enumerate(costs):
        if left <= 0:
            break
        avail = int(upper[i] - counts[i])
        if avail > 0:
            take = min(avail, -(-left // c))
            counts[i] += take
            left -= take * c
    return _named(layers, counts), float(tau)


def _named(layers: Sequence[LayerSpec], counts: np.ndarray) -> dict[str, int]:
    return {layer.name: int(k) for layer, k in zip(layers, counts.tolist(), strict=True)}


class GlobalMagnitudeAllocator:
    """One magnitude threshold over all layers' weights."""

    name: str = "global"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        validate_target(problem.target_ratio)
        layers = list(problem.layers)
        mags = layer_magnitudes(layers, problem.magnitudes, self.name)
        for m in mags:
            m.sort()  # fresh arrays from layer_magnitudes: sort in place
        counts, threshold = counts_from_scores(layers, mags, problem.required_cost)
        return Allocation(
            counts=counts,
            info={
                "method": self.name,
                "threshold": threshold,
                "achieved_ratio": achieved_ratio(layers, counts),
            },
        )
