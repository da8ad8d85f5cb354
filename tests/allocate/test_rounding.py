"""Exact-count rounding shared by the ratio-based allocators."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rdprune_onnx.allocate.base import LayerSpec
from rdprune_onnx.allocate.rounding import (
    achieved_ratio,
    check_feasible,
    count_bounds,
    counts_from_ratios,
    max_feasible_cost,
    removed_cost,
    solve_clipped_linear,
)
from rdprune_onnx.errors import InfeasibleError


def _layers(*sizes: int, **bounds: tuple[float, float]) -> list[LayerSpec]:
    names = "abcdefgh"
    out = []
    for name, n in zip(names, sizes, strict=False):
        lo, hi = bounds.get(name, (0.0, 1.0))
        out.append(LayerSpec(name, (n,), min_ratio=lo, max_ratio=hi))
    return out


def _cost(layers: list[LayerSpec], counts: dict[str, int]) -> int:
    return sum(counts[layer.name] * layer.unit_cost for layer in layers)


# ---------------------------------------------------------------- counts_from_ratios, unit costs


def test_largest_remainder_goes_first() -> None:
    # exact counts 3.1, 3.8, 3.5 -> floors 3, 3, 3 (9); 2 more weights go to the largest
    # remainders: b (.8) then c (.5).
    layers = _layers(10, 10, 10)
    counts = counts_from_ratios(layers, {"a": 0.31, "b": 0.38, "c": 0.35}, 11)
    assert counts == {"a": 3, "b": 4, "c": 4}


def test_equal_remainders_break_ties_by_layer_order() -> None:
    # 5.5 each -> floors 15; 2 more to the equal remainders in layer order: a, b.
    layers = _layers(10, 10, 10)
    counts = counts_from_ratios(layers, {"a": 0.55, "b": 0.55, "c": 0.55}, 17)
    assert counts == {"a": 6, "b": 6, "c": 5}


def test_float_noise_does_not_lose_a_weight() -> None:
    # 0.29 * 100 = 28.999999999999996: the bound max_ratio=0.29 must still allow 29 weights,
    # else 58 of 200 would be infeasible.
    assert 0.29 * 100 < 29
    layers = _layers(100, 100, a=(0.0, 0.29), b=(0.0, 0.29))
    counts = counts_from_ratios(layers, {"a": 0.29, "b": 0.29}, 58)
    assert counts == {"a": 29, "b": 29}


def test_several_rounds_when_ratios_fall_short() -> None:
    # Ratios of 0 but 7 required: rounds of one weight per layer in layer order (equal
    # remainders): 3 full rounds (6) then a.
    layers = _layers(10, 10)
    counts = counts_from_ratios(layers, {"a": 0.0, "b": 0.0}, 7)
    assert counts == {"a": 4, "b": 3}


def test_ratios_above_budget_are_taken_back() -> None:
    # floors 5 + 5 = 10 > 9: one weight back, smallest remainder first, ties: later layer.
    layers = _layers(10, 10)
    assert counts_from_ratios(layers, {"a": 0.5, "b": 0.5}, 9) == {"a": 5, "b": 4}
    assert counts_from_ratios(layers, {"a": 0.5, "b": 0.5}, 6) == {"a": 3, "b": 3}


def test_max_ratio_is_never_exceeded() -> None:
    # a is capped at 2 weights; b makes up the rest of the 10 required.
    layers = _layers(10, 10, a=(0.0, 0.2))
    assert counts_from_ratios(layers, {"a": 0.5, "b": 0.5}, 10) == {"a": 2, "b": 8}


def test_min_ratio_is_kept_even_above_budget() -> None:
    layers = _layers(10, 10, a=(0.5, 1.0))
    # the minimum bound alone removes 5 > 3 required: nothing below it, nothing more.
    assert counts_from_ratios(layers, {"a": 0.0, "b": 0.0}, 3) == {"a": 5, "b": 0}
    # ... and with 8 required the bound still holds.
    counts = counts_from_ratios(layers, {"a": 0.0, "b": 0.0}, 8)
    assert counts["a"] >= 5 and sum(counts.values()) == 8


def test_infeasible_budget_names_largest_ratio() -> None:
    layers = _layers(10, 10, a=(0.0, 0.5), b=(0.0, 0.5))
    with pytest.raises(InfeasibleError, match=r"largest feasible ratio is 0\.500000"):
        counts_from_ratios(layers, {"a": 0.5, "b": 0.5}, 11)
    check_feasible(layers, 10)  # exactly at the limit: fine


def test_contradictory_bounds_raise() -> None:
    with pytest.raises(InfeasibleError):
        count_bounds(LayerSpec("x", (1,), min_ratio=0.4, max_ratio=0.6))
    with pytest.raises(InfeasibleError):
        count_bounds(LayerSpec("x", (10,), min_ratio=0.7, max_ratio=0.6))


def test_count_bounds_round_inwards() -> None:
    assert count_bounds(LayerSpec("x", (10,), min_ratio=0.25, max_ratio=0.75)) == (3, 7)
    assert count_bounds(LayerSpec("x", (10,), min_ratio=0.3, max_ratio=0.7)) == (3, 7)
    assert 0.07 * 100 > 7  # ceil would give 8 without the tolerance
    assert count_bounds(LayerSpec("x", (100,), min_ratio=0.07)) == (7, 100)
    assert count_bounds(LayerSpec("x", (7,))) == (0, 7)


def test_achieved_ratio_and_costs() -> None:
    layers = [LayerSpec("a", (4,), unit_cost=3), LayerSpec("b", (2, 3))]
    counts = {"a": 2, "b": 3}
    assert removed_cost(layers, counts) == 9
    assert achieved_ratio(layers, counts) == pytest.approx(9 / 18)
    assert max_feasible_cost(layers) == 18


# ---------------------------------------------------------------- general unit costs


def test_general_costs_reach_the_smallest_achievable_cost() -> None:
    # a: cost 3 per weight, b: cost 5. Exact counts 1.5 and 1.5 -> floors 1, 1 (cost 8).
    # Greedy (equal remainders, a first) adds a then b: 8 + 3 + 5 = 16 >= 14, overshoot 2.
    # Two more weights of a instead give exactly 14 = 3*3 + 1*5.
    layers = [LayerSpec("a", (10,), unit_cost=3), LayerSpec("b", (10,), unit_cost=5)]
    counts = counts_from_ratios(layers, {"a": 0.15, "b": 0.15}, 14)
    assert counts == {"a": 3, "b": 1}
    assert _cost(layers, counts) == 14


def test_general_costs_unreachable_target_takes_next_value() -> None:
    # Only multiples of 4 can be removed: 13 required -> 16.
    layers = [LayerSpec("a", (10,), unit_cost=4), LayerSpec("b", (10,), unit_cost=8)]
    counts = counts_from_ratios(layers, {"a": 0.1, "b": 0.1}, 13)
    assert _cost(layers, counts) == 16


@st.composite
def _cost_cases(draw: st.DrawFn) -> tuple[list[LayerSpec], dict[str, float], int]:
    n_layers = draw(st.integers(1, 3))
    layers = []
    ratios = {}
    for i in range(n_layers):
        size = draw(st.integers(1, 6))
        cost = draw(st.integers(1, 7))
        hi = draw(st.sampled_from([1.0, 1.0, 0.5, 0.8]))
        layers.append(LayerSpec(f"l{i}", (size,), unit_cost=cost, max_ratio=hi))
        ratios[f"l{i}"] = draw(st.floats(0.0, 1.0))
    total = sum(layer.size * layer.unit_cost for layer in layers)
    required = draw(st.integers(0, total))
    return layers, ratios, required


@settings(max_examples=150, deadline=None)
@given(_cost_cases())
def test_general_costs_minimal_on_top_of_floors(
    case: tuple[list[LayerSpec], dict[str, float], int],
) -> None:
    layers, ratios, required = case
    bounds = [count_bounds(layer) for layer in layers]
    best = max_feasible_cost(layers)
    if required > best:
        with pytest.raises(InfeasibleError):
            counts_from_ratios(layers, ratios, required)
        return
    floors = [
        min(max(math.floor(min(max(ratios[la.name] * la.size, lo), hi) + 1e-9), lo), hi)
        for la, (lo, hi) in zip(layers, bounds, strict=True)
    ]
    base_cost = sum(k * la.unit_cost for k, la in zip(floors, layers, strict=True))
    assume(base_cost <= required)
    counts = counts_from_ratios(layers, ratios, required)
    for la, (_, hi), k in zip(layers, bounds, floors, strict=True):
        assert k <= counts[la.name] <= hi
    # brute force over every way to add weights on top of the floors
    options = [range(k, hi + 1) for k, (_, hi) in zip(floors, bounds, strict=True)]
    brute = min(
        c
        for choice in itertools.product(*options)
        if (c := sum(k * la.unit_cost for k, la in zip(choice, layers, strict=True))) >= required
    )
    assert _cost(layers, counts) == brute


@st.composite
def _unit_cases(draw: st.DrawFn) -> tuple[list[LayerSpec], dict[str, float], int]:
    n_layers = draw(st.integers(1, 6))
    layers = []
    ratios = {}
    for i in range(n_layers):
        size = draw(st.integers(0, 50))
        lo = draw(st.sampled_from([0.0, 0.0, 0.1, 0.3]))
        hi = draw(st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.3]))
        layers.append(LayerSpec(f"l{i}", (size,), min_ratio=lo, max_ratio=max(lo, hi)))
        ratios[f"l{i}"] = draw(st.floats(0.0, 1.0))
    total = sum(layer.size for layer in layers)
    required = draw(st.integers(0, total))
    return layers, ratios, required


@settings(max_examples=200, deadline=None)
@given(_unit_cases())
def test_unit_costs_meet_required_exactly(
    case: tuple[list[LayerSpec], dict[str, float], int],
) -> None:
    layers, ratios, required = case
    try:
        bounds = [count_bounds(layer) for layer in layers]
    except InfeasibleError:  # no whole count between a layer's bounds
        with pytest.raises(InfeasibleError):
            counts_from_ratios(layers, ratios, required)
        return
    lo_sum = sum(lo for lo, _ in bounds)
    if required > max_feasible_cost(layers):
        with pytest.raises(InfeasibleError):
            counts_from_ratios(layers, ratios, required)
        return
    counts = counts_from_ratios(layers, ratios, required)
    assert all(isinstance(v, int) for v in counts.values())
    assert list(counts) == [layer.name for layer in layers]
    assert sum(counts.values()) == max(required, lo_sum)
    for layer, (lo, hi) in zip(layers, bounds, strict=True):
        assert lo <= counts[layer.name] <= hi <= layer.size


# ---------------------------------------------------------------- water-filling solver


def test_solve_clipped_linear_water_fills() -> None:
    # Three equal-weight terms clip(t, 0, hi) with hi = 0.2, 1, 1: total 1.4 -> t = 0.6.
    w = np.array([10.0, 10.0, 10.0])
    t = solve_clipped_linear(
        w, np.zeros(3), np.ones(3), np.zeros(3), np.array([0.2, 1.0, 1.0]), 14.0
    )
    assert t == pytest.approx(0.6)
    # below the range: first breakpoint; above: last.
    lows, highs = np.array([0.1, 0.0, 0.0]), np.ones(3)
    assert solve_clipped_linear(w, np.zeros(3), np.ones(3), lows, highs, 0.0) == 0.0
    assert solve_clipped_linear(w, np.zeros(3), np.ones(3), lows, highs, 99.0) == 1.0
