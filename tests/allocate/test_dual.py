"""The dual allocation (--max-distortion): most removed subject to a distortion budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rdprune_onnx.allocate import Curve, LayerSpec
from rdprune_onnx.allocate.dual import allocate_within, max_removal
from rdprune_onnx.allocate.rd import build_options
from rdprune_onnx.errors import InfeasibleError, UserError


def brute_force(
    removed: list[np.ndarray], values: list[np.ndarray], budget: float
) -> tuple[int, float] | None:
    """(most removed, smallest distortion at that removal) by enumeration, or None."""
    best: tuple[int, float] | None = None
    for combo in itertools.product(*(range(len(r)) for r in removed)):
        d = sum(float(v[g]) for v, g in zip(values, combo, strict=True))
        if d > budget * (1 + 1e-12):
            continue
        r = sum(int(x[g]) for x, g in zip(removed, combo, strict=True))
        if best is None or r > best[0] or (r == best[0] and d < best[1]):
            best = (r, d)
    return best


def test_max_removal_matches_brute_force_on_random_instances() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(300):
        layers = int(rng.integers(1, 5))
        removed, values = [], []
        for _ in range(layers):
            options = int(rng.integers(1, 6))
            removed.append(np.sort(rng.choice(40, size=options, replace=False)).astype(np.int64))
            # Non-monotone, non-convex values (measured curves are noisy at low ratios).
            values.append(rng.random(options) * (1 + 3 * (trial % 3 == 0)))
        budget = float(rng.uniform(0.0, layers))
        expected = brute_force(removed, values, budget)
        if expected is None:
            with pytest.raises(InfeasibleError):
                max_removal(removed, values, budget)
            continue
        result = max_removal(removed, values, budget)
        assert result.unit_size == 1 and result.info["exact"] is True
        assert result.removed == expected[0]
        assert result.distortion == pytest.approx(expected[1])
        assert result.distortion <= budget * (1 + 1e-12)
        checked += 1
    assert checked > 120


def test_quantised_dual_stays_within_budget_and_near_the_optimum() -> None:
    rng = np.random.default_rng(1)
    removed = [np.sort(rng.choice(5000, size=8, replace=False)).astype(np.int64) for _ in range(3)]
    values = [np.sort(rng.random(8)) for _ in range(3)]
    exact = max_removal(removed, values, 1.2)
    coarse = max_removal(removed, values, 1.2, max_units=100)
    assert coarse.unit_size > 1 and coarse.info["exact"] is False
    assert coarse.distortion <= 1.2
    shortfall = coarse.info["max_shortfall_units"]
    assert isinstance(shortfall, int)
    assert exact.removed - shortfall <= coarse.removed <= exact.removed


def test_allocate_within_on_curves_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    specs = [LayerSpec("a", (4, 5)), LayerSpec("b", (30,)), LayerSpec("c", (3, 3), unit_cost=7)]
    s = np.linspace(0.0, 1.0, 11)
    curves = {
        spec.name: Curve(spec.name, s, np.concatenate([[0.0], np.cumsum(rng.random(10))]))
        for spec in specs
    }
    options = [build_options(spec, curves[spec.name], allow_layer_removal=False) for spec in specs]
    for budget in (0.5, 1.0, 2.0, 5.0):
        allocation = allocate_within(specs, curves, budget)
        expected = brute_force(
            [o.counts * o.unit_cost for o in options], [o.values for o in options], budget
        )
        assert expected is not None
        removed = sum(allocation.counts[spec.name] * spec.unit_cost for spec in specs)
        assert removed == expected[0]
        assert allocation.predicted is not None
        assert sum(allocation.predicted.values()) <= budget * (1 + 1e-12)
        # A whole layer is never removed without allow_layer_removal.
        assert all(allocation.counts[spec.name] < spec.size for spec in specs)
        assert allocation.info["achieved_ratio"] == pytest.approx(
            removed / sum(spec.size * spec.unit_cost for spec in specs)
        )


def test_allocate_within_rejects_bad_budgets() -> None:
    specs = [LayerSpec("a", (10,))]
    curves = {"a": Curve("a", np.linspace(0, 1, 5), np.array([0.1, 0.2, 0.3, 0.4, 0.5]))}
    with pytest.raises(UserError, match="non-negative"):
        allocate_within(specs, curves, -1.0)
    with pytest.raises(InfeasibleError, match=r"smallest possible is 0\.1"):
        allocate_within(specs, curves, 0.05)
