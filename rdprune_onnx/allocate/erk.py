"""ERK: Erdos-Renyi-kernel densities (Evci et al., "Rigging the Lottery", ICML 2020).

Layer l keeps a fraction (density) ``min(1, eps * raw_l)`` of its weights, with
``raw_l = sum(shape_l) / prod(shape_l)`` over all dimensions of the weight (kernel dimensions
included: that is the "kernel" in ERK). ``eps`` is chosen so that the removed cost
``sum_l (1 - density_l) * size_l * unit_cost_l`` meets the budget. A layer whose density would
exceed 1 is kept dense and ``eps`` is rescaled over the rest; this is RigL's iterative
procedure, solved here in one step as water-filling (which reaches the same fixed point), and
it extends to the user's bounds: ``density_l`` is clipped to
``[1 - max_ratio_l, 1 - min_ratio_l]`` (in whole weights). The ratios ``1 - density_l`` are
turned into exact counts by :func:`~rdprune_onnx.allocate.rounding.counts_from_ratios`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rdprune_onnx.allocate.base import Allocation, AllocationProblem, LayerSpec
from rdprune_onnx.allocate.rounding import (
    counts_by_ratios,
    method_info,
    ratio_bounds,
    solve_clipped_linear,
    validate_target,
)


def erk_raw_density(shape: Sequence[int]) -> float:
    """``sum(shape) / prod(shape)``: ERK's unscaled density of a weight of this shape."""
    dims = [int(d) for d in shape] or [1]
    prod = math.prod(dims)
    return sum(dims) / prod if prod > 0 else 0.0


def erk_ratios(layers: Sequence[LayerSpec], required_cost: int) -> tuple[float, dict[str, float]]:
    """``eps`` and each layer's pruning ratio ``clip(1 - eps * raw_l, lo/size, hi/size)``.

    ``eps`` makes ``sum ratio_l * size_l * unit_cost_l == required_cost`` (up to floating
    point; the counts are made exact afterwards).
    """
    layers = list(layers)
    if not layers:
        return 0.0, {}
    lows, highs = ratio_bounds(layers)
    raw = np.array([erk_raw_density(layer.shape) for layer in layers], dtype=np.float64)
    weights = np.array([layer.size * layer.unit_cost for layer in layers], dtype=np.float64)
    # ratio_l = 1 - eps * raw_l = 1 + raw_l * t with t = -eps: non-decreasing in t.
    t = solve_clipped_linear(weights, np.ones_like(raw), raw, lows, highs, float(required_cost))
    eps = max(-t, 0.0)
    ratios = np.clip(1.0 - eps * raw, lows, highs)
    return eps, {layer.name: float(r) for layer, r in zip(layers, ratios, strict=True)}


class ErkAllocator:
    """Erdos-Renyi-kernel densities scaled to the budget."""

    name: str = "erk"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        validate_target(problem.target_ratio)
        layers = list(problem.layers)
        eps, counts = counts_by_ratios(layers, problem.required_cost, erk_ratios)
        dense = [layer.name for layer in layers if eps * erk_raw_density(layer.shape) >= 1.0]
        info = method_info(self.name, layers, counts, epsilon=eps, dense_layers=dense)
        return Allocation(counts=counts, info=info)
