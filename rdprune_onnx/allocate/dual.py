"""The dual of the rd allocation: prune the most subject to a distortion budget.

The rd method (:mod:`rdprune_onnx.allocate.rd`) minimises the summed predicted distortion for a
given pruning ratio. ``--max-distortion X`` asks the dual question: the *fewest kept weights*
(the most budget units removed) such that the summed predicted distortion stays at or below
``X``. Both are multiple-choice knapsacks over the same options (each layer's grid levels
within its bounds, :func:`~rdprune_onnx.allocate.rd.build_options`).

:func:`max_removal` solves the dual by dynamic programming over layers; the state is the
removed cost in units of ``u`` budget units (floored per option, so the distortion side is
never approximated: every answer truly meets the budget). With ``u = 1`` (budgets up to
``max_units`` units) the answer is the exact optimum; otherwise it removes at most
``layers * u`` fewer units than the optimum, which the info reports. Each state holds the
smallest distortion that reaches it, and the answer is the largest state within ``X`` (ties:
the smallest distortion).

Pure numpy, like the rest of this package.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from rdprune_onnx.allocate.base import Allocation, Curve, FloatArray, LayerSpec
from rdprune_onnx.allocate.rd import layer_options
from rdprune_onnx.errors import InfeasibleError, UserError

IntArray = npt.NDArray[np.int64]

# Largest number of DP states (removed-cost units) before the removed cost is quantised.
DEFAULT_MAX_UNITS = 1 << 16
# Relative slack when comparing a summed distortion with the budget (float sums).
_REL_TOL = 1e-12


@dataclass(frozen=True)
class DualResult:
    """One option index per layer, what it removes and its summed distortion."""

    choices: list[int]
    removed: int  # budget units removed by the choices (exact, not quantised)
    distortion: float
    unit_size: int
    info: Mapping[str, object] = field(default_factory=dict)


def max_removal(
    removed: Sequence[IntArray],
    values: Sequence[FloatArray],
    budget: float,
    *,
    max_units: int = DEFAULT_MAX_UNITS,
) -> DualResult:
    """Choose one option per layer: most removed units with summed value <= ``budget``.

    ``removed[l][g]`` (non-negative integers) and ``values[l][g]`` are layer ``l``'s options.
    Raises :class:`InfeasibleError` when even the cheapest choice exceeds the budget.
    """
    t0 = time.perf_counter()
    if len(removed) != len(values) or not removed:
        raise ValueError("removed and values must be non-empty and of the same length")
    if max_units < 1:
        raise ValueError("max_units must be positive")
    r_arrays, v_arrays = _checked_options(removed, values)
    cheapest = sum(float(v.min()) for v in v_arrays)
    limit = budget + _REL_TOL * max(1.0, abs(budget))
    if cheapest > limit:
        raise InfeasibleError(
            f"no allocation keeps the predicted distortion within {budget:g} "
            f"(the smallest possible is {cheapest:g})",
            "raise --max-distortion",
        )
    top = sum(int(r.max()) for r in r_arrays)
    unit = max(1, math.ceil(top / max_units))
    q_arrays = [r // unit for r in r_arrays]
    states = int(sum(int(q.max()) for q in q_arrays)) + 1
    best, back = _least_distortion(q_arrays, v_arrays, states)
    within = np.flatnonzero(best <= limit)
    state = int(within[-1])  # the cheapest choice is within the budget, so `within` is not empty
    choices = _walk_back(back, q_arrays, state)
    total_removed = sum(int(r[g]) for r, g in zip(r_arrays, choices, strict=True))
    distortion = float(sum(float(v[g]) for v, g in zip(v_arrays, choices, strict=True)))
    return DualResult(
        choices=choices,
        removed=total_removed,
        distortion=distortion,
        unit_size=unit,
        info={
            "states": states,
            "unit_size": unit,
            "exact": unit == 1,
            # Flooring each option to whole units can cost at most one unit per layer.
            "max_shortfall_units": 0 if unit == 1 else len(q_arrays) * unit,
            "dual_s": time.perf_counter() - t0,
        },
    )


def _checked_options(
    removed: Sequence[IntArray], values: Sequence[FloatArray]
) -> tuple[list[IntArray], list[FloatArray]]:
    r_arrays = [np.asarray(r, dtype=np.int64) for r in removed]
    v_arrays = [np.asarray(v, dtype=np.float64) for v in values]
    for r, v in zip(r_arrays, v_arrays, strict=True):
        if r.shape != v.shape or r.ndim != 1 or r.size == 0:
            raise ValueError("every layer needs one value per option, at least one option")
        if np.any(r < 0):
            raise ValueError("removed units must be non-negative")
    return r_arrays, v_arrays


def _least_distortion(
    q_arrays: Sequence[IntArray], v_arrays: Sequence[FloatArray], states: int
) -> tuple[FloatArray, list[npt.NDArray[np.int32]]]:
    """Forward DP: the smallest distortion reaching each removed state after all layers, and
    per layer the option that reached each state (-1: unreachable)."""
    best = np.full(states, np.inf)
    best[0] = 0.0
    reach = 0  # highest state reachable so far
    back: list[npt.NDArray[np.int32]] = []
    for q, v in zip(q_arrays, v_arrays, strict=True):
        new = np.full(states, np.inf)
        arg = np.full(states, -1, dtype=np.int32)
        for g in range(q.size):
            shift = int(q[g])
            cand = best[: reach + 1] + v[g]
            window = new[shift : shift + reach + 1]
            better = cand < window
            window[better] = cand[better]
            arg[shift : shift + reach + 1][better] = g
        reach += int(q.max())
        best = new
        back.append(arg)
    return best, back


def _walk_back(
    back: Sequence[npt.NDArray[np.int32]], q_arrays: Sequence[IntArray], state: int
) -> list[int]:
    """The option of each layer on the path that ends in ``state``."""
    choices = [0] * len(q_arrays)
    s = state
    for layer in range(len(q_arrays) - 1, -1, -1):
        g = int(back[layer][s])
        choices[layer] = g
        s -= int(q_arrays[layer][g])
    return choices


def allocate_within(
    layers: Sequence[LayerSpec],
    curves: Mapping[str, Curve],
    max_distortion: float,
    *,
    allow_layer_removal: bool = False,
    max_units: int = DEFAULT_MAX_UNITS,
) -> Allocation:
    """Fewest kept budget units with summed predicted distortion <= ``max_distortion``.

    The options are the rd allocator's (grid levels of each curve within the layer's bounds);
    ``info["achieved_ratio"]`` is the removed fraction of the total budget.
    """
    if not math.isfinite(max_distortion) or max_distortion < 0:
        raise UserError(
            f"--max-distortion must be a non-negative number, got {max_distortion}",
            "e.g. --max-distortion 0.01 (in the units of --metric)",
        )
    options = layer_options(layers, curves, allow_layer_removal=allow_layer_removal)
    result = max_removal(
        [o.counts * o.unit_cost for o in options],
        [o.values for o in options],
        max_distortion,
        max_units=max_units,
    )
    counts = {o.name: int(o.counts[g]) for o, g in zip(options, result.choices, strict=True)}
    predicted = {o.name: float(o.values[g]) for o, g in zip(options, result.choices, strict=True)}
    total = sum(layer.size * layer.unit_cost for layer in layers)
    return Allocation(
        counts=counts,
        predicted=predicted,
        info=dict(result.info)
        | {
            "max_distortion": max_distortion,
            "objective": result.distortion,
            "removed_cost": result.removed,
            "total_cost": total,
            "achieved_ratio": result.removed / total if total else 0.0,
        },
    )


__all__ = ["DualResult", "allocate_within", "max_removal"]
