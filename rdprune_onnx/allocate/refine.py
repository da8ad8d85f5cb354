"""The adaptive grid: which curve points to measure next (pure numpy).

A layer's curve lives on a fine grid of ``levels`` ratios (``--levels``, 101 by default).
The adaptive grid measures a coarse subset first (:func:`coarse_indices`, denser toward
high sparsity where curves bend), solves the allocation, and then measures only where the
allocation can still move, until it stops asking for points.

How the unmeasured points are treated. Linear interpolation between two measured points
is *pessimistic* on a convex stretch (the chord lies above the curve: the DP is kept away
from a gap that may hold a better point) and *optimistic* on a concave one (a knee, a step:
the chord lies below the curve, and a DP on interpolated values would pick a point that is
worse in reality). Measured curves are neither convex nor monotone everywhere, so no
interpolated value is trusted for the choice: the DP (:class:`RateDistortionAllocator`)
runs on the **measured points only**, and the exact-count repair that follows interpolates
only between a chosen point and its fine-grid neighbour, which the refinement has measured.

What gets measured next (:func:`plan_refinement`), for every requested target ratio R:

* around each layer's chosen point: its two fine-grid neighbours and the midpoints of the
  unmeasured gaps on either side (bisection, so a step or a plateau edge inside a wide gap
  is found in a logarithmic number of rounds, not walked one level at a time);
* a margin: the same DP at R - ``margin`` and R + ``margin``. Moving the budget walks every
  layer along the lower convex hull of its measured curve to the neighbouring slopes, so
  those choices are the hull points whose slopes bracket the Lagrange multiplier of R; their
  neighbours and gap midpoints are measured too (with neighbours alone, the digits CNN
  ended 1% worse in predicted distortion at 0.5; with midpoints it reaches the full grid's
  allocation at 0.5 and 0.7 for about 1.5% more points), and when these choices lie within
  ``FILL_SPAN`` of each other every level between them (the MiniLM-shaped encoder's curves
  have small kinks there: without it, six layers moved at 0.5 and the measured distortion
  was 2.8% above the full grid's; with it, the same allocation for 0.3% more points).

It stops when no target asks for a point: every chosen point (at R and at the margins) has
both fine-grid neighbours measured. On curves that are convex between measured points this
is the full grid's answer; where they are not, a better point hidden in a gap no choice ever
borders stays unseen (tests/allocate/test_refine.py checks convex, non-convex, plateau and
step curves against the full grid's allocation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from rdprune_onnx.allocate.base import Allocation, AllocationProblem, Curve, LayerSpec
from rdprune_onnx.allocate.dp import IntArray
from rdprune_onnx.allocate.rd import RateDistortionAllocator

# Coarse levels measured per layer before any refinement.
COARSE_LEVELS = 11
# Budget margin (in ratio) of the extra DP solves that bracket each target's multiplier.
MARGIN = 0.01
# Widest span of a layer's choices (in ratio) that is measured whole.
FILL_SPAN = 0.08
# Refinement rounds before giving up (each round measures at least one new point).
MAX_ROUNDS = 60


def coarse_indices(levels: int, count: int = COARSE_LEVELS) -> IntArray:
    """Fine-grid indices of the first points measured: ``count`` levels from 0 to 1,
    denser toward 1 (ratio = 1 - (1 - t)^2 for t evenly spaced). Every index when the fine
    grid is not finer than that."""
    if levels <= count:
        return np.arange(levels, dtype=np.int64)
    t = np.linspace(0.0, 1.0, count)
    ratios = 1.0 - (1.0 - t) ** 2
    return np.unique(np.rint(ratios * (levels - 1)).astype(np.int64))


def grid_indices(curve: Curve, levels: int) -> IntArray:
    """The fine-grid index of each of ``curve``'s ratios; ValueError if one is off the grid."""
    position = np.asarray(curve.ratios, dtype=np.float64) * (levels - 1)
    index = np.rint(position).astype(np.int64)
    if np.any(np.abs(position - index) > 1e-6) or np.any(index < 0) or np.any(index >= levels):
        raise ValueError(f"curve {curve.name}: ratios are not on the {levels}-level grid")
    return index


def merge(old: Curve | None, new: Curve) -> Curve:
    """Both curves' points in one, ordered by ratio (``new`` wins where both have one)."""
    if old is None:
        return new
    values = dict(zip(old.ratios.tolist(), old.distortion.tolist(), strict=True))
    values.update(zip(new.ratios.tolist(), new.distortion.tolist(), strict=True))
    ratios = np.array(sorted(values), dtype=np.float64)
    return Curve(new.name, ratios, np.array([values[r] for r in ratios.tolist()]))


def interpolated(curve: Curve, levels: int) -> Curve:
    """``curve`` on the whole fine grid, linear between its measured points (for plots
    and reading; allocations use the measured points)."""
    ratios = np.linspace(0.0, 1.0, levels)
    return Curve(curve.name, ratios, np.interp(ratios, curve.ratios, curve.distortion))


@dataclass(frozen=True)
class Plan:
    """The points one refinement round asks for, and the allocations it saw."""

    points: dict[str, IntArray]  # layer -> new fine-grid indices, ascending
    allocations: dict[float, Allocation] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(sum(p.size for p in self.points.values()))


def _around(x: float, measured: IntArray, levels: int) -> set[int]:
    """Unmeasured fine indices next to position ``x`` (a fine-grid coordinate): the
    neighbours of the grid points at or around it, and the midpoints of the unmeasured gaps
    beside it."""
    lo = max(0, math.floor(x + 1e-9) - 1)
    hi = min(levels - 1, math.ceil(x - 1e-9) + 1)
    wanted = set(range(lo, hi + 1))
    left = measured[measured < math.floor(x + 1e-9)]
    right = measured[measured > math.ceil(x - 1e-9)]
    if left.size:
        wanted.add((int(left[-1]) + math.floor(x + 1e-9) + 1) // 2)
    if right.size:
        wanted.add((int(right[0]) + math.ceil(x - 1e-9)) // 2)
    known = set(measured.tolist())
    return {i for i in wanted if i not in known}


def _position(count: int, measured: IntArray, levels: int, size: int) -> float:
    """The fine-grid position of a chosen count: the measured level that prunes it (the
    closest to it when several round to it), else its place between levels."""
    exact = measured * size / (levels - 1)
    counts = np.floor(exact + 0.5 + 1e-9)
    hits = np.flatnonzero(counts == count)
    if hits.size:
        return float(measured[hits[np.argmin(np.abs(exact[hits] - count))]])
    return count * (levels - 1) / size


def plan_refinement(
    layers: Sequence[LayerSpec],
    curves: Mapping[str, Curve],
    levels: int,
    targets: Sequence[float],
    *,
    options: Mapping[str, object] | None = None,
    margin: float = MARGIN,
) -> Plan:
    """The points to measure next so that the allocations at ``targets`` can settle.

    ``curves`` hold the measured points (ratios on the ``levels`` grid). Empty ``points``:
    every target's allocation (and its margins) sits on measured points whose fine-grid
    neighbours are measured, i.e. the curves cover these targets.
    """
    allocator = RateDistortionAllocator()
    measured = {layer.name: grid_indices(curves[layer.name], levels) for layer in layers}
    wanted: dict[str, set[int]] = {layer.name: set() for layer in layers}
    allocations: dict[float, Allocation] = {}
    for target in targets:
        spans: dict[str, list[float]] = {}
        budgets = [target]
        if margin > 0:
            budgets += [t for t in (target - margin, target + margin) if 0.0 < t < 1.0]
        for budget in budgets:
            problem = AllocationProblem(layers, budget, curves, options=dict(options or {}))
            allocation = allocator.allocate(problem)
            if budget == target:
                allocations[float(target)] = allocation
            grid_counts = allocation.info.get("grid_counts", {})
            assert isinstance(grid_counts, Mapping)
            for layer in layers:
                known = measured[layer.name]
                chosen = _position(int(grid_counts[layer.name]), known, levels, layer.size)
                final = int(allocation.counts[layer.name]) * (levels - 1) / layer.size
                for x in {chosen, final}:
                    wanted[layer.name] |= _around(x, known, levels)
                    spans.setdefault(layer.name, []).append(x)
        # Where a layer's choices at R - margin .. R + margin lie close together, every level
        # between them (small kinks of measured curves hide there; a wide span, e.g. a layer
        # jumping across a plateau, keeps the bisection above).
        widest = max(1, round(FILL_SPAN * (levels - 1)))
        for name, xs in spans.items():
            lo, hi = math.floor(min(xs) + 1e-9), math.ceil(max(xs) - 1e-9)
            if hi - lo <= widest:
                have = set(measured[name].tolist())
                wanted[name] |= {i for i in range(lo, hi + 1) if i not in have}
    points = {
        name: np.array(sorted(indices), dtype=np.int64)
        for name, indices in wanted.items()
        if indices
    }
    return Plan(points, allocations)


Measure = Callable[[Mapping[str, IntArray], int], Mapping[str, Curve]]


@dataclass
class Refinement:
    """Curves with the points measured so far, and how many each round measured."""

    curves: dict[str, Curve]
    rounds: list[int]
    converged: bool

    @property
    def measured(self) -> int:
        return int(sum(c.ratios.size for c in self.curves.values()))


def refine(
    layers: Sequence[LayerSpec],
    levels: int,
    targets: Sequence[float],
    measure: Measure,
    *,
    done: Mapping[str, Curve] | None = None,
    full: bool = False,
    options: Mapping[str, object] | None = None,
    margin: float = MARGIN,
    coarse: int = COARSE_LEVELS,
    max_rounds: int = MAX_ROUNDS,
) -> Refinement:
    """Measure the points the allocations at ``targets`` need (``full``: every point).

    ``measure(points, round)`` measures the fine-grid indices ``points[layer]`` and returns
    each such layer's curve at them (new points only). ``done`` holds points measured
    before (a cache, a curves file): they are kept and never measured again. Round 0 is the
    coarse grid (or the whole grid), each later round one :func:`plan_refinement`.
    """
    curves: dict[str, Curve] = {n: c for n, c in (done or {}).items()}
    rounds: list[int] = []
    first = np.arange(levels, dtype=np.int64) if full else coarse_indices(levels, coarse)
    todo: dict[str, IntArray] = {}
    for layer in layers:
        have = grid_indices(curves[layer.name], levels) if layer.name in curves else None
        missing = first if have is None else np.setdiff1d(first, have)
        if missing.size:
            todo[layer.name] = missing
    converged = full
    for number in range(max_rounds + 1):
        if todo:
            new = measure(todo, number)
            for name in todo:
                curves[name] = merge(curves.get(name), new[name])
            rounds.append(int(sum(p.size for p in todo.values())))
        if full:
            break
        todo = plan_refinement(
            layers, curves, levels, targets, options=options, margin=margin
        ).points
        if not todo:
            converged = True
            break
    return Refinement(curves, rounds, converged)


__all__ = [
    "COARSE_LEVELS",
    "FILL_SPAN",
    "MARGIN",
    "MAX_ROUNDS",
    "Measure",
    "Plan",
    "Refinement",
    "coarse_indices",
    "grid_indices",
    "interpolated",
    "merge",
    "plan_refinement",
    "refine",
]
