"""The adaptive grid's refinement on synthetic curves with known full-grid answers.

Measuring is looking a point up in a synthetic full curve; the answer the refinement must
reach is the rd allocation on the whole grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest

from rdprune_onnx.allocate import AllocationProblem, Curve, LayerSpec
from rdprune_onnx.allocate.dp import IntArray
from rdprune_onnx.allocate.rd import RateDistortionAllocator
from rdprune_onnx.allocate.refine import (
    coarse_indices,
    grid_indices,
    interpolated,
    merge,
    plan_refinement,
    refine,
)

LEVELS = 101
GRID = np.linspace(0.0, 1.0, LEVELS)
TARGETS = (0.5, 0.7, 0.9)
Shape = Callable[[np.random.Generator], np.ndarray]


def _convex(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.1, 10.0) * GRID ** rng.uniform(1.5, 8.0)


def _sigmoid(rng: np.random.Generator) -> np.ndarray:
    # Convex, then concave: a knee the chord between coarse points hides.
    centre, width = rng.uniform(0.4, 0.9), rng.uniform(10.0, 40.0)
    value: np.ndarray = rng.uniform(0.1, 10.0) / (1.0 + np.exp(-(GRID - centre) * width))
    return value


def _bumps(rng: np.random.Generator) -> np.ndarray:
    # Non-convex and non-monotone: smooth ripples on a rising curve.
    scale = rng.uniform(0.1, 10.0)
    ripple = 0.03 * np.sin(rng.uniform(8.0, 20.0) * GRID + rng.uniform(0, 6.0))
    value: np.ndarray = scale * (GRID ** rng.uniform(2.0, 6.0) + ripple * GRID)
    return value


def _plateau(rng: np.random.Generator) -> np.ndarray:
    # Exactly flat (free) up to a layer-specific ratio, then a steep rise.
    start = rng.uniform(0.2, 0.8)
    value: np.ndarray = rng.uniform(0.1, 10.0) * np.clip(GRID - start, 0.0, None) ** 2
    return value


def _steps(rng: np.random.Generator) -> np.ndarray:
    # A staircase: flat treads, with edges between the coarse levels.
    edges = np.sort(rng.uniform(0.3, 0.97, size=3))
    value: np.ndarray = rng.uniform(0.1, 10.0) * (
        np.searchsorted(edges, GRID, side="right") + 0.05 * GRID
    )
    return value


SHAPES: dict[str, Shape] = {
    "convex": _convex,
    "nonconvex": _bumps,
    "knee": _sigmoid,
    "plateau": _plateau,
    "steps": _steps,
}


def _problem(shape: Shape, seed: int, count: int = 8) -> tuple[list[LayerSpec], dict[str, Curve]]:
    rng = np.random.default_rng(seed)
    layers = [LayerSpec(f"l{i}", (int(rng.integers(50, 5000)),)) for i in range(count)]
    curves = {layer.name: Curve(layer.name, GRID.copy(), shape(rng)) for layer in layers}
    return layers, curves


def _lookup(full: Mapping[str, Curve], seen: list[int]) -> Callable[..., dict[str, Curve]]:
    def measure(points: Mapping[str, IntArray], number: int) -> dict[str, Curve]:
        seen.append(number)
        return {n: Curve(n, GRID[i], full[n].distortion[i]) for n, i in points.items()}

    return measure


def _true_objective(
    layers: list[LayerSpec], full: Mapping[str, Curve], counts: Mapping[str, int]
) -> float:
    return sum(
        float(np.interp(counts[s.name] / s.size, GRID, full[s.name].distortion)) for s in layers
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_refinement_reaches_the_full_grid_allocation(kind: str, seed: int) -> None:
    layers, full = _problem(SHAPES[kind], seed)
    rounds: list[int] = []
    result = refine(layers, LEVELS, TARGETS, _lookup(full, rounds))
    assert result.converged
    assert rounds == list(range(len(rounds)))  # round 0 (coarse), then one per round
    # Every measured value is the full curve's at that level (nothing invented).
    for name, curve in result.curves.items():
        index = grid_indices(curve, LEVELS)
        np.testing.assert_array_equal(curve.distortion, full[name].distortion[index])
    assert result.measured < 0.5 * len(layers) * LEVELS
    allocator = RateDistortionAllocator()
    for target in TARGETS:
        want = allocator.allocate(AllocationProblem(layers, target, full))
        got = allocator.allocate(AllocationProblem(layers, target, result.curves))
        assert sum(got.counts.values()) == sum(want.counts.values())
        if got.counts != want.counts:
            # Another allocation is acceptable only as good on the true curves; on rippled
            # curves a better level inside a gap no choice borders can stay unseen
            # (measured: 0.07% worse once in these 9 cases).
            slack = 1e-3 if kind == "nonconvex" else 1e-9
            assert (
                _true_objective(layers, full, got.counts)
                <= _true_objective(layers, full, want.counts) * (1 + slack) + 1e-12
            ), (kind, seed, target)


def test_full_curves_need_no_refinement() -> None:
    layers, full = _problem(_convex, 0)
    assert plan_refinement(layers, full, LEVELS, TARGETS).points == {}


def test_coarse_curves_ask_for_points_near_the_choice_only() -> None:
    layers, full = _problem(_convex, 3)
    first = coarse_indices(LEVELS)
    coarse = {n: Curve(n, GRID[first], c.distortion[first]) for n, c in full.items()}
    plan = plan_refinement(layers, coarse, LEVELS, [0.7])
    assert plan.points and 0.7 in plan.allocations
    for name, points in plan.points.items():
        assert not set(points.tolist()) & set(first.tolist())  # never a measured level
        chosen = plan.allocations[0.7].counts[name] / layers[int(name[1:])].size * (LEVELS - 1)
        # Neighbours, gap midpoints and the margin's choices: all near a choice.
        assert np.min(np.abs(points - chosen)) <= 10


def test_coarse_indices_are_denser_toward_high_sparsity() -> None:
    index = coarse_indices(101)
    assert index[0] == 0 and index[-1] == 100 and 9 <= index.size <= 11
    gaps = np.diff(index)
    assert np.all(np.diff(gaps) <= 0)  # steps shrink toward 1
    np.testing.assert_array_equal(coarse_indices(7), np.arange(7))


def test_merge_and_grid_indices() -> None:
    a = Curve("w", np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 4.0]))
    b = Curve("w", np.array([0.25, 0.5]), np.array([0.5, 2.0]))
    merged = merge(a, b)
    np.testing.assert_array_equal(merged.ratios, [0.0, 0.25, 0.5, 1.0])
    np.testing.assert_array_equal(merged.distortion, [0.0, 0.5, 2.0, 4.0])
    np.testing.assert_array_equal(grid_indices(merged, 5), [0, 1, 2, 4])
    with pytest.raises(ValueError, match="not on the 3-level grid"):
        grid_indices(merged, 3)
    full = interpolated(a, 5)
    np.testing.assert_allclose(full.distortion, [0.0, 0.5, 1.0, 2.5, 4.0])


def test_points_measured_before_are_kept() -> None:
    layers, full = _problem(_plateau, 1)
    first: list[int] = []
    once = refine(layers, LEVELS, [0.8], _lookup(full, first))
    again: list[int] = []
    resumed = refine(layers, LEVELS, [0.8], _lookup(full, again), done=once.curves)
    assert again == [] and resumed.measured == once.measured  # nothing to measure
    whole = refine(layers, LEVELS, [0.8], _lookup(full, again), done=once.curves, full=True)
    assert whole.rounds == [len(layers) * LEVELS - once.measured]
