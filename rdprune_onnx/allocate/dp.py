"""Exact multiple-choice knapsack by dynamic programming, and its Lagrangian lower bound.

The allocation problem of the rate-distortion method (METHOD.md, step 2) is a multiple-choice
knapsack: layer ``l`` offers options ``g`` that remove ``removed[l][g]`` budget units at a cost
(distortion) ``values[l][g]``; choose one option per layer so that the total removal is at least
``required`` and the summed cost is smallest. Costs need not be monotone or convex.

:func:`solve_mckp` solves it exactly by dynamic programming over layers. The state is the
removal still required from the remaining layers, clamped at zero, in units of ``u`` budget units.
Each option's removal is converted to units by flooring, so every answer of the DP is truly
feasible; with ``u = 1`` the answer is the exact optimum. For a large budget ``u`` is chosen
automatically (see :func:`solve_mckp`), and the info reports how much the flooring can cost.

Two exact reductions keep the table small:

* options dominated by another option of the same layer (removing no more units at no lower
  cost) are dropped;
* each layer only keeps the states that can lie on an optimal path: the states reachable from
  both ends, and among those the states whose Lagrangian (linear-relaxation) lower bound on the
  cost of the best path through them does not exceed the cost of a known feasible solution. This
  prunes nothing the optimum needs, whatever the shape of the curves: it only uses that the
  relaxation is a lower bound.

The DP keeps one row of values and, per layer, one row of back-pointers (``uint8`` when a layer
has at most 256 options). The inner step is a vectorised min-plus over contiguous slices of the
previous row, one numpy call per option; there is no Python loop over states.

:func:`lagrangian_bound` is the bound of the Lagrangian relaxation on the lower convex hull of
each layer's (removal, cost) points, solved exactly by a parametric sweep over the multiplier.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from rdprune_onnx.allocate.base import FloatArray
from rdprune_onnx.errors import InfeasibleError

IntArray = npt.NDArray[np.int64]

# Largest number of budget units up to `required` that the DP uses before it quantises.
DEFAULT_MAX_UNITS = 1 << 21
# The quantisation may shift the effective target by at most this fraction of the total budget.
DEFAULT_TOLERANCE = 1e-4
# Upper cap on DP cells (state x option pairs actually evaluated); roughly 1-6 ns each.
DEFAULT_MAX_WORK = 2 * 10**9
# With the default max_units, a budget above DEFAULT_MAX_UNITS is still solved exactly (u = 1)
# when the planned DP is this cheap: at most EXACT_MAX_WORK cells and EXACT_MAX_STATES states
# (one byte of back-pointer each). Not tried above EXACT_MAX_REQUIRED units.
EXACT_MAX_WORK = 5 * 10**7
EXACT_MAX_STATES = 32 * 2**20
EXACT_MAX_REQUIRED = 1 << 28
# Relative slack on float comparisons between bounds and costs when pruning states.
_PRUNE_MARGIN = 1e-9


@dataclass(frozen=True)
class DPResult:
    """Optimal choice of one option per layer."""

    choices: tuple[int, ...]  # option index per layer, into the caller's arrays
    objective: float  # sum of the chosen values
    removed: int  # sum of the chosen removals (the caller's budget units, not DP units)
    unit_size: int  # budget units per DP unit (1: exact)
    units: int  # `required` in DP units: ceil(required / unit_size)
    info: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class LagrangianBound:
    """Lower bound from the Lagrangian relaxation, and the integral solution at its multiplier."""

    bound: float  # lower bound on the optimum
    multiplier: float  # optimal Lagrange multiplier (cost per removed unit); 0 if budget slack
    removed: int  # removal of the integral hull solution below
    upper: float  # its cost: a feasible solution, hence an upper bound on the optimum
    choices: tuple[int, ...]  # the integral hull solution, option index per layer
    exact: bool  # upper == bound up to rounding: the hull solution is optimal


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _as_layers(
    removed: Sequence[npt.ArrayLike], values: Sequence[npt.ArrayLike]
) -> tuple[list[IntArray], list[FloatArray]]:
    if len(removed) != len(values):
        raise ValueError(f"{len(removed)} removal arrays but {len(values)} value arrays")
    rs: list[IntArray] = []
    vs: list[FloatArray] = []
    for i, (r_in, v_in) in enumerate(zip(removed, values, strict=True)):
        r_raw = np.asarray(r_in)
        if r_raw.dtype.kind not in "iub" and (
            not np.all(np.isfinite(r_raw)) or np.any(r_raw != np.round(r_raw))
        ):
            raise ValueError(f"layer {i}: removals must be whole numbers")
        r = r_raw.astype(np.int64)
        v = np.asarray(v_in, dtype=np.float64)
        if r.ndim != 1 or v.shape != r.shape or r.size == 0:
            raise ValueError(f"layer {i}: removals and values must be 1-D, same non-zero length")
        if np.any(r < 0):
            raise ValueError(f"layer {i}: removals must be >= 0")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"layer {i}: values must be finite")
        rs.append(r)
        vs.append(v)
    return rs, vs


def _pareto(r: IntArray, v: FloatArray) -> IntArray:
    """Indices of the non-dominated options, by ascending removal (then strictly ascending cost).

    Option a is dominated when some other option removes at least as much at no higher cost;
    of exact duplicates the first is kept.
    """
    idx = np.arange(r.size)
    order = np.lexsort((idx, v, -r))  # removal descending, then cost ascending, then index
    vs = v[order]
    prev_min = np.minimum.accumulate(np.concatenate(([np.inf], vs[:-1])))
    keep = order[vs < prev_min]
    return keep[::-1].astype(np.int64)


def _lower_hull(r: IntArray, v: FloatArray) -> list[int]:
    """Vertices (positions) of the lower convex hull of points with strictly ascending r."""
    hull: list[int] = []
    rf: list[float] = r.astype(np.float64).tolist()
    vf: list[float] = v.tolist()
    for i in range(len(rf)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above or on the segment a-i: drop it.
            cross = (rf[b] - rf[a]) * (vf[i] - vf[a]) - (vf[b] - vf[a]) * (rf[i] - rf[a])
            if cross <= 0.0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


@dataclass
class _Hulls:
    """Per-layer lower hulls of Pareto options, and their edges sorted by slope."""

    base_pos: list[int]  # position (in the Pareto list) of each layer's cheapest option
    base_r: int
    base_v: float
    slope: FloatArray  # edges of all layers, ascending slope
    dr: IntArray
    dv: FloatArray
    layer: IntArray
    end_pos: IntArray  # Pareto position of the upper vertex of each edge


def _hulls(rs: Sequence[IntArray], vs: Sequence[FloatArray]) -> _Hulls:
    """Hull edges of Pareto-sorted layers (r and v strictly ascending within each layer)."""
    slopes: list[FloatArray] = []
    drs: list[IntArray] = []
    dvs: list[FloatArray] = []
    lays: list[IntArray] = []
    ends: list[IntArray] = []
    base_r = 0
    base_v = 0.0
    for li, (r, v) in enumerate(zip(rs, vs, strict=True)):
        base_r += int(r[0])
        base_v += float(v[0])
        hull = np.asarray(_lower_hull(r, v), dtype=np.int64)
        if hull.size > 1:
            dr = np.diff(r[hull])
            dv = np.diff(v[hull])
            slopes.append(dv / dr)
            drs.append(dr)
            dvs.append(dv)
            lays.append(np.full(dr.size, li, dtype=np.int64))
            ends.append(hull[1:])
    if slopes:
        slope = np.concatenate(slopes)
        order = np.argsort(slope, kind="stable")
        return _Hulls(
            base_pos=[0] * len(rs),
            base_r=base_r,
            base_v=base_v,
            slope=slope[order],
            dr=np.concatenate(drs)[order],
            dv=np.concatenate(dvs)[order],
            layer=np.concatenate(lays)[order],
            end_pos=np.concatenate(ends)[order],
        )
    empty_i = np.zeros(0, dtype=np.int64)
    return _Hulls(
        [0] * len(rs), base_r, base_v, np.zeros(0), empty_i, np.zeros(0), empty_i, empty_i
    )


def _relaxation(h: _Hulls, required: int) -> tuple[float, float, list[int], int, float]:
    """Solve the relaxation: (bound, multiplier, hull solution positions, its removal, cost).

    The hull solution takes every edge up to and including the one where the budget is met, so
    it is feasible; the caller checks that the budget can be met at all.
    """
    pos = list(h.base_pos)
    if h.base_r >= required:
        return h.base_v, 0.0, pos, h.base_r, h.base_v
    cum_r = np.cumsum(h.dr)
    e = int(np.searchsorted(cum_r, required - h.base_r, side="left"))
    if e >= cum_r.size:
        raise InfeasibleError("budget cannot be met")  # caller guards against this
    before_r = h.base_r + (int(cum_r[e - 1]) if e > 0 else 0)
    before_v = h.base_v + float(np.sum(h.dv[:e]))
    lam = float(h.slope[e])
    bound = before_v + float(h.dv[e]) * (required - before_r) / float(h.dr[e])
    for k in range(e + 1):
        pos[int(h.layer[k])] = int(h.end_pos[k])
    upper_r = before_r + int(h.dr[e])
    upper_v = before_v + float(h.dv[e])
    return bound, lam, pos, upper_r, upper_v


def _feasible_layers(
    removed: Sequence[npt.ArrayLike],
    values: Sequence[npt.ArrayLike],
    required: int,
    total: int | None,
) -> tuple[list[IntArray], list[FloatArray], int]:
    """The checked layers and ``required`` (at least 0); raises :class:`InfeasibleError`
    when even the largest option of every layer falls short."""
    rs, vs = _as_layers(removed, values)
    required = max(0, int(required))
    best = int(sum(int(r.max()) for r in rs))
    if best < required:
        raise _infeasible(best, required, total)
    return rs, vs, required


def _infeasible(best: int, required: int, total: int | None) -> InfeasibleError:
    if total:
        return InfeasibleError(
            f"the budget cannot be met: it requires removing {required} of {total} units "
            f"(ratio {required / total:.6g}) but the layers' options remove at most {best} "
            f"(largest feasible ratio {best / total:.6g})",
            "lower the target ratio or relax the per-layer bounds",
        )
    return InfeasibleError(
        f"the budget cannot be met: it requires removing {required} units but the layers' "
        f"options remove at most {best} (largest feasible removal {best})",
        "lower the target ratio or relax the per-layer bounds",
    )


# ----------------------------------------------------------------------------------------------
# Lagrangian bound


def lagrangian_bound(
    removed: Sequence[npt.ArrayLike],
    values: Sequence[npt.ArrayLike],
    required: int,
    *,
    total: int | None = None,
) -> LagrangianBound:
    """Lower bound on the optimum of the multiple-choice knapsack (same arguments as the DP).

    It is ``max_{lambda >= 0} sum_l min_g (values[l][g] - lambda * removed[l][g]) +
    lambda * required``, i.e. the optimum of the linear relaxation on the lower convex hull of
    each layer's (removal, value) points, found exactly by sorting all hull edges by slope and
    filling them in order until the budget is met (no bisection needed). It also bounds the
    cost of any off-grid choice on the piecewise-linear interpolation of the points.
    Raises :class:`InfeasibleError` when the budget cannot be met.
    """
    rs, vs, required = _feasible_layers(removed, values, required, total)
    if not rs:
        return LagrangianBound(0.0, 0.0, 0, 0.0, (), True)
    keeps = [_pareto(r, v) for r, v in zip(rs, vs, strict=True)]
    prs = [r[k] for r, k in zip(rs, keeps, strict=True)]
    pvs = [v[k] for v, k in zip(vs, keeps, strict=True)]
    bound, lam, pos, upper_r, upper_v = _relaxation(_hulls(prs, pvs), required)
    choices = tuple(int(k[p]) for k, p in zip(keeps, pos, strict=True))
    scale = max(1.0, abs(upper_v), abs(bound))
    exact = upper_r == required or abs(upper_v - bound) <= 1e-12 * scale
    return LagrangianBound(
        bound=bound,
        multiplier=lam,
        removed=upper_r,
        upper=upper_v,
        choices=choices,
        exact=bool(exact),
    )


# ----------------------------------------------------------------------------------------------
# Dynamic programming


@dataclass
class _Plan:
    """A quantised problem ready for the DP."""

    unit: int
    units: int  # U = ceil(required / unit)
    keeps: list[IntArray]  # Pareto options per layer (indices into the caller's arrays)
    r: list[IntArray]  # their removal in units, clamped at U, strictly ascending
    v: list[FloatArray]
    lo: list[int]  # window of states per layer (states: remaining requirement in units)
    hi: list[int]
    work: int  # (state, option) pairs the DP will evaluate
    upper: float  # cost of a known feasible solution (inf if none was built)
    lp: float  # relaxation bound of the quantised problem
    flooring: int  # sum over layers of the largest flooring loss, in budget units


def _quantise(
    rs: Sequence[IntArray], vs: Sequence[FloatArray], required: int, unit: int
) -> tuple[int, list[IntArray], list[IntArray], list[FloatArray], int] | None:
    units = -(-required // unit)
    keeps: list[IntArray] = []
    qr: list[IntArray] = []
    qv: list[FloatArray] = []
    flooring = 0
    for r, v in zip(rs, vs, strict=True):
        ru = np.minimum(r // unit, units)
        flooring += int(np.max(r - (r // unit) * unit))
        k = _pareto(ru, v)
        keeps.append(k)
        qr.append(ru[k])
        qv.append(v[k])
    if sum(int(r[-1]) for r in qr) < units:
        return None
    return units, keeps, qr, qv, flooring


def _windows(
    qr: Sequence[IntArray], qv: Sequence[FloatArray], units: int, prune: bool
) -> tuple[list[int], list[int], float, float]:
    """State windows per layer (inclusive), the feasible upper bound and the relaxation bound.

    State j before layer l is the removal still required from layers l..L-1. It is reachable
    when the layers before l can leave it: U - sum(max before) <= j <= U - sum(min before), and
    completable when j <= sum(max from l). With ``prune``, a state is dropped when the
    relaxation bound on (cost of layers before l removing >= U - j) + (cost of layers from l
    removing >= j) exceeds the cost of a feasible solution: no optimal path passes through it.
    """
    n = len(qr)
    lo, hi = _reachable(qr, units)
    h = _hulls(qr, qv)
    lp, _, _, _, upper = _relaxation(h, units)
    if not prune or n == 0:
        return lo, hi, upper, lp
    scale = sum(float(np.max(np.abs(v))) for v in qv)
    threshold = upper + _PRUNE_MARGIN * max(scale, abs(upper)) + 1e-300
    base_r_layer = np.array([int(r[0]) for r in qr], dtype=np.int64)
    base_v_layer = np.array([float(v[0]) for v in qv], dtype=np.float64)
    pre_base_r = np.concatenate(([0], np.cumsum(base_r_layer)))
    pre_base_v = np.concatenate(([0.0], np.cumsum(base_v_layer)))
    for li in range(1, n):
        a, b = lo[li], hi[li]
        if a >= b:
            continue
        knots, g = _path_bounds(h, li, units, a, b, pre_base_r, pre_base_v)
        window = _sublevel_window(knots, g, threshold)
        if window is not None:
            lo[li], hi[li] = max(a, window[0]), min(b, window[1])
    return lo, hi, upper, lp


def _reachable(qr: Sequence[IntArray], units: int) -> tuple[list[int], list[int]]:
    """Per layer (and after the last), the states reachable from the start and completable."""
    n = len(qr)
    maxs = np.array([int(r[-1]) for r in qr] + [0], dtype=np.int64)
    mins = np.array([int(r[0]) for r in qr] + [0], dtype=np.int64)
    pre_max = np.concatenate(([0], np.cumsum(maxs[:n])))
    pre_min = np.concatenate(([0], np.cumsum(mins[:n])))
    suf_max = np.concatenate((np.cumsum(maxs[:n][::-1])[::-1], [0]))
    lo = [max(0, units - int(pre_max[i])) for i in range(n + 1)]
    hi = [min(max(0, units - int(pre_min[i])), int(suf_max[i])) for i in range(n + 1)]
    lo[n] = hi[n] = 0
    return lo, hi


def _path_bounds(
    h: _Hulls,
    li: int,
    units: int,
    a: int,
    b: int,
    pre_base_r: IntArray,
    pre_base_v: FloatArray,
) -> tuple[IntArray, FloatArray]:
    """Knots j in [a, b] and g(j) there: the relaxation bound on the cost of the best path
    through state j before layer ``li`` (layers before it removing >= U - j, the rest >= j)."""
    tot_base_r = int(pre_base_r[-1])
    tot_base_v = float(pre_base_v[-1])
    fmask = h.layer < li
    # Forward layers (before li): relaxation of "remove >= x" as knots (x, cost).
    f_r = np.concatenate(([0], np.cumsum(h.dr[fmask]))) + int(pre_base_r[li])
    f_v = np.concatenate(([0.0], np.cumsum(h.dv[fmask]))) + float(pre_base_v[li])
    bmask = ~fmask
    b_r = np.concatenate(([0], np.cumsum(h.dr[bmask]))) + (tot_base_r - int(pre_base_r[li]))
    b_v = np.concatenate(([0.0], np.cumsum(h.dv[bmask]))) + (tot_base_v - float(pre_base_v[li]))
    knots = np.concatenate((units - f_r, b_r, [a, b]))
    knots = knots[(knots >= a) & (knots <= b)]
    gf = np.interp((units - knots).astype(np.float64), f_r.astype(np.float64), f_v)
    gb = np.interp(knots.astype(np.float64), b_r.astype(np.float64), b_v)
    return knots, gf + gb


def _sublevel_window(knots: IntArray, g: FloatArray, threshold: float) -> tuple[int, int] | None:
    """The states where the convex piecewise-linear g (given at ``knots``) may be <= threshold.

    Its sublevel set is an interval whose ends lie between a failing and a passing knot that
    are neighbours (no knot between them), so no sorting is needed. None when no knot passes
    (cannot happen in exact arithmetic; the caller then keeps the window).
    """
    ok = g <= threshold
    if not np.any(ok):
        return None
    k_ok = knots[ok]
    first, last = int(k_ok.min()), int(k_ok.max())
    new_lo, new_hi = first, last
    left = ~ok & (knots < first)
    if np.any(left):
        i = int(np.argmax(np.where(left, knots, -1)))
        ja, ga = int(knots[i]), float(g[i])
        gb_ = float(g[ok][int(np.argmin(k_ok))])
        cross = ja + (ga - threshold) / (ga - gb_) * (first - ja) if ga > gb_ else first
        new_lo = max(ja + 1, math.floor(cross) - 1)
    right = ~ok & (knots > last)
    if np.any(right):
        i = int(np.argmin(np.where(right, knots, np.iinfo(np.int64).max)))
        jb, gb_ = int(knots[i]), float(g[i])
        ga = float(g[ok][int(np.argmax(k_ok))])
        cross = last + (threshold - ga) / (gb_ - ga) * (jb - last) if gb_ > ga else last
        new_hi = min(jb - 1, math.ceil(cross) + 1)
    return new_lo, new_hi


def _segment(r: int, lo: int, hi: int, nlo: int, nhi: int, clamp: bool) -> tuple[int, int] | None:
    """States j in [lo, hi] whose successor max(j - r, 0) lies in the next window."""
    jmin = lo if clamp else max(lo, nlo + r)
    jmax = min(hi, nhi + r)
    if jmin > jmax:
        return None
    return jmin, jmax


def _work(plan_r: Sequence[IntArray], lo: Sequence[int], hi: Sequence[int]) -> int:
    n = len(plan_r)
    work = 0
    for li in range(n):
        nlo, nhi = lo[li + 1], hi[li + 1]
        r = plan_r[li]
        jmin = np.maximum(lo[li], nlo + r) if nlo else np.full(r.size, lo[li], dtype=np.int64)
        jmax = np.minimum(hi[li], nhi + r)
        work += int(np.sum(np.maximum(jmax - jmin + 1, 0)))
    return work


def _plan(
    rs: Sequence[IntArray], vs: Sequence[FloatArray], required: int, unit: int, prune: bool
) -> _Plan | None:
    q = _quantise(rs, vs, required, unit)
    if q is None:
        return None
    units, keeps, qr, qv, flooring = q
    lo, hi, upper, lp = _windows(qr, qv, units, prune)
    return _Plan(unit, units, keeps, qr, qv, lo, hi, _work(qr, lo, hi), upper, lp, flooring)


@dataclass(frozen=True)
class _Limits:
    """How :func:`solve_mckp` may size its DP (its keyword arguments, resolved)."""

    max_units: int
    auto: bool  # max_units was left at its default: u = 1 may be tried above it
    reference: int  # the budget the tolerance is a fraction of
    tolerance: float
    max_work: int
    prune: bool

    @classmethod
    def resolve(
        cls,
        max_units: int | None,
        total: int | None,
        required: int,
        tolerance: float,
        max_work: int,
        prune: bool,
    ) -> _Limits:
        units = DEFAULT_MAX_UNITS if max_units is None else max_units
        if units < 1:
            raise ValueError("max_units must be >= 1")
        reference = int(total) if total else max(required, 1)
        return cls(units, max_units is None, reference, tolerance, max_work, prune)


def _choose_plan(
    rs: Sequence[IntArray], vs: Sequence[FloatArray], required: int, limits: _Limits
) -> tuple[_Plan, list[str]]:
    max_units, reference, tolerance = limits.max_units, limits.reference, limits.tolerance
    max_work, prune = limits.max_work, limits.prune
    notes: list[str] = []
    n = len(rs)
    if limits.auto and max_units < required <= EXACT_MAX_REQUIRED:
        # Planning is cheap (it never builds a row of U states): see whether u = 1 is affordable.
        exact = _plan(rs, vs, required, 1, prune)
        if exact is not None:
            states = sum(exact.hi[i] - exact.lo[i] + 1 for i in range(n))
            if exact.work <= min(EXACT_MAX_WORK, max_work) and states <= EXACT_MAX_STATES:
                notes.append(f"exact: unit 1 needs only {exact.work} cells, {states} states")
                return exact, notes
            notes.append(f"quantised: unit 1 would need {exact.work} cells, {states} states")
    if required <= max_units:
        unit = 1
    else:
        unit_cap = -(-required // max_units)
        unit_tol = max(1, int(tolerance * reference) // max(n, 1))
        unit = max(unit_cap, unit_tol)
    plan = _plan(rs, vs, required, unit, prune)
    while plan is None:  # flooring made the budget unreachable: refine
        if unit == 1:
            raise AssertionError("unreachable: feasibility was checked")
        unit = max(1, unit // 2)
        notes.append(f"refined unit to {unit}: flooring made the budget unreachable")
        plan = _plan(rs, vs, required, unit, prune)
    for _ in range(32):
        if plan.work <= max_work or plan.units <= 1:
            break
        factor = max(1.5, math.sqrt(plan.work / max_work))
        coarser = _plan(rs, vs, required, math.ceil(plan.unit * factor), prune)
        if coarser is None:
            notes.append("work cap exceeded: a coarser unit would make the budget unreachable")
            break
        notes.append(f"coarsened unit {plan.unit} -> {coarser.unit} for the work cap")
        plan = coarser
    return plan, notes


def _run_dp(plan: _Plan) -> tuple[list[int], float]:
    """Backward DP over the planned windows; returns Pareto positions per layer and the cost."""
    n = len(plan.r)
    row = np.zeros(1, dtype=np.float64)  # after the last layer: only state 0, cost 0
    pointers: list[npt.NDArray[np.generic]] = [np.zeros(0, dtype=np.uint8)] * n
    for li in range(n - 1, -1, -1):
        lo, hi = plan.lo[li], plan.hi[li]
        nlo, nhi = plan.lo[li + 1], plan.hi[li + 1]
        r, v = plan.r[li], plan.v[li]
        width = hi - lo + 1
        dtype = np.uint8 if r.size <= 256 else (np.uint16 if r.size <= 65536 else np.uint32)
        best = np.full(width, np.inf)
        bp = np.zeros(width, dtype=dtype)
        tmp = np.empty(width)
        mask = np.empty(width, dtype=bool)
        clamp = nlo == 0
        # ext[x + pad] is the cost of successor state max(x, 0) for x >= nlo - pad. Options
        # that remove everything still required (r >= hi) see only state 0: a constant, done
        # without ext, so the pad never exceeds the window.
        pad = min(max(0, int(r[-1]) - lo), width) if clamp else 0
        if pad:
            ext = np.empty(pad + row.size)
            ext[:pad] = row[0]
            ext[pad:] = row
        else:
            ext = row
        for t in range(r.size):
            rt = int(r[t])
            if clamp and rt >= hi:
                const = float(row[0] + v[t])
                np.less(const, best, out=mask)
                np.minimum(best, const, out=best)
                np.copyto(bp, t, where=mask)
                continue
            seg = _segment(rt, lo, hi, nlo, nhi, clamp)
            if seg is None:
                continue
            jmin, jmax = seg
            a, b = jmin - lo, jmax - lo + 1
            s = jmin - rt - nlo + pad
            src = ext[s : s + (b - a)]
            tt, mm, bb = tmp[a:b], mask[a:b], best[a:b]
            np.add(src, v[t], out=tt)
            np.less(tt, bb, out=mm)
            np.minimum(bb, tt, out=bb)
            np.copyto(bp[a:b], t, where=mm)
        pointers[li] = bp
        row = best
    objective = float(row[0])
    if not np.isfinite(objective):
        raise AssertionError("DP found no feasible path; this is a bug")
    pos: list[int] = []
    j = plan.units
    for li in range(n):
        t = int(pointers[li][j - plan.lo[li]])
        pos.append(t)
        j = max(j - int(plan.r[li][t]), 0)
    return pos, objective


def solve_mckp(
    removed: Sequence[npt.ArrayLike],
    values: Sequence[npt.ArrayLike],
    required: int,
    *,
    max_units: int | None = None,
    total: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    max_work: int = DEFAULT_MAX_WORK,
    prune: bool = True,
) -> DPResult:
    """Choose one option per layer: minimise the summed value with total removal >= required.

    ``removed[l][g]`` (whole budget units, >= 0) and ``values[l][g]`` (finite floats, any
    shape of curve) describe option g of layer l. The result is the exact optimum when the DP
    runs in units of 1 budget unit. Unit size ``u``:

    * ``u = 1`` when ``required <= max_units`` (default :data:`DEFAULT_MAX_UNITS`), and, when
      ``max_units`` is left at its default, also whenever the planned exact DP is cheap (at
      most :data:`EXACT_MAX_WORK` cells and :data:`EXACT_MAX_STATES` states; planning costs
      O(L x options) and never builds a row of states);
    * otherwise ``u = max(ceil(required / max_units), floor(tolerance * total / L))``: the
      coarsest unit whose worst-case flooring loss (fewer than ``u`` units per layer, at most
      ``L * u`` in all) stays within ``tolerance`` of the total budget (``total``, or
      ``required`` when not given), but never more than ``max_units`` states;
    * if the planned DP would evaluate more than ``max_work`` (state, option) cells, ``u`` is
      coarsened further (reported in ``info["notes"]``).

    Removals are floored to units, so the answer always removes at least ``required``; it is
    optimal among all choices removing at least ``required + info["flooring_bound"]``, i.e. the
    quantisation acts at worst like raising the target ratio by ``info["max_overshoot_ratio"]``.
    ``prune=False`` turns off the (exact) bound-based state pruning, for testing.
    Raises :class:`InfeasibleError` when even the largest option of every layer falls short.
    """
    t0 = time.perf_counter()
    rs, vs, required = _feasible_layers(removed, values, required, total)
    limits = _Limits.resolve(max_units, total, required, tolerance, max_work, prune)
    plan, notes = _choose_plan(rs, vs, required, limits)
    t_plan = time.perf_counter()
    pos, dp_value = _run_dp(plan) if rs else ([], 0.0)
    times = {"plan_s": t_plan - t0, "dp_s": time.perf_counter() - t_plan}
    choices = tuple(int(k[p]) for k, p in zip(plan.keeps, pos, strict=True))
    removal = int(sum(int(r[c]) for r, c in zip(rs, choices, strict=True)))
    objective = float(sum(float(v[c]) for v, c in zip(vs, choices, strict=True)))
    if removal < required:
        raise AssertionError("DP answer misses the budget; this is a bug")
    info = _dp_info(plan, limits) | {"dp_value": dp_value, "pruned": prune, **times}
    info["notes"] = notes
    return DPResult(choices, objective, removal, plan.unit, plan.units, info)


def _dp_info(plan: _Plan, limits: _Limits) -> dict[str, object]:
    """What :func:`solve_mckp` reports about its plan (before the DP's value and timings)."""
    n = len(plan.r)
    states = sum(plan.hi[i] - plan.lo[i] + 1 for i in range(n))
    pointer_bytes = sum(
        (plan.hi[i] - plan.lo[i] + 1) * (1 if plan.r[i].size <= 256 else 2) for i in range(n)
    )
    options = int(sum(k.size for k in plan.keeps))
    return {
        "unit_size": plan.unit,
        "units": plan.units,
        "max_units": limits.max_units,
        "flooring_bound": plan.flooring,
        "max_overshoot_ratio": plan.flooring / limits.reference,
        "tolerance": limits.tolerance,
        "tolerance_met": plan.flooring <= limits.tolerance * limits.reference,
        "options": options,
        "states": int(states),
        "work": int(plan.work),
        "full_work": options * (plan.units + 1),
        "pointer_bytes": int(pointer_bytes),
        "upper_bound_before_dp": plan.upper,
        "relaxation_bound": plan.lp,
    }


__all__ = [
    "DEFAULT_MAX_UNITS",
    "DEFAULT_MAX_WORK",
    "DEFAULT_TOLERANCE",
    "EXACT_MAX_REQUIRED",
    "EXACT_MAX_STATES",
    "EXACT_MAX_WORK",
    "DPResult",
    "IntArray",
    "LagrangianBound",
    "lagrangian_bound",
    "solve_mckp",
]
