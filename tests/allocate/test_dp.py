"""The multiple-choice knapsack DP against brute force, and the Lagrangian bound."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdprune_onnx.allocate.dp import (
    DEFAULT_MAX_UNITS,
    DPResult,
    lagrangian_bound,
    solve_mckp,
)
from rdprune_onnx.errors import InfeasibleError

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def num(value: object) -> float:
    """A number from an info mapping (typed ``object``)."""
    assert isinstance(value, int | float) and not isinstance(value, bool)
    return float(value)


def brute_force(
    removed: Sequence[IntArray], values: Sequence[FloatArray], required: int, unit: int = 1
) -> float | None:
    """Optimum by enumeration (None if infeasible); with unit > 1, on floored unit costs."""
    units = -(-required // unit)
    total_r = np.zeros(1, dtype=np.int64)
    total_v = np.zeros(1, dtype=np.float64)
    for r, v in zip(removed, values, strict=True):
        total_r = np.add.outer(total_r, np.asarray(r) // unit).ravel()
        total_v = np.add.outer(total_v, np.asarray(v)).ravel()
    feasible = total_r >= units
    if not np.any(feasible):
        return None
    return float(np.min(total_v[feasible]))


def check_answer(
    res: DPResult, removed: Sequence[IntArray], values: Sequence[FloatArray], required: int
) -> None:
    assert len(res.choices) == len(removed)
    assert res.removed == sum(int(r[c]) for r, c in zip(removed, res.choices, strict=True))
    assert res.removed >= required
    chosen = sum(float(v[c]) for v, c in zip(values, res.choices, strict=True))
    assert res.objective == pytest.approx(chosen, rel=1e-12, abs=1e-12)


def random_instance(
    rng: np.random.Generator,
) -> tuple[list[IntArray], list[FloatArray], int]:
    """2-5 layers, 3-8 options; parameter or FLOPs-like costs; bounds; awkward curves."""
    n_layers = int(rng.integers(2, 6))
    flops = bool(rng.integers(0, 2))
    removed: list[IntArray] = []
    values: list[FloatArray] = []
    for _ in range(n_layers):
        g = int(rng.integers(3, 9))
        size = int(rng.integers(1, 40))
        cost = int(rng.choice([1, 3, 7, 49, 196])) if flops else 1
        levels = np.sort(rng.random(g))
        levels[0] = 0.0 if rng.random() < 0.5 else levels[0]
        counts = np.floor(levels * size + 0.5).astype(np.int64)
        # Per-layer bounds: keep only the options inside [min_ratio, max_ratio].
        lo, hi = sorted(rng.random(2))
        if rng.random() < 0.5:
            lo, hi = 0.0, 1.0
        inside = (counts >= math.ceil(lo * size)) & (counts <= math.floor(hi * size))
        if not np.any(inside):
            inside[int(rng.integers(0, g))] = True
        counts = counts[inside]
        kind = int(rng.integers(0, 4))
        s = counts / size
        if kind == 0:  # non-monotone noise
            v = rng.normal(size=counts.size)
        elif kind == 1:  # convex growth with wiggles at low ratios
            v = np.expm1(rng.uniform(1, 6) * s) + 0.3 * rng.normal(size=s.size) * (s < 0.4)
        elif kind == 2:  # ties on purpose
            v = rng.integers(0, 3, size=counts.size).astype(np.float64)
        else:  # decreasing (a curve that rewards pruning)
            v = -s + 0.05 * rng.normal(size=s.size)
        removed.append(counts * cost)
        values.append(v.astype(np.float64))
    reach = int(sum(int(r.max()) for r in removed))
    low = int(sum(int(r.min()) for r in removed))
    pick = rng.random()
    if pick < 0.1:
        required = reach + int(rng.integers(1, 5))  # infeasible
    elif pick < 0.2:
        required = reach  # boundary: everything at its maximum
    elif pick < 0.25:
        required = 0
    else:
        required = int(rng.integers(low, reach + 1))
    return removed, values, required


def test_matches_brute_force_on_random_instances() -> None:
    rng = np.random.default_rng(20231001)
    infeasible = 0
    for _ in range(300):
        removed, values, required = random_instance(rng)
        best = brute_force(removed, values, required)
        for prune in (True, False):
            if best is None:
                with pytest.raises(InfeasibleError):
                    solve_mckp(removed, values, required, prune=prune)
                continue
            res = solve_mckp(removed, values, required, prune=prune)
            assert res.unit_size == 1
            check_answer(res, removed, values, required)
            assert res.objective == pytest.approx(best, rel=1e-12, abs=1e-12)
        infeasible += best is None
    assert 10 <= infeasible <= 60  # the generator exercises both outcomes


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 60), st.floats(-5, 5, allow_nan=False, width=32)),
            min_size=1,
            max_size=8,
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 400),
)
def test_matches_brute_force_hypothesis(
    layers: list[list[tuple[int, float]]], required: int
) -> None:
    removed = [np.array([r for r, _ in opts], dtype=np.int64) for opts in layers]
    values = [np.array([v for _, v in opts], dtype=np.float64) for opts in layers]
    best = brute_force(removed, values, required)
    if best is None:
        with pytest.raises(InfeasibleError):
            solve_mckp(removed, values, required)
        return
    res = solve_mckp(removed, values, required)
    check_answer(res, removed, values, required)
    assert res.objective == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_many_options_use_wider_pointers() -> None:
    """More than 256 options per layer (uint16 back-pointers) is still exact."""
    rng = np.random.default_rng(7)
    removed = [np.sort(rng.integers(0, 5000, size=300)) for _ in range(2)]
    values = [rng.normal(size=300) for _ in range(2)]
    required = 4000
    res = solve_mckp(removed, values, required)
    check_answer(res, removed, values, required)
    assert res.objective == pytest.approx(brute_force(removed, values, required), abs=1e-12)


def test_larger_instances_pruned_equals_unpruned() -> None:
    """The bound-based state pruning never changes the optimum (larger than brute force)."""
    rng = np.random.default_rng(3)
    for _ in range(40):
        n_layers = int(rng.integers(5, 15))
        removed: list[IntArray] = []
        values: list[FloatArray] = []
        for _ in range(n_layers):
            size = int(rng.integers(50, 3000))
            s = np.linspace(0.0, 0.99, int(rng.integers(5, 40)))
            removed.append(np.floor(s * size + 0.5).astype(np.int64))
            v = np.expm1(rng.uniform(1, 8) * s) * 10 ** rng.uniform(-3, 0)
            values.append(v + 1e-3 * rng.normal(size=s.size) * (s < 0.3))
        required = int(rng.integers(0, sum(int(r[-1]) for r in removed) + 1))
        a = solve_mckp(removed, values, required)
        b = solve_mckp(removed, values, required, prune=False)
        check_answer(a, removed, values, required)
        assert a.objective == pytest.approx(b.objective, rel=1e-12, abs=1e-15)
        assert num(a.info["work"]) <= num(b.info["work"])


def test_infeasible_reports_largest_feasible_ratio() -> None:
    removed = [np.array([0, 30, 60]), np.array([0, 20])]
    values = [np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0])]
    with pytest.raises(InfeasibleError, match=r"largest feasible ratio 0\.8\b") as err:
        solve_mckp(removed, values, 81, total=100)
    assert "80" in str(err.value)
    # Exactly reachable is feasible and takes every maximum.
    res = solve_mckp(removed, values, 80, total=100)
    assert res.choices == (2, 1)
    assert res.removed == 80


def test_boundary_cases() -> None:
    removed = [np.array([0, 10, 20]), np.array([5, 15])]
    values = [np.array([1.0, -2.0, 3.0]), np.array([0.5, 0.25])]
    # Nothing required: the cheapest option of every layer.
    res = solve_mckp(removed, values, 0)
    assert res.choices == (1, 1)
    assert res.objective == pytest.approx(-1.75)
    # Negative requirement behaves like zero.
    assert solve_mckp(removed, values, -5).choices == (1, 1)
    # One layer, one option.
    one = solve_mckp([np.array([7])], [np.array([3.0])], 7)
    assert one.choices == (0,) and one.removed == 7
    # Duplicated removals with different values: the cheaper duplicate wins.
    dup = solve_mckp([np.array([4, 4, 9]), np.array([0])], [np.array([2.0, 1.0, 5.0]), [0.0]], 3)
    assert dup.choices == (1, 0)
    # No layers.
    empty = solve_mckp([], [], 0)
    assert empty.choices == () and empty.objective == 0.0
    with pytest.raises(InfeasibleError):
        solve_mckp([], [], 1)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same non-zero length"):
        solve_mckp([np.array([1, 2])], [np.array([1.0])], 1)
    with pytest.raises(ValueError, match="finite"):
        solve_mckp([np.array([1, 2])], [np.array([1.0, np.nan])], 1)
    with pytest.raises(ValueError, match=">= 0"):
        solve_mckp([np.array([-1, 2])], [np.array([1.0, 2.0])], 1)
    with pytest.raises(ValueError, match="whole numbers"):
        solve_mckp([np.array([0.5, 2.0])], [np.array([1.0, 2.0])], 1)
    with pytest.raises(ValueError, match="value arrays"):
        solve_mckp([np.array([1])], [], 1)


def test_quantised_mode_is_feasible_and_optimal_on_floored_costs() -> None:
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(150):
        removed, values, required = random_instance(rng)
        exact = brute_force(removed, values, required)
        if exact is None or required < 8:
            continue
        max_units = int(rng.integers(1, max(2, required // 3)))
        res = solve_mckp(removed, values, required, max_units=max_units)
        assert res.unit_size >= 2 or res.info["notes"]
        assert res.units == -(-required // res.unit_size)
        if not res.info["notes"]:  # a unit is only refined when flooring loses the budget
            assert res.units <= max_units
        check_answer(res, removed, values, required)  # truly feasible despite flooring
        floored = brute_force(removed, values, required, unit=res.unit_size)
        assert floored is not None
        assert res.objective == pytest.approx(floored, rel=1e-12, abs=1e-12)
        assert res.objective >= exact - 1e-12  # a restriction of the exact problem
        bound = res.info["flooring_bound"]
        assert isinstance(bound, int)
        assert bound <= len(removed) * (res.unit_size - 1)
        # Optimal among everything that removes at least required + flooring_bound.
        slack = brute_force(removed, values, required + bound)
        if slack is not None:
            assert res.objective <= slack + 1e-12
        checked += 1
    assert checked >= 60


def test_unit_size_rule() -> None:
    size = 999_983
    levels = np.linspace(0.0, 1.0, 101)
    removed = [np.floor(levels * size + 0.5).astype(np.int64) for _ in range(4)]
    values = [levels**2 * (i + 1) for i in range(4)]
    total = 4 * size
    required = total // 2
    # Small enough: exact.
    assert solve_mckp(removed, values, required, max_units=required).unit_size == 1
    # Capped by max_units: u = ceil(required / max_units) when it exceeds the tolerance unit.
    res = solve_mckp(removed, values, required, max_units=1000, total=total)
    assert res.unit_size == 2000 and res.units == 1000
    assert res.info["tolerance_met"] is False
    assert 0 < num(res.info["flooring_bound"]) <= 4 * 1999
    # Tolerance unit: floor(1e-4 * total / L) = 99 when it is coarser than the cap needs.
    res = solve_mckp(removed, values, required, max_units=100_000, total=total)
    assert res.unit_size == 99
    assert res.info["tolerance_met"] is True
    assert num(res.info["max_overshoot_ratio"]) == pytest.approx(
        num(res.info["flooring_bound"]) / total
    )
    assert num(res.info["max_overshoot_ratio"]) <= 1e-4
    assert DEFAULT_MAX_UNITS >= 1 << 20


def test_work_cap_coarsens_and_stays_feasible() -> None:
    rng = np.random.default_rng(5)
    removed = [np.floor(np.linspace(0, 0.99, 101) * n + 0.5).astype(np.int64) for n in [5000] * 8]
    values = [np.expm1(rng.uniform(2, 6) * np.linspace(0, 0.99, 101)) for _ in range(8)]
    required = 20_000
    fine = solve_mckp(removed, values, required, prune=False)
    coarse = solve_mckp(removed, values, required, prune=False, max_work=100_000)
    assert fine.unit_size == 1
    assert coarse.unit_size > 1
    assert num(coarse.info["work"]) <= 100_000
    assert coarse.info["notes"]
    assert coarse.removed >= required
    assert coarse.objective >= fine.objective - 1e-12


def test_lagrangian_bound_below_optimum() -> None:
    rng = np.random.default_rng(99)
    strict = 0
    for _ in range(200):
        removed, values, required = random_instance(rng)
        best = brute_force(removed, values, required)
        if best is None:
            with pytest.raises(InfeasibleError):
                lagrangian_bound(removed, values, required)
            continue
        lb = lagrangian_bound(removed, values, required)
        assert lb.bound <= best + 1e-9
        assert lb.upper >= best - 1e-9  # the hull solution is feasible
        assert lb.removed >= required
        chosen = sum(float(v[c]) for v, c in zip(values, lb.choices, strict=True))
        assert lb.upper == pytest.approx(chosen)
        assert lb.multiplier >= 0.0
        # The bound is the dual function at the reported multiplier.
        dual = sum(
            float(np.min(v - lb.multiplier * r)) for r, v in zip(removed, values, strict=True)
        )
        assert lb.bound == pytest.approx(dual + lb.multiplier * required, rel=1e-9, abs=1e-9)
        if lb.exact:
            assert lb.bound == pytest.approx(best, abs=1e-9)
        strict += lb.bound < best - 1e-9
    assert strict > 20  # the bound is not the optimum in general


def test_lagrangian_bound_is_tight_on_convex_curves_hitting_the_budget() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        n_layers = int(rng.integers(2, 5))
        removed: list[IntArray] = []
        values: list[FloatArray] = []
        for _ in range(n_layers):
            steps = rng.integers(1, 6, size=int(rng.integers(3, 7)))
            r = np.concatenate(([0], np.cumsum(steps))).astype(np.int64)
            slopes = np.sort(rng.uniform(0.1, 5.0, size=steps.size))  # increasing: convex
            values.append(np.concatenate(([0.0], np.cumsum(slopes * steps))))
            removed.append(r)
        # A budget met exactly by the greedy (hull) solution: fill edges by slope.
        edges = sorted(
            (float((v[i + 1] - v[i]) / (r[i + 1] - r[i])), int(r[i + 1] - r[i]))
            for r, v in zip(removed, values, strict=True)
            for i in range(r.size - 1)
        )
        k = int(rng.integers(1, len(edges) + 1))
        required = sum(dr for _, dr in edges[:k])
        lb = lagrangian_bound(removed, values, required)
        res = solve_mckp(removed, values, required)
        assert lb.exact
        assert lb.removed == required
        assert res.objective == pytest.approx(lb.bound, rel=1e-12, abs=1e-12)
        # One unit more and the relaxation is fractional: the bound drops below the DP.
        if k < len(edges) and edges[k][1] > 1:
            more = lagrangian_bound(removed, values, required + 1)
            assert not more.exact
            dp_more = solve_mckp(removed, values, required + 1)
            assert more.bound < dp_more.objective - 1e-12


def test_lagrangian_gap_example() -> None:
    two = lagrangian_bound([np.array([0, 10]), np.array([0, 10])], [[0.0, 10.0], [0.0, 30.0]], 15)
    assert two.multiplier == pytest.approx(3.0)
    assert two.bound == pytest.approx(25.0)
    assert two.upper == pytest.approx(40.0) and two.removed == 20
    lb = lagrangian_bound([np.array([0, 10])], [np.array([0.0, 10.0])], 5)
    assert lb.bound == pytest.approx(5.0)
    assert lb.multiplier == pytest.approx(1.0)
    assert lb.upper == pytest.approx(10.0) and not lb.exact
    slack = lagrangian_bound([np.array([0, 10])], [np.array([1.0, 3.0])], 0)
    assert slack.bound == pytest.approx(1.0) and slack.multiplier == 0.0 and slack.exact


def test_default_unit_is_exact_when_the_planned_dp_is_cheap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rdprune_onnx.allocate.dp as dp

    rng = np.random.default_rng(21)
    levels = np.linspace(0.0, 0.99, 12)
    removed = [np.floor(levels * n + 0.5).astype(np.int64) for n in (300, 500, 700)]
    values = [np.expm1(rng.uniform(1, 5) * levels) + 0.01 * rng.random(12) for _ in range(3)]
    required = 750
    monkeypatch.setattr(dp, "DEFAULT_MAX_UNITS", 50)
    exact = solve_mckp(removed, values, required, total=1500)
    assert exact.unit_size == 1
    assert "exact" in str(exact.info["notes"])
    assert exact.objective == pytest.approx(brute_force(removed, values, required), abs=1e-12)
    # An explicit max_units keeps the documented rule.
    assert solve_mckp(removed, values, required, total=1500, max_units=50).unit_size > 1
    # Too expensive to plan exactly: quantised, and says so.
    monkeypatch.setattr(dp, "EXACT_MAX_WORK", 1)
    coarse = solve_mckp(removed, values, required, total=1500)
    assert coarse.unit_size > 1
    assert "quantised" in str(coarse.info["notes"])
    assert coarse.removed >= required
