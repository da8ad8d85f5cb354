"""The rate-distortion allocator: options, exactness of the DP, exact counts, bounds."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdprune_onnx.allocate import Allocation, AllocationProblem, Curve, LayerSpec, get_allocator
from rdprune_onnx.allocate.rd import (
    LayerOptions,
    RateDistortionAllocator,
    build_options,
    repair_counts,
)
from rdprune_onnx.errors import InfeasibleError, UserError

FloatArray = npt.NDArray[np.float64]


def num(value: object) -> float:
    """A number from an info mapping (typed ``object``)."""
    assert isinstance(value, int | float) and not isinstance(value, bool)
    return float(value)


def make_curve(rng: np.random.Generator, name: str, levels: int, kind: int) -> Curve:
    s = np.linspace(0.0, 1.0, levels)
    if kind == 0:  # convex-ish growth, noisy and non-monotone at low ratios
        d = 10 ** rng.uniform(-3, 0) * np.expm1(rng.uniform(2, 9) * s)
        d = d * (1 + 0.05 * rng.normal(size=levels)) + 0.01 * rng.random(levels) * (s < 0.3)
    elif kind == 1:  # arbitrary non-monotone
        d = rng.random(levels)
    else:  # monotone increasing, concave at places
        d = np.cumsum(rng.random(levels))
        d -= d[0]
    return Curve(name, s, d.astype(np.float64))


def random_problem(
    rng: np.random.Generator,
    *,
    flops: bool = False,
    bounds: bool = True,
    kinds: tuple[int, ...] = (0, 1, 2),
    max_dim: int = 40,
    level_choices: tuple[int, ...] = (6, 11, 21, 101),
) -> AllocationProblem:
    n_layers = int(rng.integers(1, 7))
    levels = int(rng.choice(level_choices))
    layers: list[LayerSpec] = []
    curves: dict[str, Curve] = {}
    for i in range(n_layers):
        shape = (int(rng.integers(1, max_dim)), int(rng.integers(1, max_dim)))
        lo, hi = 0.0, 1.0
        if bounds and rng.random() < 0.5:
            lo, hi = sorted(np.round(rng.random(2), 3))
            lo, hi = float(min(lo, 0.9)), float(min(1.0, max(hi, lo + 0.05)))
        cost = int(rng.choice([1, 4, 9, 49])) if flops else 1
        name = f"layer{i}"
        layers.append(LayerSpec(name, shape, unit_cost=cost, min_ratio=lo, max_ratio=hi))
        curves[name] = make_curve(rng, name, levels, int(rng.choice(kinds)))
    return AllocationProblem(layers, float(rng.uniform(0.0, 0.95)), curves)


def count_range(layer: LayerSpec) -> tuple[int, int]:
    n = layer.size
    return math.ceil(layer.min_ratio * n - 1e-9), math.floor(layer.max_ratio * n + 1e-9)


def brute_force_dp(problem: AllocationProblem, options: list[LayerOptions]) -> float | None:
    total_r = np.zeros(1, dtype=np.int64)
    total_v = np.zeros(1)
    for o in options:
        total_r = np.add.outer(total_r, o.counts * o.unit_cost).ravel()
        total_v = np.add.outer(total_v, o.values).ravel()
    ok = total_r >= problem.required_cost
    return float(total_v[ok].min()) if np.any(ok) else None


def allocate_or_none(problem: AllocationProblem) -> Allocation | None:
    try:
        return RateDistortionAllocator().allocate(problem)
    except InfeasibleError:
        return None


def test_registry_returns_rd() -> None:
    alloc = get_allocator("rd")
    assert isinstance(alloc, RateDistortionAllocator)
    assert alloc.name == "rd"


def test_dp_optimum_and_exact_counts_on_random_problems() -> None:
    rng = np.random.default_rng(2023)
    solved = 0
    for _ in range(300):
        problem = random_problem(rng, level_choices=(6, 11, 21))
        allow = bool(problem.options.get("allow_layer_removal"))
        assert problem.curves is not None
        options = [
            build_options(layer, problem.curves[layer.name], allow_layer_removal=allow)
            for layer in problem.layers
        ]
        if math.prod(o.counts.size for o in options) > 200_000:
            continue  # too many combinations to enumerate
        best = brute_force_dp(problem, options)
        if best is None and not allow:
            # The grid falls short: the allocator then offers all-but-one-weight options.
            options = [
                build_options(
                    layer, problem.curves[layer.name], allow_layer_removal=False, keep_one=True
                )
                for layer in problem.layers
            ]
            best = brute_force_dp(problem, options)
        result = allocate_or_none(problem)
        if best is None:
            assert result is None
            continue
        assert result is not None
        assert isinstance(result, Allocation)
        info = result.info
        # The DP is the exact optimum of the discretised problem.
        assert info["dp_objective"] == pytest.approx(best, rel=1e-12, abs=1e-12)
        # Counts: python ints, in layer order, within bounds, never a whole layer.
        assert list(result.counts) == [layer.name for layer in problem.layers]
        removed = 0
        for layer in problem.layers:
            k = result.counts[layer.name]
            assert type(k) is int
            lo, hi = count_range(layer)
            assert lo <= k <= hi
            assert k < layer.size
            removed += k * layer.unit_cost
        # Unit costs of 1: exactly the required number of weights, when the lower bounds allow.
        lower = sum(o.lower for o in options)
        assert removed == max(problem.required_cost, lower)
        assert info["removed_cost"] == removed
        assert info["excess_minimal"] is True
        # Predictions: the curve interpolated at the final counts, summing to the objective.
        assert result.predicted is not None
        for o in options:
            assert result.predicted[o.name] == pytest.approx(
                np.interp(result.counts[o.name], o.knot_counts, o.knot_values)
            )
        objective = num(info["objective"])
        assert objective == pytest.approx(sum(result.predicted.values()))
        lower_bound = num(info["lower_bound"])
        assert lower_bound <= num(info["dp_objective"]) + 1e-9
        assert lower_bound <= objective + 1e-9
        solved += 1
    assert solved >= 150


def test_repair_only_lowers_monotone_objectives() -> None:
    """With increasing curves, un-pruning never raises the predicted distortion."""
    rng = np.random.default_rng(8)
    for _ in range(60):
        problem = random_problem(rng, kinds=(2,), max_dim=200)
        result = allocate_or_none(problem)
        if result is None:
            continue
        assert isinstance(result, Allocation)
        dp_obj = num(result.info["dp_objective"])
        assert num(result.info["objective"]) <= dp_obj + 1e-12
        grid = result.info["grid_counts"]
        assert isinstance(grid, dict)
        for name, k in result.counts.items():
            assert k <= grid[name]  # the repair only un-prunes


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_target_met_within_one_grid_step(seed: int, flops: bool) -> None:
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, flops=flops, max_dim=120)
    result = allocate_or_none(problem)
    if result is None:
        return
    assert isinstance(result, Allocation)
    removed = sum(result.counts[la.name] * la.unit_cost for la in problem.layers)
    required = problem.required_cost
    lower = sum(count_range(la)[0] * la.unit_cost for la in problem.layers)
    assert removed >= required
    if lower <= required:
        # At most one grid step (0.01 x size x cost, for the coarsest grid here 0.2) of the
        # smallest layer above the target; exact when any layer has unit cost 1.
        smallest = min(problem.layers, key=lambda la: la.size * la.unit_cost)
        assert removed - required <= math.ceil(0.2 * smallest.size) * smallest.unit_cost
        if not flops:
            assert removed == required
        if result.info["excess_minimal"]:
            step = math.gcd(*(la.unit_cost for la in problem.layers))
            assert removed - required < step


def test_flops_costs_exact_with_exchanges() -> None:
    """Costs 3 and 5 only: pure un-pruning cannot hit the budget, exchanges must."""
    s = np.linspace(0.0, 1.0, 11)
    layers = [
        LayerSpec("a", (100,), unit_cost=3),
        LayerSpec("b", (100,), unit_cost=5),
    ]
    curves = {"a": Curve("a", s, s**2), "b": Curve("b", s, 2 * s**2)}
    for target in (0.31, 0.47, 0.5, 0.77):
        problem = AllocationProblem(layers, target, curves)
        result = RateDistortionAllocator().allocate(problem)
        removed = 3 * result.counts["a"] + 5 * result.counts["b"]
        assert removed == problem.required_cost  # gcd(3, 5) = 1 and plenty of room
        assert result.info["excess_cost"] == 0
        assert result.info["excess_minimal"] is True


def test_repair_counts_directly() -> None:
    s = np.linspace(0.0, 1.0, 5)
    layer = LayerSpec("x", (40,))
    opt = build_options(
        layer, Curve("x", s, np.array([0.0, 1.0, 1.5, 4.0, 9.0])), allow_layer_removal=True
    )
    flat = build_options(
        LayerSpec("y", (40,)),
        Curve("y", s, np.array([0.0, 5.0, 6.0, 7.0, 8.0])),
        allow_layer_removal=True,
    )
    # From (30, 10) with required 33: layer x's segment 20..30 saves 0.25 per weight, y's
    # segment 0..10 saves 0.5 per weight; un-prune 7 weights of y.
    counts, info = repair_counts([opt, flat], [30, 10], 33)
    assert counts == [30, 3]
    assert info["excess_cost"] == 0
    with pytest.raises(ValueError, match="required"):
        repair_counts([opt, flat], [10, 10], 33)
    with pytest.raises(ValueError, match="outside"):
        repair_counts([opt, flat], [50, 10], 33)


def test_never_removes_a_whole_layer_by_default() -> None:
    s = np.linspace(0.0, 1.0, 11)
    layers = [LayerSpec("dead", (100,)), LayerSpec("live", (100,))]
    curves = {
        "dead": Curve("dead", s, np.zeros(11)),  # pruning it costs nothing, even all of it
        "live": Curve("live", s, np.expm1(4 * s)),
    }
    problem = AllocationProblem(layers, 0.6, curves)
    result = RateDistortionAllocator().allocate(problem)
    assert result.counts["dead"] == 90  # the largest grid level below 1.0
    assert result.counts["live"] == 30
    assert result.info["beyond_grid"] is False
    # Only a target the grid cannot reach lets a layer go down to one weight.
    beyond = RateDistortionAllocator().allocate(AllocationProblem(layers, 0.95, curves))
    assert beyond.info["beyond_grid"] is True
    assert sum(beyond.counts.values()) == 190 and max(beyond.counts.values()) <= 99
    allowed = AllocationProblem(layers, 0.6, curves, options={"allow_layer_removal": True})
    result = RateDistortionAllocator().allocate(allowed)
    assert result.counts["dead"] == 100
    assert result.counts["live"] == 20


def test_options_interpolate_bounds_between_grid_levels() -> None:
    s = np.linspace(0.0, 1.0, 11)
    d = np.arange(11, dtype=np.float64) ** 2
    layer = LayerSpec("c", (10, 10), min_ratio=0.25, max_ratio=0.83)
    opt = build_options(layer, Curve("c", s, d), allow_layer_removal=False)
    assert list(opt.counts) == [25, 30, 40, 50, 60, 70, 80, 83]
    assert opt.values[0] == pytest.approx((4 + 9) / 2)  # halfway between 0.2 and 0.3
    assert opt.values[-1] == pytest.approx(64 + 0.3 * (81 - 64))
    assert list(opt.values[1:-1]) == [9.0, 16.0, 25.0, 36.0, 49.0, 64.0]
    # Bounds on grid levels add nothing; 1.0 is dropped unless allowed.
    plain = build_options(LayerSpec("p", (100,)), Curve("p", s, d), allow_layer_removal=False)
    assert list(plain.counts) == list(range(0, 100, 10))
    one = build_options(
        LayerSpec("p", (100,)), Curve("p", s, d), allow_layer_removal=False, keep_one=True
    )
    assert list(one.counts) == [*range(0, 100, 10), 99]  # all but one weight at most
    assert one.values[-1] == pytest.approx(81 + 0.9 * (100 - 81))
    full = build_options(LayerSpec("p", (100,)), Curve("p", s, d), allow_layer_removal=True)
    assert full.upper == 100
    # Small layers: grid levels that round to the same count are merged.
    tiny = build_options(LayerSpec("t", (3,)), Curve("t", s, d), allow_layer_removal=True)
    assert list(tiny.counts) == [0, 1, 2, 3]
    # A bound that is not a whole count in any grid level range: max_ratio 0.995 of 1000.
    near = build_options(
        LayerSpec("n", (1000,), max_ratio=0.995),
        Curve("n", np.linspace(0, 1, 101), np.linspace(0, 1, 101)),
        allow_layer_removal=False,
    )
    assert near.upper == 995
    assert near.values[-1] == pytest.approx(0.995)


def test_infeasible_target_names_the_largest_ratio() -> None:
    s = np.linspace(0.0, 1.0, 11)
    layers = [LayerSpec("a", (100,), max_ratio=0.5), LayerSpec("b", (300,), max_ratio=0.5)]
    curves = {name: Curve(name, s, s) for name in ("a", "b")}
    with pytest.raises(InfeasibleError, match=r"largest feasible ratio 0\.5\b"):
        RateDistortionAllocator().allocate(AllocationProblem(layers, 0.6, curves))
    # Target 1 without layer removal: every layer keeps one weight (398 of 400).
    free = [LayerSpec("a", (100,)), LayerSpec("b", (300,))]
    with pytest.raises(InfeasibleError, match=r"largest feasible ratio 0\.995\b.*allow_layer"):
        RateDistortionAllocator().allocate(AllocationProblem(free, 1.0, curves))
    allowed = AllocationProblem(free, 1.0, curves, options={"allow_layer_removal": True})
    assert RateDistortionAllocator().allocate(allowed).counts == {"a": 100, "b": 300}


def test_target_zero_prunes_nothing_and_bounds_hold() -> None:
    rng = np.random.default_rng(1)
    s = np.linspace(0.0, 1.0, 21)
    layers = [LayerSpec("a", (50,)), LayerSpec("b", (70,), min_ratio=0.3)]
    curves = {name: Curve(name, s, rng.random(21)) for name in ("a", "b")}
    result = RateDistortionAllocator().allocate(AllocationProblem(layers, 0.0, curves))
    assert result.counts == {"a": 0, "b": 21}


def test_user_errors() -> None:
    s = np.linspace(0.0, 1.0, 11)
    layers = [LayerSpec("a", (10,))]
    with pytest.raises(UserError, match="curves"):
        RateDistortionAllocator().allocate(AllocationProblem(layers, 0.5))
    with pytest.raises(UserError, match="no rate-distortion curve"):
        RateDistortionAllocator().allocate(AllocationProblem(layers, 0.5, {}))
    bad = {"a": Curve("a", s[::-1].copy(), s)}
    with pytest.raises(UserError, match="ascending"):
        RateDistortionAllocator().allocate(AllocationProblem(layers, 0.5, bad))
    short = {"a": Curve("a", np.array([0.0, 0.2]), np.array([0.0, 1.0]))}
    bounded = [LayerSpec("a", (10,), min_ratio=0.5)]
    with pytest.raises(UserError, match="within its"):
        RateDistortionAllocator().allocate(AllocationProblem(bounded, 0.5, short))
    with pytest.raises(InfeasibleError, match=r"no whole-weight count"):
        build_options(
            LayerSpec("a", (3,), min_ratio=0.4, max_ratio=0.6),
            Curve("a", s, s),
            allow_layer_removal=False,
        )


def test_quantised_dp_still_exact_counts() -> None:
    rng = np.random.default_rng(12)
    s = np.linspace(0.0, 1.0, 101)
    layers = [LayerSpec(f"l{i}", (int(rng.integers(100, 400)), 64)) for i in range(12)]
    curves = {la.name: Curve(la.name, s, np.expm1(rng.uniform(2, 8) * s)) for la in layers}
    fine = RateDistortionAllocator().allocate(AllocationProblem(layers, 0.7, curves))
    coarse = RateDistortionAllocator().allocate(
        AllocationProblem(layers, 0.7, curves, options={"max_units": 500})
    )
    assert fine.info["unit_size"] == 1
    assert num(coarse.info["unit_size"]) > 1
    for result in (fine, coarse):
        assert sum(result.counts.values()) == AllocationProblem(layers, 0.7, curves).required_cost
    assert num(coarse.info["dp_objective"]) >= num(fine.info["dp_objective"]) - 1e-12
    gap = num(fine.info["gap"])
    assert gap >= 0.0
