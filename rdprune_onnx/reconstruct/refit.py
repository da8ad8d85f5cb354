"""One layer's refit from its statistics: the given mask refit (or kept when the refit
does not help), and SparseGPT's selection scored against it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rdprune_onnx.reconstruct.layout import (
    Plan,
    bias_from_effective,
    cast_weight,
    effective_with_bias,
    from_effective,
    keep_mask,
)
from rdprune_onnx.reconstruct.solvers import (
    SELECT_METHOD,
    Factors,
    choose_solver,
    damped_hessian,
    solve_exact,
    solve_sparsegpt,
    solve_sparsegpt_select,
)
from rdprune_onnx.reconstruct.statistics import Stats, warn_few_rows

Array = np.ndarray


@dataclass
class LayerRefit:
    """What the refit did to one layer."""

    name: str
    method: str  # "exact" | "sparsegpt" | "sparsegpt-select" | "skipped"
    # Mean squared error of the layer's output (X̂ inputs) against the dense layer's output
    # on the dense inputs, per output element, over the calibration data: plain masking ...
    error_before: float
    # ... and after the refit (equal to error_before when the mask was kept).
    error_after: float
    seconds: float
    reason: str | None = None  # why skipped, or why the plain mask was kept
    bias: str | None = None  # the bias constant refit along with the weight, if any


@dataclass
class Refit:
    info: LayerRefit
    weight: Array | None = None  # None: keep the masked weight
    bias: Array | None = None


def skipped(name: str, reason: str) -> LayerRefit:
    return LayerRefit(name, "skipped", math.nan, math.nan, 0.0, reason)


def layer_factors(name: str, stats: Stats, bias: bool, damping: float) -> Factors:
    """The factorisations of one layer's damped Hessian (``bias``: its last column is the
    bias's); warns when the calibration rows are fewer than the inputs."""
    width = stats.hessian.shape[1]
    warn_few_rows(name, stats.rows, width)
    d = width - (1 if bias else 0)
    return Factors(damped_hessian(stats.hessian, damping, d), stats.cross)


@dataclass(frozen=True)
class LayerSolve:
    """One layer's refit problem, the same for every mask tried on it: the weight's name
    and layout, its dense weight and bias, the calibration statistics, the solver and the
    damped Hessian's factors (:func:`layer_factors`)."""

    name: str
    plan: Plan
    dense: Array
    bias: Array | None
    stats: Stats
    solver: str
    factors: Factors


def refit_layer(layer: LayerSolve, masked: Array, *, select: bool, refits: bool) -> Refit:
    """The refit of the masked weight ``masked`` (:func:`refit_masked`), or with ``select``
    SparseGPT's selection at its count of zeros scored against it (:func:`select_refit`)."""
    if select:
        return select_refit(layer, masked, refits)
    return refit_masked(layer, masked)


def select_refit(layer: LayerSolve, masked: Array, refits: bool = True) -> Refit:
    """SparseGPT selection at the zero count of ``masked`` (see :func:`reconstruct`).

    Three candidates are scored on the layer's ``stats``: the given mask's refit (its
    ``solver``; or the plain given mask when that refit does not help), the selected mask
    with SparseGPT's own updated weights, and the selected mask refit by ``solver`` (the
    exact solver is optimal for a fixed mask, SparseGPT's sweep only approximately so). The
    lowest error wins; ``reason`` says what was kept when it is not SparseGPT's own result.
    ``refits=False`` skips both solves (SparseGPT alone, O(d³ + r d²)): SparseGPT's
    weights are then kept unless worse than the plain given mask.
    """
    name, plan, dense, bias, stats = layer.name, layer.plan, layer.dense, layer.bias, layer.stats
    if refits:
        given = refit_masked(layer, masked)
    else:
        error = stats.error(effective_with_bias(masked, bias, plan))
        given = Refit(LayerRefit(name, "mask", error, error, 0.0))
    info = LayerRefit(name, SELECT_METHOD, given.info.error_before, given.info.error_after, 0.0)
    info.bias = given.info.bias
    kept = "the given mask" + (f" ({given.info.method} refit)" if given.weight is not None else "")
    fallback = Refit(info, given.weight, given.bias)
    try:
        weight, new_bias, keep = _select(plan, dense, masked, bias, stats, layer.factors)
    except (np.linalg.LinAlgError, ValueError) as exc:
        info.reason = f"selection failed ({exc}); kept {kept}"
        return fallback
    error = math.inf
    if _finite(weight, new_bias):
        error = stats.error(effective_with_bias(weight, new_bias, plan))
    selected = np.where(keep, dense, np.zeros_like(dense))
    again = refit_masked(layer, selected) if refits else None
    if again is not None and again.weight is not None and again.info.error_after < error:
        weight, new_bias, error = again.weight, again.bias, again.info.error_after
        info.reason = f"selected mask, weights by the {again.info.method} refit"
    if not error < given.info.error_after:
        info.reason = f"selected mask not better (error {error:.4g}); kept {kept}"
        return fallback
    info.error_after = error
    info.bias = plan.bias
    return Refit(info, weight, new_bias)


def _select(
    plan: Plan,
    dense: Array,
    masked: Array,
    bias: Array | None,
    stats: Stats,
    factors: Factors,
) -> tuple[Array, Array | None, Array]:
    """SparseGPT's own result at the zero count of ``masked``: ``(weight, bias, keep)`` in
    the weight's layout and dtype. Raises what :func:`solve_sparsegpt_select` raises."""
    eff = effective_with_bias(dense, bias, plan)
    width = eff.shape[1]
    d = width - (1 if bias is not None else 0)
    diagonal = np.arange(width)
    lam = factors.damped[:, diagonal, diagonal] - stats.hessian[:, diagonal, diagonal]
    solved, keep_eff = solve_sparsegpt_select(
        factors.damped,
        eff,
        int(np.count_nonzero(masked == 0)),
        cross=stats.cross + lam[:, :, None] * eff,
        prunable=diagonal < d,
        factors=factors,
    )
    keep = from_effective(keep_eff[:, :d].astype(np.float64), plan, dense.shape) != 0
    weight, new_bias = _from_solution(solved, plan, dense, keep, bias)
    return weight, new_bias, keep


def _from_solution(
    solved: Array, plan: Plan, like: Array, keep: Array, bias: Array | None
) -> tuple[Array, Array | None]:
    """An effective solution ``(g, D, r)`` as the weight (the layout and dtype of ``like``,
    zero where ``keep`` is False) and, when the layer has one, the bias (its dtype)."""
    d = solved.shape[1] - (1 if bias is not None else 0)
    weight = cast_weight(solved[:, :d], plan, like, keep)
    if bias is None:
        return weight, None
    return weight, bias_from_effective(solved[:, d], plan).astype(bias.dtype)


def _finite(weight: Array, bias: Array | None) -> bool:
    return bool(np.all(np.isfinite(weight)) and (bias is None or np.all(np.isfinite(bias))))


def refit_masked(layer: LayerSolve, masked: Array) -> Refit:
    """Refit ``masked`` (and the layer's bias) on its ``stats`` with the damped Hessian's
    ``factors``; the plain mask (and the original bias) when the refit does not lower the
    error."""
    name, plan, bias, stats, factors = (
        layer.name,
        layer.plan,
        layer.bias,
        layer.stats,
        layer.factors,
    )
    solver = layer.solver
    keep = masked != 0
    mask = keep_mask(masked, plan, bias is not None)
    error_before = stats.error(effective_with_bias(masked, bias, plan))
    method = solver if solver != "auto" else choose_solver(mask)
    info = LayerRefit(name, method, error_before, error_before, 0.0)
    try:
        if method == "exact":
            solved = solve_exact(factors.damped, factors.cross, mask, factors)
        else:
            solved = solve_sparsegpt(factors.damped, factors.cross, mask, factors=factors)
    except np.linalg.LinAlgError as exc:
        info.reason = f"solver failed ({exc}); kept mask"
        return Refit(info)
    weight, new_bias = _from_solution(solved, plan, masked, keep, bias)
    if not _finite(weight, new_bias):
        info.reason = "refit overflows the weight dtype; kept mask"
        return Refit(info)
    error_after = stats.error(effective_with_bias(weight, new_bias, plan))
    if not error_after < error_before:
        info.reason = "refit did not help; kept mask"
        return Refit(info)
    info.error_after = error_after
    info.bias = plan.bias
    return Refit(info, weight, new_bias)
