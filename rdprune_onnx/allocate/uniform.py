"""Uniform baselines: the same pruning ratio in every layer.

``uniform`` prunes every layer to the same ratio ``s``. ``uniform-plus`` (Gale et al. 2019, as
used by Lee et al. 2021 for LAMP and by the RD-pruning authors) keeps the first prunable layer
dense, keeps at least 20% of the last layer's weights and prunes every other layer to the same
ratio ``s``. In both, ``s`` is solved so that the removed cost meets the budget: a layer whose
bounds (the user's ``min_ratio``/``max_ratio``, or uniform-plus's own caps) clip ``s`` keeps its
clipped ratio and the others make up the difference (water-filling). The ratios are then turned
into exact whole-weight counts by :func:`~rdprune_onnx.allocate.rounding.counts_from_ratios`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rdprune_onnx.allocate.base import Allocation, AllocationProblem, LayerSpec
from rdprune_onnx.allocate.rounding import (
    count_bounds,
    counts_by_ratios,
    method_info,
    ratio_bounds,
    solve_clipped_linear,
    validate_target,
)

# uniform-plus: the last layer keeps at least this fraction of its weights.
LAST_LAYER_MAX_RATIO = 0.8


def uniform_ratios(
    layers: Sequence[LayerSpec], required_cost: int
) -> tuple[float, dict[str, float]]:
    """The common ratio ``s`` and each layer's ratio ``clip(s, lo/size, hi/size)``.

    ``s`` is chosen so that ``sum ratio_l * size_l * unit_cost_l == required_cost`` (up to
    floating point), where ``lo``/``hi`` are the layer's bounds in whole weights. Without
    bounds ``s = required_cost / total_cost``.
    """
    layers = list(layers)
    if not layers:
        return 0.0, {}
    lows, highs = ratio_bounds(layers)
    weights = np.array([layer.size * layer.unit_cost for layer in layers], dtype=np.float64)
    s = solve_clipped_linear(
        weights, np.zeros_like(lows), np.ones_like(lows), lows, highs, float(required_cost)
    )
    s = min(max(s, 0.0), 1.0)
    ratios = np.clip(s, lows, highs)
    return s, {layer.name: float(r) for layer, r in zip(layers, ratios, strict=True)}


class UniformAllocator:
    """Same pruning ratio in every layer (water-filled around any layer bounds)."""

    name: str = "uniform"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        validate_target(problem.target_ratio)
        layers = list(problem.layers)
        s, counts = counts_by_ratios(layers, problem.required_cost, uniform_ratios)
        return Allocation(counts=counts, info=method_info(self.name, layers, counts, ratio=s))


def uniform_plus_layers(layers: Sequence[LayerSpec]) -> list[LayerSpec]:
    """``layers`` with uniform-plus's caps folded into their ``max_ratio``.

    The first layer's ``max_ratio`` becomes 0 (dense) and the last layer's at most 0.8; a
    user's ``min_ratio`` wins over these caps (the cap is raised to the whole-weight count
    that ``min_ratio`` forces).
    """
    capped = list(layers)
    if not capped:
        return capped

    def cap(layer: LayerSpec, limit: float) -> LayerSpec:
        # the fewest weights the user's min_ratio forces, as a ratio the cap may not go below
        forced = count_bounds(layer)[0] / layer.size if layer.size else 0.0
        return dataclasses.replace(layer, max_ratio=max(forced, min(layer.max_ratio, limit)))

    capped[0] = cap(capped[0], 0.0)
    capped[-1] = cap(capped[-1], LAST_LAYER_MAX_RATIO)
    return capped


class UniformPlusAllocator:
    """First layer dense, last layer keeps >= 20%, one common ratio for all other layers."""

    name: str = "uniform-plus"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        validate_target(problem.target_ratio)
        layers = uniform_plus_layers(problem.layers)
        rule = (
            "uniform-plus's rule (first layer dense, last layer keeps at least "
            f"{1 - LAST_LAYER_MAX_RATIO:.0%} of its weights)"
        )
        s, counts = counts_by_ratios(layers, problem.required_cost, uniform_ratios, rule)
        info = method_info(self.name, layers, counts, ratio=s)
        if layers:
            info["first_layer"] = layers[0].name
            info["last_layer"] = layers[-1].name
        return Allocation(counts=counts, info=info)
