"""Exact-count rounding shared by every ratio-based allocator.

An allocator that thinks in per-layer ratios (uniform, uniform-plus, ERK) hands them to
:func:`counts_from_ratios`, which turns them into whole-weight counts whose removed cost meets
the budget exactly (for unit costs of 1) without leaving any layer's bounds. The helpers here
also give each layer's bounds in whole weights (:func:`count_bounds`), check that a budget can
be met at all (:func:`check_feasible`), and solve the one-parameter "water-filling" equations
the ratio-based allocators need (:func:`solve_clipped_linear`).

Budget arithmetic is in integers (python ``int``): a removed cost is
``sum(count * layer.unit_cost)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from rdprune_onnx.allocate.base import FloatArray, LayerSpec
from rdprune_onnx.errors import InfeasibleError, UserError

# Relative tolerance when turning a real-valued count (ratio * size) into whole weights, so
# that 0.3 * 10 = 3.0000000000000004 counts as 3 and not 4.
_REL_TOL = 1e-9
# Largest dynamic-programming table (cells) the general-cost rounding refinement may build.
_DP_MAX_CELLS = 20_000_000


def tolerance(x: float) -> float:
    """The slack allowed when rounding the real count ``x`` (relative, 1e-9): a bound
    that is a whole number up to float error rounds to that number."""
    return _REL_TOL * max(1.0, abs(x))


def count_bounds(layer: LayerSpec) -> tuple[int, int]:
    """Fewest and most weights of ``layer`` that may be pruned under its ratio bounds.

    ``min_ratio * size`` is rounded up and ``max_ratio * size`` down (within a relative
    tolerance of 1e-9), so the counts never leave the bounds. Raises
    :class:`~rdprune_onnx.errors.InfeasibleError` when no whole count fits between them.
    """
    if layer.unit_cost < 1:
        raise ValueError(f"layer {layer.name}: unit_cost must be >= 1, got {layer.unit_cost}")
    lo, hi = count_range(layer)
    if lo > hi:
        raise InfeasibleError(
            f"layer {layer.name}: no whole number of its {layer.size} weights lies between "
            f"min_ratio {layer.min_ratio:g} and max_ratio {layer.max_ratio:g}",
            "widen that layer's ratio bounds",
        )
    return lo, hi


def count_range(layer: LayerSpec) -> tuple[int, int]:
    """``ceil(min_ratio * size)`` and ``floor(max_ratio * size)``, within 1e-9 and clipped to
    ``[0, size]``; the first may exceed the second (callers say so in their own words)."""
    n = layer.size
    lo_x = float(layer.min_ratio) * n
    hi_x = float(layer.max_ratio) * n
    if math.isnan(lo_x) or math.isnan(hi_x):
        raise ValueError(f"layer {layer.name}: ratio bounds must not be NaN")
    lo = min(n, max(0, math.ceil(lo_x - tolerance(lo_x))))
    hi = min(n, max(0, math.floor(hi_x + tolerance(hi_x))))
    return lo, hi


def ratio_bounds(layers: Sequence[LayerSpec]) -> tuple[FloatArray, FloatArray]:
    """Each layer's :func:`count_bounds` as ratios of its size (a size of 0 counts as 1)."""
    sizes = np.array([max(layer.size, 1) for layer in layers], dtype=np.float64)
    bounds = np.array([count_bounds(layer) for layer in layers], dtype=np.float64).reshape(-1, 2)
    return bounds[:, 0] / sizes, bounds[:, 1] / sizes


def total_cost(layers: Sequence[LayerSpec]) -> int:
    """Budget units of all weights of ``layers``."""
    return sum(layer.size * layer.unit_cost for layer in layers)


def removed_cost(layers: Sequence[LayerSpec], counts: Mapping[str, int]) -> int:
    """Budget units removed by pruning ``counts[layer.name]`` weights of each layer."""
    return sum(int(counts[layer.name]) * layer.unit_cost for layer in layers)


def achieved_ratio(layers: Sequence[LayerSpec], counts: Mapping[str, int]) -> float:
    """Fraction of the total budget (``sum size * unit_cost``) that ``counts`` removes."""
    total = total_cost(layers)
    return removed_cost(layers, counts) / total if total else 0.0


def method_info(
    method: str, layers: Sequence[LayerSpec], counts: Mapping[str, int], **details: object
) -> dict[str, object]:
    """An allocation's info: the method's name, its own ``details``, then the achieved ratio."""
    return {"method": method, **details, "achieved_ratio": achieved_ratio(layers, counts)}


def max_feasible_cost(layers: Sequence[LayerSpec]) -> int:
    """Most budget units that can be removed without breaking any layer's ``max_ratio``."""
    return sum(count_bounds(layer)[1] * layer.unit_cost for layer in layers)


def check_feasible(
    layers: Sequence[LayerSpec], required_cost: int, rule: str | None = None
) -> None:
    """Raise :class:`InfeasibleError` when ``required_cost`` cannot be removed under the bounds.

    The message names the largest feasible ratio. ``rule`` describes an allocator's own extra
    bounds (e.g. uniform-plus keeping the first layer dense) for the message.
    """
    best = max_feasible_cost(layers)
    if required_cost <= best:
        return
    total = total_cost(layers)
    largest = best / total if total else 0.0
    wanted = required_cost / total if total else math.inf
    under = "the per-layer bounds" + (f" and {rule}" if rule else "")
    raise InfeasibleError(
        f"cannot prune {wanted:.6g} of the budget ({required_cost} of {total} units) under "
        f"{under}: the largest feasible ratio is {largest:.6f}",
        f"lower the target ratio to at most {largest:.6f} or relax the layer constraints",
    )


def validate_target(target_ratio: float) -> None:
    """Raise :class:`UserError` unless ``0 <= target_ratio <= 1``."""
    if not 0.0 <= float(target_ratio) <= 1.0:
        raise UserError(
            f"target ratio must lie in [0, 1], got {target_ratio!r}",
            "give the fraction of weights to prune, e.g. 0.8",
        )


def solve_clipped_linear(
    weights: FloatArray,
    offsets: FloatArray,
    slopes: FloatArray,
    lows: FloatArray,
    highs: FloatArray,
    target: float,
) -> float:
    """Solve ``sum_l weights_l * clip(offsets_l + slopes_l * t, lows_l, highs_l) = target``.

    Water-filling in one parameter ``t``: ``slopes`` must be >= 0, so the left side is a
    continuous, non-decreasing, piecewise-linear function of ``t``; its breakpoints are where a
    term hits its low or high bound. Returns the exact ``t`` (up to floating point) when the
    target lies in the function's range, otherwise the first breakpoint (target below the
    range: every term at its low bound) or the last one (target above: every term at its
    high bound). Returns 0.0 when no term depends on ``t``.
    """
    w = np.asarray(weights, dtype=np.float64)
    a = np.asarray(offsets, dtype=np.float64)
    b = np.asarray(slopes, dtype=np.float64)
    lo = np.asarray(lows, dtype=np.float64)
    hi = np.asarray(highs, dtype=np.float64)
    if np.any(b < 0):
        raise ValueError("slopes must be non-negative")
    moving = b > 0
    if not np.any(moving):
        return 0.0
    breaks = np.unique(
        np.concatenate([(lo[moving] - a[moving]) / b[moving], (hi[moving] - a[moving]) / b[moving]])
    )
    values = np.clip(a[None, :] + b[None, :] * breaks[:, None], lo[None, :], hi[None, :]) @ w
    # Guard against rounding making the (mathematically monotone) values dip.
    values = np.maximum.accumulate(values)
    k = int(np.searchsorted(values, target, side="left"))
    if k == 0:
        return float(breaks[0])
    if k == breaks.size:
        return float(breaks[-1])
    t0, t1 = float(breaks[k - 1]), float(breaks[k])
    f0, f1 = float(values[k - 1]), float(values[k])
    if f1 <= f0:
        return t1
    return t0 + (target - f0) * (t1 - t0) / (f1 - f0)


def counts_from_ratios(
    layers: Sequence[LayerSpec], ratios: Mapping[str, float], required_cost: int
) -> dict[str, int]:
    """Whole-weight prune counts close to ``ratios`` whose removed cost meets the budget.

    Each layer's real-valued count ``ratio * size`` (clipped to its bounds) is floored; the
    weights still missing are then handed out one per layer in order of largest remainder
    (ties: earlier layer first), round after round, until the removed cost reaches
    ``required_cost``. With every unit cost 1 the result removes exactly ``required_cost``.
    With general unit costs the greedy pass can overshoot by less than one weight's cost; a
    small dynamic program then finds the smallest removed cost >= ``required_cost`` reachable
    by adding weights on top of the floors (keeping each layer's count as close to the greedy
    choice as possible), unless its table would exceed 2e7 cells, in which case the greedy
    result stands. If the floors already remove more than required (ratios above the budget),
    weights are taken back in order of smallest remainder first (ties: later layer first)
    before the above. Counts never leave ``[ceil(min_ratio*size), floor(max_ratio*size)]``;
    when the minimum bounds alone remove more than required, the minimum counts are returned.

    Raises :class:`InfeasibleError` when the budget cannot be met under the bounds.
    """
    layers = list(layers)
    required = max(0, int(required_cost))
    bounds = [count_bounds(layer) for layer in layers]
    check_feasible(layers, required)
    costs = [int(layer.unit_cost) for layer in layers]
    exact: list[float] = []
    for layer, (lo, hi) in zip(layers, bounds, strict=True):
        r = float(ratios[layer.name])
        if not math.isfinite(r):
            raise ValueError(f"layer {layer.name}: ratio must be finite, got {r!r}")
        exact.append(min(max(r * layer.size, float(lo)), float(hi)))
    counts = [
        min(max(math.floor(x + tolerance(x)), lo), hi)
        for x, (lo, hi) in zip(exact, bounds, strict=True)
    ]
    cost = sum(k * c for k, c in zip(counts, costs, strict=True))
    if cost > required:
        cost = _shrink(counts, exact, bounds, costs, required, cost)
    if cost < required:
        counts = _grow(counts, exact, bounds, costs, required, cost)
    return {layer.name: int(k) for layer, k in zip(layers, counts, strict=True)}


def counts_by_ratios(
    layers: Sequence[LayerSpec],
    required_cost: int,
    solve: Callable[[Sequence[LayerSpec], int], tuple[float, dict[str, float]]],
    rule: str | None = None,
) -> tuple[float, dict[str, int]]:
    """A ratio-based allocator's whole run: the budget checked (``rule`` as in
    :func:`check_feasible`), then ``solve``'s parameter and per-layer ratios, then exact
    counts (:func:`counts_from_ratios`). Returns the parameter and the counts."""
    check_feasible(layers, required_cost, rule)
    value, ratios = solve(layers, required_cost)
    return value, counts_from_ratios(layers, ratios, required_cost)


def _remainder_key(exact: float, count: int) -> int:
    """``exact - count`` in steps of 1e-9, so remainders equal up to float noise tie."""
    return round((exact - count) * 1e9)


def _shrink(
    counts: list[int],
    exact: list[float],
    bounds: list[tuple[int, int]],
    costs: list[int],
    required: int,
    cost: int,
) -> int:
    """Take weights back (in place) until the removed cost is <= required; return it."""
    order = sorted(range(len(counts)), key=lambda i: (_remainder_key(exact[i], counts[i]), -i))
    while cost > required:
        active = [i for i in order if counts[i] > bounds[i][0]]
        if not active:
            break  # the minimum bounds alone remove more than required
        pass_cost = sum(costs[i] for i in active)
        rounds = min((cost - required) // pass_cost, min(counts[i] - bounds[i][0] for i in active))
        if rounds > 0:
            for i in active:
                counts[i] -= rounds
            cost -= rounds * pass_cost
            continue
        for i in active:
            counts[i] -= 1
            cost -= costs[i]
            if cost <= required:
                break
    return cost


def _grow(
    base: list[int],
    exact: list[float],
    bounds: list[tuple[int, int]],
    costs: list[int],
    required: int,
    cost: int,
) -> list[int]:
    """Add weights on top of ``base`` until the removed cost reaches ``required``."""
    order = sorted(range(len(base)), key=lambda i: (-_remainder_key(exact[i], base[i]), i))
    counts = list(base)
    while cost < required:
        active = [i for i in order if counts[i] < bounds[i][1]]
        if not active:  # pragma: no cover - excluded by check_feasible
            raise InfeasibleError("budget cannot be met under the per-layer bounds")
        pass_cost = sum(costs[i] for i in active)
        rounds = min((required - cost) // pass_cost, min(bounds[i][1] - counts[i] for i in active))
        if rounds > 0:
            for i in active:
                counts[i] += rounds
            cost += rounds * pass_cost
            continue
        for i in active:
            counts[i] += 1
            cost += costs[i]
            if cost >= required:
                break
    if cost > required:
        counts = _refine(base, counts, bounds, costs, required, order)
    return counts


def _refine(
    base: list[int],
    greedy: list[int],
    bounds: list[tuple[int, int]],
    costs: list[int],
    required: int,
    order: list[int],
) -> list[int]:
    """Smallest removed cost >= required reachable from ``base`` by adding weights.

    Bounded subset-sum over the extra weights (in units of the gcd of the unit costs), solved
    with one reachability array per suffix of ``order``; the walk back prefers, layer by layer
    in ``order``, the extra count closest to the greedy one.
    """
    movable = [i for i in order if bounds[i][1] > base[i]]
    step = 0
    for i in movable:
        step = math.gcd(step, costs[i])
    base_cost = sum(k * c for k, c in zip(base, costs, strict=True))
    greedy_cost = sum(k * c for k, c in zip(greedy, costs, strict=True))
    need = -(-(required - base_cost) // step)
    width = (greedy_cost - base_cost) // step
    if width <= need or (len(movable) + 1) * (width + 1) > _DP_MAX_CELLS:
        return greedy
    unit = [costs[i] // step for i in movable]
    cap = [min(bounds[i][1] - base[i], width // u) for i, u in zip(movable, unit, strict=True)]
    reach = np.zeros((len(movable) + 1, width + 1), dtype=bool)
    reach[len(movable), 0] = True
    for pos in range(len(movable) - 1, -1, -1):
        reach[pos] = _reach_update(reach[pos + 1], unit[pos], cap[pos])
    best = need + int(np.flatnonzero(reach[0, need:])[0])
    if best >= width:
        return greedy
    result = list(base)
    left = best
    for pos, i in enumerate(movable):
        js = np.arange(min(cap[pos], left // unit[pos]) + 1, dtype=np.int64)
        ok = js[reach[pos + 1][left - js * unit[pos]]]
        wanted = greedy[i] - base[i]
        pick = int(ok[np.lexsort((ok, np.abs(ok - wanted)))[0]])
        result[i] += pick
        left -= pick * unit[pos]
    assert left == 0
    return result


def _reach_update(reach: np.ndarray, unit: int, cap: int) -> np.ndarray:
    """``out[v] = any(reach[v - j*unit] for j in 0..cap)``: one bounded item type added."""
    n = reach.size
    rows = -(-n // unit)
    grid = np.zeros(rows * unit, dtype=np.int64)
    grid[:n] = reach
    sums = np.cumsum(grid.reshape(rows, unit), axis=0)
    if cap + 1 < rows:
        sums[cap + 1 :] = sums[cap + 1 :] - sums[: rows - cap - 1]
    out: np.ndarray = (sums > 0).reshape(-1)[:n]
    return out
