"""Rate-distortion allocation: the exact DP on the measured curves, then an exact-count repair.

Each layer's options are the grid levels of its measured curve that lie within the layer's
bounds (plus the bounds themselves, with linearly interpolated distortion, when they fall
between grid levels). Level ``s`` prunes ``round(s * n)`` whole weights. Pruning a whole layer
(count ``n``) is excluded unless ``problem.options["allow_layer_removal"]`` is truthy.

:func:`rdprune_onnx.allocate.dp.solve_mckp` picks one option per layer, optimally. Grid levels
overshoot the budget, so :func:`repair_counts` then moves counts off the grid (the curve is
linearly interpolated between grid levels, in whole weights) until the removed cost is the
smallest achievable value at or above the requirement: exactly ``required`` weights when every
unit cost is 1.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rdprune_onnx.allocate.base import (
    Allocation,
    AllocationProblem,
    Curve,
    FloatArray,
    LayerSpec,
)
from rdprune_onnx.allocate.dp import IntArray, lagrangian_bound, solve_mckp
from rdprune_onnx.allocate.rounding import count_range
from rdprune_onnx.errors import InfeasibleError, UserError

_EPS = 1e-9
# Exchange repair: largest number of candidate moves examined per pair of layers.
_MAX_EXCHANGE_SPAN = 1 << 14
_MAX_REPAIR_ROUNDS = 64


@dataclass(frozen=True)
class LayerOptions:
    """The pruning options of one layer, in whole weights, and its curve in count space."""

    name: str
    size: int
    unit_cost: int
    counts: IntArray  # weights pruned by each option, strictly ascending
    values: FloatArray  # predicted distortion of each option
    knot_counts: IntArray  # the whole curve in count space (for interpolation), ascending
    knot_values: FloatArray

    @property
    def lower(self) -> int:
        return int(self.counts[0])

    @property
    def upper(self) -> int:
        return int(self.counts[-1])

    def distortion_at(self, count: int) -> float:
        """Curve distortion at a whole-weight count, linear between grid levels."""
        return float(np.interp(float(count), self.knot_counts, self.knot_values))

    def distortion_many(self, counts: IntArray) -> FloatArray:
        return np.interp(counts.astype(np.float64), self.knot_counts, self.knot_values)


def _round_half_up(x: FloatArray) -> IntArray:
    return np.floor(x + 0.5 + _EPS * np.maximum(1.0, np.abs(x))).astype(np.int64)


def build_options(
    layer: LayerSpec, curve: Curve, *, allow_layer_removal: bool, keep_one: bool = False
) -> LayerOptions:
    """Options of one layer from its curve, restricted to the layer's bounds.

    Grid level s becomes count round(s * n) (halves round up) with the measured distortion;
    levels that round to the same count keep the one closest to it. The bounds become counts
    ceil(min_ratio * n) and floor(max_ratio * n); a bound strictly between two grid counts is
    added as an option with linearly interpolated distortion. Count n (the whole layer) is
    dropped unless ``allow_layer_removal``. With ``keep_one`` (used only when the grid alone
    cannot reach the target) n - 1 is added as the top option, interpolated.
    """
    n = layer.size
    s, d = _checked_curve(layer, curve)
    knot_k, knot_d = _grid_counts(s, d, n)
    lo_k, hi_k = count_range(layer)
    if lo_k > hi_k:
        raise InfeasibleError(
            f"layer {layer.name}: no whole-weight count lies within its bounds "
            f"[{layer.min_ratio}, {layer.max_ratio}] ({n} weights)",
            "widen the bounds",
        )
    # keep_one: a layer may go down to a single weight (interpolated between the last grid
    # level below 1 and the measured 1.0). That is a layer removed in all but name, so it
    # is offered only when the grid cannot meet the target otherwise.
    top = min(hi_k, n - 1) if keep_one and not allow_layer_removal else hi_k
    c_arr, v_arr = _options_within(knot_k, knot_d, lo_k, hi_k, top)
    if not allow_layer_removal:
        keep = c_arr < n
        c_arr, v_arr = c_arr[keep], v_arr[keep]
    if c_arr.size == 0:
        hint = (
            "widen the bounds or measure the curve over them"
            if allow_layer_removal or lo_k < n
            else "min_ratio 1 removes the whole layer: set allow_layer_removal"
        )
        raise UserError(
            f"layer {layer.name}: no level of its curve ({s[0]:g}..{s[-1]:g}) lies within its "
            f"bounds [{layer.min_ratio}, {layer.max_ratio}]",
            hint,
        )
    order = np.argsort(c_arr, kind="stable")
    c_arr, v_arr = c_arr[order], v_arr[order]
    uniq = np.ones(c_arr.size, dtype=bool)
    uniq[1:] = c_arr[1:] != c_arr[:-1]
    return LayerOptions(
        name=layer.name,
        size=n,
        unit_cost=int(layer.unit_cost),
        counts=c_arr[uniq],
        values=v_arr[uniq],
        knot_counts=knot_k,
        knot_values=knot_d,
    )


def _checked_curve(layer: LayerSpec, curve: Curve) -> tuple[FloatArray, FloatArray]:
    """The curve's ratios and distortions as float64, after checking them and the bounds."""
    s = np.asarray(curve.ratios, dtype=np.float64)
    d = np.asarray(curve.distortion, dtype=np.float64)
    if s.size == 0:
        raise UserError(f"layer {layer.name}: its curve is empty", "measure the curves again")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(d))):
        raise UserError(f"layer {layer.name}: its curve has non-finite values")
    if np.any(s < 0.0) or np.any(s > 1.0) or np.any(np.diff(s) <= 0.0):
        raise UserError(f"layer {layer.name}: curve ratios must be strictly ascending in [0, 1]")
    if not 0.0 <= layer.min_ratio <= layer.max_ratio <= 1.0:
        raise UserError(
            f"layer {layer.name}: bounds [{layer.min_ratio}, {layer.max_ratio}] are invalid",
            "use 0 <= min_ratio <= max_ratio <= 1",
        )
    return s, d


def _grid_counts(s: FloatArray, d: FloatArray, n: int) -> tuple[IntArray, FloatArray]:
    """Grid levels as whole-weight counts round(s * n), ascending; of the levels that round
    to the same count, the one closest to it."""
    k = np.clip(_round_half_up(s * n), 0, n)
    err = np.abs(s * n - k)
    order = np.lexsort((err, k))
    first = np.ones(order.size, dtype=bool)
    first[1:] = k[order][1:] != k[order][:-1]
    pick = np.sort(order[first])
    return k[pick], d[pick]


def _options_within(
    knot_k: IntArray, knot_d: FloatArray, lo_k: int, hi_k: int, top: int
) -> tuple[IntArray, FloatArray]:
    """Grid counts within [lo_k, hi_k], then the bounds ``lo_k`` and ``top`` where they fall
    strictly between grid counts (distortion interpolated); unsorted, may repeat."""
    inside = (knot_k >= lo_k) & (knot_k <= hi_k)
    counts = list(knot_k[inside])
    values = list(knot_d[inside])
    knot_set = {int(c) for c in knot_k}
    for bound in (lo_k, top):
        if knot_k[0] < bound < knot_k[-1] and bound not in knot_set:
            counts.append(bound)
            values.append(float(np.interp(float(bound), knot_k.astype(np.float64), knot_d)))
    return np.asarray(counts, dtype=np.int64), np.asarray(values, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Exact-count repair


def _decrease_greedy(
    options: Sequence[LayerOptions], k: list[int], excess: int, knots: Sequence[list[int]]
) -> tuple[int, int]:
    """Un-prune whole weights, best saving per cost unit first, while the excess allows.

    Moves run along linear pieces of the interpolated curves; returns (excess, moves).
    """
    moves = 0
    while excess > 0:
        best_rate = -math.inf
        best: tuple[int, int] | None = None
        for i, opt in enumerate(options):
            c = opt.unit_cost
            if c == 0 or c > excess or k[i] <= opt.lower:
                continue
            j = bisect.bisect_left(knots[i], k[i]) - 1
            seg_lo = max(opt.lower, knots[i][j]) if j >= 0 else opt.lower
            span = k[i] - seg_lo
            rate = (opt.distortion_at(k[i]) - opt.distortion_at(seg_lo)) / (span * c)
            if rate > best_rate:
                best_rate = rate
                best = (i, min(span, excess // c))
        if best is None:
            break
        i, m = best
        k[i] -= m
        excess -= m * options[i].unit_cost
        moves += 1
    return excess, moves


def _exchange(options: Sequence[LayerOptions], k: list[int], excess: int) -> int:
    """One move that un-prunes a weights of layer i and prunes b more of layer j.

    Picks the smallest new excess in [0, excess), then the smallest distortion change; applies
    it and returns the new excess (the old one when no such move exists).
    """
    best_key: tuple[int, float] | None = None
    best_move: tuple[int, int, int, int] | None = None
    for i, oi in enumerate(options):
        room_down = k[i] - oi.lower
        if room_down <= 0 or oi.unit_cost == 0:
            continue
        ci = oi.unit_cost
        d_i0 = oi.distortion_at(k[i])
        for j, oj in enumerate(options):
            room_up = oj.upper - k[j]
            if j == i or room_up <= 0 or oj.unit_cost == 0:
                continue
            cj = oj.unit_cost
            span = min(room_down, cj // math.gcd(ci, cj), _MAX_EXCHANGE_SPAN)
            a = np.arange(1, span + 1, dtype=np.int64)
            need = a * ci - excess  # cost to add back with layer j
            b = np.maximum(-(-need // cj), 0)
            new_excess = b * cj - need
            ok = (b <= room_up) & (new_excess >= 0) & (new_excess < excess)
            if not np.any(ok):
                continue
            a, b, new_excess = a[ok], b[ok], new_excess[ok]
            delta = (
                oi.distortion_many(k[i] - a)
                - d_i0
                + oj.distortion_many(k[j] + b)
                - oj.distortion_at(k[j])
            )
            t = int(np.lexsort((delta, new_excess))[0])
            key = (int(new_excess[t]), float(delta[t]))
            if best_key is None or key < best_key:
                best_key = key
                best_move = (i, int(a[t]), j, int(b[t]))
    if best_move is None or best_key is None:
        return excess
    i, a_, j, b_ = best_move
    k[i] -= a_
    k[j] += b_
    return best_key[0]


def repair_counts(
    options: Sequence[LayerOptions], counts: Sequence[int], required: int
) -> tuple[list[int], dict[str, object]]:
    """Move counts off the grid so that the removed cost is the smallest achievable >= required.

    Starts from feasible counts (removed cost >= required) and only moves within each layer's
    option range [lower, upper]. First un-prunes weights greedily (largest saving of
    interpolated distortion per cost unit first). With non-unit costs a residual excess smaller
    than every movable layer's unit cost may remain; then exchanges (un-prune a weights of one
    layer, prune b more of another) lower it further. With unit cost 1 in some layer with room,
    the result removes exactly ``required``.
    """
    k = [int(c) for c in counts]
    for opt, c in zip(options, k, strict=True):
        if not opt.lower <= c <= opt.upper:
            raise ValueError(f"layer {opt.name}: count {c} outside [{opt.lower}, {opt.upper}]")
    removed = sum(c * o.unit_cost for c, o in zip(k, options, strict=True))
    excess = removed - required
    if excess < 0:
        raise ValueError(f"counts remove {removed} < required {required}")
    knots = [[int(x) for x in o.knot_counts] for o in options]
    excess, moves = _decrease_greedy(options, k, excess, knots)
    exchanges = 0
    for _ in range(_MAX_REPAIR_ROUNDS):
        if excess == 0:
            break
        new_excess = _exchange(options, k, excess)
        if new_excess >= excess:
            break
        exchanges += 1
        excess, more = _decrease_greedy(options, k, new_excess, knots)
        moves += more
    movable = [o.unit_cost for o in options if o.lower < o.upper and o.unit_cost > 0]
    step = math.gcd(*movable) if movable else 0
    at_floor = all(c == o.lower for c, o in zip(k, options, strict=True) if o.unit_cost > 0)
    return k, {
        "excess_cost": int(excess),
        # Provably the smallest achievable: nothing left to un-prune, or (every achievable
        # total being congruent to this one modulo `step`) an excess below `step`.
        "excess_minimal": bool(excess == 0 or at_floor or (step > 0 and excess < step)),
        "repair_moves": int(moves),
        "repair_exchanges": int(exchanges),
    }


# ----------------------------------------------------------------------------------------------
# The allocator


def _max_units(problem: AllocationProblem) -> int | None:
    raw = problem.options.get("max_units")
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 1:
        raise UserError(f"max_units must be a positive integer, got {raw!r}")
    return int(raw)


def layer_options(
    layers: Sequence[LayerSpec],
    curves: Mapping[str, Curve],
    *,
    allow_layer_removal: bool,
    check_costs: bool = False,
) -> list[LayerOptions]:
    """:func:`build_options` of every layer (``check_costs``: refuse negative unit costs)."""
    options: list[LayerOptions] = []
    for layer in layers:
        curve = curves.get(layer.name)
        if curve is None:
            raise UserError(f"layer {layer.name} has no rate-distortion curve")
        if check_costs and layer.unit_cost < 0:
            raise UserError(f"layer {layer.name}: unit cost must be >= 0")
        options.append(build_options(layer, curve, allow_layer_removal=allow_layer_removal))
    return options


def _reachable_options(
    problem: AllocationProblem, curves: Mapping[str, Curve], allow: bool
) -> tuple[list[LayerOptions], bool]:
    """Every layer's options, and whether they go beyond the grid (``keep_one``) to reach
    the budget. Raises :class:`InfeasibleError` when even then it cannot be met."""
    options = layer_options(problem.layers, curves, allow_layer_removal=allow, check_costs=True)
    required = problem.required_cost
    reachable = sum(o.upper * o.unit_cost for o in options)
    keep_one = False
    if reachable < required and not allow:
        # The grid's top levels fall short (a coarse grid, or rounding): let layers go
        # down to one weight, and say so.
        keep_one = True
        options = [
            build_options(layer, curves[layer.name], allow_layer_removal=False, keep_one=True)
            for layer in problem.layers
        ]
        reachable = sum(o.upper * o.unit_cost for o in options)
    if reachable < required:
        total = problem.total_cost
        hint = "lower the target ratio, relax the per-layer bounds or use more --levels"
        if not allow:
            hint += " (whole layers are kept: allow_layer_removal is off)"
        raise InfeasibleError(
            f"target ratio {problem.target_ratio:g} cannot be met: the layers' bounds and "
            f"curves allow removing at most {reachable} of {total} budget units "
            f"(largest feasible ratio {reachable / max(total, 1):.6g})",
            hint,
        )
    return options, keep_one


class RateDistortionAllocator:
    """Minimise the summed per-layer distortion over the measured curves (exact DP)."""

    name = "rd"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        t0 = time.perf_counter()
        if problem.curves is None:
            raise UserError("the rd method needs rate-distortion curves", "measure them first")
        if not 0.0 <= problem.target_ratio <= 1.0:
            raise UserError(f"target ratio {problem.target_ratio} is outside [0, 1]")
        allow = bool(problem.options.get("allow_layer_removal", False))
        options, keep_one = _reachable_options(problem, problem.curves, allow)
        total = problem.total_cost
        required = problem.required_cost
        removed = [o.counts * o.unit_cost for o in options]
        values = [o.values for o in options]
        dp = solve_mckp(removed, values, required, max_units=_max_units(problem), total=total)
        bound = lagrangian_bound(removed, values, required, total=total)
        grid_counts = [int(o.counts[c]) for o, c in zip(options, dp.choices, strict=True)]
        counts, repair = repair_counts(options, grid_counts, required)
        predicted = {o.name: o.distortion_at(c) for o, c in zip(options, counts, strict=True)}
        objective = float(sum(predicted.values()))
        removed_cost = sum(c * o.unit_cost for c, o in zip(counts, options, strict=True))
        info: dict[str, object] = {
            "objective": objective,
            "dp_objective": dp.objective,
            "lower_bound": bound.bound,
            "gap": dp.objective - bound.bound,
            "units": dp.units,
            "unit_size": dp.unit_size,
            "max_overshoot_ratio": dp.info["max_overshoot_ratio"],
            "required_cost": required,
            "total_cost": total,
            "dp_removed_cost": dp.removed,
            "removed_cost": removed_cost,
            "achieved_ratio": removed_cost / total if total else 0.0,
            "grid_counts": dict(zip((o.name for o in options), grid_counts, strict=True)),
            "dp_states": dp.info["states"],
            "dp_work": dp.info["work"],
            "dp_s": dp.info["dp_s"],
            "dp_notes": dp.info["notes"],
            "time_s": time.perf_counter() - t0,
            "beyond_grid": keep_one,
            **repair,
        }
        return Allocation(
            counts={o.name: int(c) for o, c in zip(options, counts, strict=True)},
            predicted=predicted,
            info=info,
        )


__all__ = [
    "LayerOptions",
    "RateDistortionAllocator",
    "build_options",
    "layer_options",
    "repair_counts",
]
