"""Baseline allocators: uniform, uniform-plus, global magnitude, LAMP, ERK."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rdprune_onnx.allocate import Allocation, AllocationProblem, LayerSpec, get_allocator
from rdprune_onnx.allocate.base import FloatArray
from rdprune_onnx.allocate.erk import erk_ratios, erk_raw_density
from rdprune_onnx.allocate.lamp import lamp_scores
from rdprune_onnx.allocate.rounding import count_bounds, max_feasible_cost
from rdprune_onnx.allocate.uniform import uniform_plus_layers
from rdprune_onnx.errors import InfeasibleError

BASELINES = ("uniform", "uniform-plus", "global", "lamp", "erk")


def _run(method: str, problem: AllocationProblem) -> dict[str, int]:
    allocation = get_allocator(method).allocate(problem)
    assert isinstance(allocation, Allocation)
    assert allocation.info["method"] == method
    return dict(allocation.counts)


def _cost(layers: list[LayerSpec], counts: dict[str, int]) -> int:
    return sum(counts[layer.name] * layer.unit_cost for layer in layers)


@pytest.mark.parametrize("method", BASELINES)
def test_registry_names(method: str) -> None:
    allocator = get_allocator(method)
    assert allocator.name == method


# ---------------------------------------------------------------- tiny hand-computed example
#
# 13 weights, target 0.5 -> required = ceil(6.5) = 7.
#   A (4,):   |w| = .1 .4 .2 .9
#   B (2, 3): |w| = .3 .05 .6 .7 .15 .25
#   C (3,):   |w| = 2 3 10
TINY_LAYERS = [LayerSpec("A", (4,)), LayerSpec("B", (2, 3)), LayerSpec("C", (3,))]
TINY_MAGS = {
    "A": np.array([0.1, 0.4, 0.2, 0.9]),
    "B": np.array([0.3, 0.05, 0.6, 0.7, 0.15, 0.25]),
    "C": np.array([2.0, 3.0, 10.0]),
}
TINY = AllocationProblem(TINY_LAYERS, 0.5, magnitudes=TINY_MAGS)


def test_tiny_required() -> None:
    assert TINY.required_cost == 7


def test_tiny_uniform() -> None:
    # s = 7/13: exact counts A 28/13 = 2.15, B 42/13 = 3.23, C 21/13 = 1.62 -> floors 2, 3, 1
    # (6); the one missing weight goes to the largest remainder, C (.62).
    allocation = get_allocator("uniform").allocate(TINY)
    assert dict(allocation.counts) == {"A": 2, "B": 3, "C": 2}
    assert allocation.info["ratio"] == pytest.approx(7 / 13)


def test_tiny_global() -> None:
    # The 7 smallest |w| overall: .05 B, .1 A, .15 B, .2 A, .25 B, .3 B, .4 A (C's are >= 2).
    assert _run("global", TINY) == {"A": 3, "B": 4, "C": 0}


def test_tiny_lamp() -> None:
    # LAMP scores (ascending |w|, score = w^2 / sum of squares of itself and larger ones):
    #   A: .01/1.02 = .0098, .04/1.01 = .0396, .16/.97 = .165, 1
    #   B: .0025/1.0275 = .0024, .0225/1.025 = .0220, .0625/1.0025 = .0623, .09/.94 = .0957,
    #      .36/.85 = .424, 1
    #   C: 4/113 = .0354, 9/109 = .0826, 1
    # 7 smallest: .0024 B, .0098 A, .0220 B, .0354 C, .0396 A, .0623 B, .0826 C.
    allocation = get_allocator("lamp").allocate(TINY)
    assert dict(allocation.counts) == {"A": 2, "B": 3, "C": 2}
    assert allocation.info["threshold"] == pytest.approx(9 / 109)


def test_tiny_uniform_plus() -> None:
    # A dense, C <= 0.8 * 3 = 2.4 -> at most 2 weights; s on B (and C below its cap):
    # 6 s + 3 min(s, .8) = 7 -> s = 5/6 (C at its cap 2.4): B 5, C floor(2.4) = 2 -> 7.
    allocation = get_allocator("uniform-plus").allocate(TINY)
    assert dict(allocation.counts) == {"A": 0, "B": 5, "C": 2}
    assert allocation.info["ratio"] == pytest.approx(5 / 6)


def test_tiny_erk() -> None:
    # raw = sum/prod: A 4/4 = 1, B 5/6, C 3/3 = 1. Keep 6 = eps (4*1 + 6*5/6 + 3*1) = 12 eps
    # -> eps = .5: densities .5, 5/12, .5 -> pruned 2, 3.5, 1.5 -> floors 2, 3, 1 (6); the
    # remainders of B and C tie (.5): B first (layer order).
    allocation = get_allocator("erk").allocate(TINY)
    assert dict(allocation.counts) == {"A": 2, "B": 4, "C": 1}
    assert allocation.info["epsilon"] == pytest.approx(0.5)


def test_lamp_scores_by_hand() -> None:
    np.testing.assert_allclose(
        lamp_scores(np.array([0.1, 0.4, 0.2, 0.9])), [0.01 / 1.02, 0.04 / 1.01, 0.16 / 0.97, 1.0]
    )
    # equal magnitudes: the first in order scores lower; zeros score 0.
    np.testing.assert_allclose(lamp_scores(np.array([1.0, 1.0])), [0.5, 1.0])
    np.testing.assert_allclose(lamp_scores(np.array([0.0, 0.0, 2.0])), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(lamp_scores(np.array([-3.0, 4.0])), [9 / 25, 1.0])


# ---------------------------------------------------------------- global magnitude specifics


def test_global_ties_go_to_the_earlier_layer() -> None:
    layers = [LayerSpec("a", (2,)), LayerSpec("b", (2,))]
    mags = {"a": np.ones(2), "b": np.ones(2)}
    assert _run("global", AllocationProblem(layers, 0.5, magnitudes=mags)) == {"a": 2, "b": 0}
    assert _run("global", AllocationProblem(layers, 0.75, magnitudes=mags)) == {"a": 2, "b": 1}


def test_global_min_bound_prunes_first_and_counts() -> None:
    # a must lose 1 (its .5) whatever the ranking; required 2: then b's 1 (smallest left).
    layers = [LayerSpec("a", (2,), min_ratio=0.5), LayerSpec("b", (3,))]
    mags = {"a": np.array([6.0, 5.0]), "b": np.array([1.0, 2.0, 3.0])}
    assert _run("global", AllocationProblem(layers, 0.4, magnitudes=mags)) == {"a": 1, "b": 1}
    free = [LayerSpec("a", (2,)), LayerSpec("b", (3,))]
    assert _run("global", AllocationProblem(free, 0.4, magnitudes=mags)) == {"a": 0, "b": 2}


def test_global_max_bound_caps_a_layer() -> None:
    # required ceil(.6 * 5) = 3; a may lose only floor(.34 * 3) = 1 (its .1); then b's .5, .6.
    layers = [LayerSpec("a", (3,), max_ratio=0.34), LayerSpec("b", (2,))]
    mags = {"a": np.array([0.1, 0.2, 0.3]), "b": np.array([0.5, 0.6])}
    assert _run("global", AllocationProblem(layers, 0.6, magnitudes=mags)) == {"a": 1, "b": 2}


def test_global_flops_budget_takes_weights_until_cost_reached() -> None:
    # a: 10 MACs per weight, b: 1. total 2*10 + 3 = 23, required ceil(11.5) = 12.
    # ascending |w|: .1 a (10), .15 b (11), .2 a (21 >= 12): stop.
    layers = [LayerSpec("a", (2,), unit_cost=10), LayerSpec("b", (3,), unit_cost=1)]
    mags = {"a": np.array([0.2, 0.1]), "b": np.array([0.15, 0.3, 0.4])}
    problem = AllocationProblem(layers, 0.5, magnitudes=mags)
    assert problem.required_cost == 12
    assert _run("global", problem) == {"a": 2, "b": 1}


def test_global_needs_matching_magnitudes() -> None:
    layers = [LayerSpec("a", (3,))]
    with pytest.raises(ValueError):
        get_allocator("global").allocate(AllocationProblem(layers, 0.5))
    with pytest.raises(ValueError):
        get_allocator("lamp").allocate(AllocationProblem(layers, 0.5, magnitudes={"a": np.ones(2)}))


@pytest.mark.parametrize("method", ["global", "lamp"])
def test_threshold_methods_with_no_layers(method: str) -> None:
    # No layers: nothing to prune, no threshold (this used to fail building the score type).
    allocation = get_allocator(method).allocate(AllocationProblem([], 0.5, magnitudes={}))
    assert dict(allocation.counts) == {}
    assert math.isnan(float(allocation.info["threshold"]))  # type: ignore[arg-type]


# ---------------------------------------------------------------- uniform specifics


def test_uniform_water_fills_around_a_bound() -> None:
    # 40 weights, required 20; a may lose at most 2 -> b and c share 18 at s = 18/30 = .6.
    layers = [
        LayerSpec("a", (10,), max_ratio=0.2),
        LayerSpec("b", (10,)),
        LayerSpec("c", (20,)),
    ]
    allocation = get_allocator("uniform").allocate(AllocationProblem(layers, 0.5))
    assert dict(allocation.counts) == {"a": 2, "b": 6, "c": 12}
    assert allocation.info["ratio"] == pytest.approx(0.6)


def test_uniform_flops_budget_same_ratio_and_exact_cost() -> None:
    # total 10*4 + 10*1 = 50, required ceil(.33 * 50) = 17, s = 17/50 = .34: exact 3.4 and
    # 3.4 -> floors 3, 3 (cost 15); greedy would add one a (cost 19), but two more b's reach
    # exactly 17.
    layers = [LayerSpec("a", (10,), unit_cost=4), LayerSpec("b", (10,), unit_cost=1)]
    problem = AllocationProblem(layers, 0.33)
    assert problem.required_cost == 17
    counts = _run("uniform", problem)
    assert counts == {"a": 3, "b": 5}
    assert _cost(layers, counts) == 17


def test_infeasible_reports_largest_ratio() -> None:
    # at most 5 + 15 of 40 weights may go (0.5); uniform-plus also keeps a dense: 15/40.
    layers = [LayerSpec("a", (10,), max_ratio=0.5), LayerSpec("b", (30,), max_ratio=0.5)]
    problem = AllocationProblem(layers, 0.6, magnitudes={"a": np.ones(10), "b": np.ones(30)})
    for method in BASELINES:
        largest = "0.375000" if method == "uniform-plus" else "0.500000"
        with pytest.raises(InfeasibleError, match=rf"largest feasible ratio is {largest}"):
            get_allocator(method).allocate(problem)


# ---------------------------------------------------------------- uniform-plus specifics

UPLUS_LAYERS = [LayerSpec("first", (10,)), LayerSpec("mid", (100,)), LayerSpec("last", (10,))]


def test_uniform_plus_first_dense_last_capped() -> None:
    # required 108 of 120: first dense, last <= 8; 100 s + 10 min(s, .8) = 108 -> s = 1.
    counts = _run("uniform-plus", AllocationProblem(UPLUS_LAYERS, 0.9))
    assert counts == {"first": 0, "mid": 100, "last": 8}
    # required 60: 110 s = 60 -> mid 54.5, last 5.45 -> floors 54, 5; mid has the larger
    # remainder.
    counts = _run("uniform-plus", AllocationProblem(UPLUS_LAYERS, 0.5))
    assert counts == {"first": 0, "mid": 55, "last": 5}


def test_uniform_plus_infeasible_above_its_caps() -> None:
    with pytest.raises(InfeasibleError, match=r"largest feasible ratio is 0\.900000"):
        get_allocator("uniform-plus").allocate(AllocationProblem(UPLUS_LAYERS, 0.95))
    # plain uniform can do it
    assert sum(_run("uniform", AllocationProblem(UPLUS_LAYERS, 0.95)).values()) == 114


def test_uniform_plus_user_min_ratio_wins_over_dense_first() -> None:
    layers = [LayerSpec("first", (10,), min_ratio=0.3), *UPLUS_LAYERS[1:]]
    assert _run("uniform-plus", AllocationProblem(layers, 0.5))["first"] == 3


# ---------------------------------------------------------------- ERK specifics

ERK_LAYERS = [
    LayerSpec("l1", (2, 3)),  # raw 5/6, 6 weights
    LayerSpec("l2", (4, 4, 1, 1)),  # raw 10/16, 16 weights
    LayerSpec("l3", (10, 10)),  # raw 20/100, 100 weights
]


def test_erk_raw_density() -> None:
    assert erk_raw_density((2, 3)) == pytest.approx(5 / 6)
    assert erk_raw_density((64, 3, 7, 7)) == pytest.approx((64 + 3 + 7 + 7) / (64 * 3 * 49))
    assert erk_raw_density(()) == 1.0


def test_erk_densities_follow_the_formula() -> None:
    # 122 weights, target .8 -> required 98, keep 24 = eps (5 + 10 + 20) -> eps = 24/35.
    problem = AllocationProblem(ERK_LAYERS, 0.8)
    assert problem.required_cost == 98
    eps, ratios = erk_ratios(ERK_LAYERS, problem.required_cost)
    assert eps == pytest.approx(24 / 35)
    for layer in ERK_LAYERS:
        assert 1 - ratios[layer.name] == pytest.approx(eps * erk_raw_density(layer.shape))
    # pruned 2.571, 9.143, 86.286 -> floors 2, 9, 86 (97); largest remainder: l1.
    assert _run("erk", problem) == {"l1": 3, "l2": 9, "l3": 86}


def test_erk_dense_layers_rescale_the_rest() -> None:
    # keep 61: eps = 61/35 makes l1 denser than 1 -> dense (6); 55 = eps (10 + 20) makes l2
    # dense (16); 39 = eps * 20 -> eps = 1.95, l3 keeps 39 (density .39), prunes 61.
    allocation = get_allocator("erk").allocate(AllocationProblem(ERK_LAYERS, 0.5))
    assert dict(allocation.counts) == {"l1": 0, "l2": 0, "l3": 61}
    assert allocation.info["epsilon"] == pytest.approx(1.95)
    assert allocation.info["dense_layers"] == ["l1", "l2"]


def test_erk_flops_budget_scales_eps_on_cost() -> None:
    layers = [
        LayerSpec("l1", (2, 3), unit_cost=50),
        LayerSpec("l2", (4, 4, 1, 1), unit_cost=7),
        LayerSpec("l3", (10, 10), unit_cost=1),
    ]
    problem = AllocationProblem(layers, 0.6)
    required = problem.required_cost
    eps, ratios = erk_ratios(layers, required)
    predicted = sum(ratios[la.name] * la.size * la.unit_cost for la in layers)
    assert predicted == pytest.approx(required)
    for layer in layers:
        assert ratios[layer.name] == pytest.approx(max(0.0, 1 - eps * erk_raw_density(layer.shape)))
    counts = _run("erk", problem)
    assert required <= _cost(layers, counts) < required + 50


# ---------------------------------------------------------------- property tests


def _reference_threshold(
    layers: list[LayerSpec], scores: list[FloatArray], required: int
) -> dict[str, int]:
    """Walk all weights by (score, layer, rank) until the clipped counts reach the budget."""
    bounds = [count_bounds(layer) for layer in layers]
    counts = [lo for lo, _ in bounds]

    def cost() -> int:
        return sum(k * la.unit_cost for k, la in zip(counts, layers, strict=True))

    items = sorted(
        (float(s), li, rank) for li, arr in enumerate(scores) for rank, s in enumerate(arr)
    )
    for _, li, rank in items:
        if cost() >= required:
            break
        lo, hi = bounds[li]
        counts[li] = min(max(rank + 1, lo), hi)
    return {la.name: k for la, k in zip(layers, counts, strict=True)}


def _reference_lamp(values: FloatArray) -> FloatArray:
    ordered = sorted(abs(float(v)) for v in values)
    squares = [v * v for v in ordered]
    tails = []
    acc = 0.0
    for sq in reversed(squares):
        acc += sq
        tails.append(acc)
    tails.reverse()
    return np.array([sq / t if t > 0 else 0.0 for sq, t in zip(squares, tails, strict=True)])


@st.composite
def _problems(draw: st.DrawFn, unit_costs: bool) -> AllocationProblem:
    n_layers = draw(st.integers(1, 5))
    layers = []
    mags = {}
    for i in range(n_layers):
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
        lo = draw(st.sampled_from([0.0, 0.0, 0.0, 0.2]))
        hi = draw(st.sampled_from([1.0, 1.0, 1.0, 0.9, 0.5]))
        cost = 1 if unit_costs else draw(st.integers(1, 9))
        layer = LayerSpec(f"l{i}", shape, unit_cost=cost, min_ratio=lo, max_ratio=hi)
        size = layer.size
        # a few distinct values, so ties across and within layers are common
        mags[layer.name] = np.array(
            draw(
                st.lists(
                    st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]), min_size=size, max_size=size
                )
            ),
            dtype=np.float64,
        ) * draw(st.sampled_from([1.0, 0.1, 7.0]))
        layers.append(layer)
    target = draw(st.floats(0.0, 1.0))
    return AllocationProblem(layers, target, magnitudes=mags)


def _check_allocation(method: str, problem: AllocationProblem, exact: bool) -> None:
    layers = list(problem.layers)
    try:
        bounds = [count_bounds(layer) for layer in layers]
    except InfeasibleError:
        assume(False)
    required = problem.required_cost
    capped = uniform_plus_layers(layers) if method == "uniform-plus" else layers
    cap_bounds = [count_bounds(layer) for layer in capped]
    if required > max_feasible_cost(capped):
        with pytest.raises(InfeasibleError):
            get_allocator(method).allocate(problem)
        return
    counts = _run(method, problem)
    assert list(counts) == [layer.name for layer in layers]
    assert all(type(k) is int for k in counts.values())
    for layer, (lo, _), (_, hi) in zip(layers, bounds, cap_bounds, strict=True):
        assert lo <= counts[layer.name] <= hi <= layer.size
    removed = _cost(layers, counts)
    forced = sum(lo * layer.unit_cost for (lo, _), layer in zip(bounds, layers, strict=True))
    if exact:
        assert removed == max(required, forced)
    else:
        assert removed >= required
        assert removed == forced or removed < required + max(la.unit_cost for la in layers)
    if method == "global":
        scores = [np.sort(np.abs(problem.magnitudes[la.name])) for la in layers]  # type: ignore[index]
        assert counts == _reference_threshold(layers, scores, required)
    if method == "lamp":
        scores = [_reference_lamp(problem.magnitudes[la.name]) for la in layers]  # type: ignore[index]
        assert counts == _reference_threshold(layers, scores, required)
    if method == "uniform-plus":
        first = layers[0]
        assert counts[first.name] == bounds[0][0]  # dense unless min_ratio forces
        last = layers[-1]
        assert counts[last.name] <= max(bounds[-1][0], math.floor(0.8 * last.size + 1e-9))


@pytest.mark.parametrize("method", BASELINES)
@settings(max_examples=120, deadline=None)
@given(problem=_problems(unit_costs=True))
def test_property_unit_costs_exact(method: str, problem: AllocationProblem) -> None:
    _check_allocation(method, problem, exact=True)


@pytest.mark.parametrize("method", BASELINES)
@settings(max_examples=60, deadline=None)
@given(problem=_problems(unit_costs=False))
def test_property_general_costs(method: str, problem: AllocationProblem) -> None:
    _check_allocation(method, problem, exact=False)


def test_larger_problem_is_fast_and_exact() -> None:
    rng = np.random.default_rng(0)
    shapes = [(64, 3, 7, 7), (64, 64, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (1000, 256)]
    layers = [LayerSpec(f"w{i}", s) for i, s in enumerate(shapes)]
    mags = {la.name: np.abs(rng.standard_normal(la.size)) for la in layers}
    problem = AllocationProblem(layers, 0.83, magnitudes=mags)
    for method in BASELINES:
        counts = _run(method, problem)
        assert sum(counts.values()) == problem.required_cost
