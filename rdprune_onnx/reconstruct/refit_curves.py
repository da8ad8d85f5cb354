"""Rate-distortion curves that know about reconstruction (``--refit-curves``).

Plain curves record the output distortion of each layer pruned by magnitude; with
``--reconstruct`` the pruned layers are then refit, so the allocation was chosen for
distortions that are not the ones applied. Refit-aware curves measure every point with the
layer pruned AND refit, the way :func:`rdprune_onnx.reconstruct.reconstruct` refits it.

A curve prunes one layer at a time with the rest of the model dense, so the layer's input
is the dense model's activation X and its refit target the dense layer output ``Y = X W +
b``. The statistics of the refit therefore come from one pass over the calibration data per
layer, with no target pass at all: ``H = [X, 1]ᵀ[X, 1]`` (float64) is summed once, and
``G = H [W; b]`` and ``ΣY² = tr([W; b]ᵀ H [W; b])`` follow from the dense weight exactly.
Layers that read the same activation (Q/K/V projections, one after another in graph order)
share that pass and that Hessian. The damped Hessian and its factorisations (the inverse
for the exact solver's pruned form; the inverse's Cholesky factor and the unconstrained
optimum for SparseGPT) are computed once per layer and reused at every level; what remains
per level is the masked solve itself (exact: one small system per output row; SparseGPT:
the O(r d²) column sweep). Solves run one at a time (the curve's other workers keep running
ONNX Runtime meanwhile); a mask asked for again (curves measured over chunks of the
calibration data) is answered from a per-layer memo of up to ``MEMO_BYTES``.

With ``select=True`` each level re-chooses the layer's mask with SparseGPT
(:func:`rdprune_onnx.reconstruct.solve_sparsegpt_select`) at the level's count of zeros,
from the same dense statistics and factorisations, and feeds it when it beats the given
mask's refit (as ``reconstruct(select=True, inputs="dense")`` does). Padding rows are
excluded from the Hessian as in :mod:`rdprune_onnx.reconstruct`.

Memory per layer: the Hessian and its inverse, ``2 g D²`` float64 (MiniLM's widest layer,
D = 1537: 38 MB), plus the exact solver's bounded chunk of gathered systems.

Each level gets what ``--reconstruct`` would give a layer whose inputs are dense: the same
solvers (``auto`` chooses per level by cost, as the refit does per mask), the same damping,
the bias refit where it exists (the bias constant is then fed with the weight), and the
same guarantee: when the refit does not lower the layer's calibration error, the plain
masked weight (and the original bias) are fed. Pruned positions are exactly zero. Layers
the refit cannot handle (see :mod:`rdprune_onnx.reconstruct`) keep plain-mask curves, and
the reason is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from rdprune_onnx.curves import Curve, LayerCandidates, Reference, measure_curves
from rdprune_onnx.graph.layers import Layer
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.graph.types import infer_types
from rdprune_onnx.masks import apply_mask, prune_count
from rdprune_onnx.reconstruct.layout import (
    Plan,
    RefitGraph,
    plan_layer,
    rows_key,
)
from rdprune_onnx.reconstruct.refit import LayerSolve, layer_factors, refit_layer
from rdprune_onnx.reconstruct.solvers import DAMPING, Factors, check_solver
from rdprune_onnx.reconstruct.statistics import (
    Stats,
    Sums,
    dense_stats,
    dense_sums,
    refit_stats,
    token_mask_name,
)
from rdprune_onnx.runtime import SessionConfig

log = logging.getLogger(__name__)

Array = np.ndarray
REFIT_DAMPING = DAMPING  # what --reconstruct uses
MEMO_BYTES = 64 * 2**20  # per layer: candidates kept for a mask asked for again


@dataclass
class CurveRefitCost:
    """What one layer's refit-aware curve cost, and what its levels did."""

    name: str
    refit: bool  # False: plain-mask curve (``reason`` says why)
    reason: str | None = None
    width: int = 0  # inputs per output row (+1 with a bias)
    rows: int = 0  # calibration rows in the Hessian
    hessian_s: float = 0.0  # the data pass and the sums (0 when shared with the layer before)
    solve_s: float = 0.0  # all levels' solves, factorisations included
    levels: int = 0  # levels solved (levels that prune nothing are not)
    methods: dict[str, int] = field(default_factory=dict)  # solver -> levels
    kept_mask: int = 0  # levels where the refit did not help and the plain mask was fed
    # (ratio, layer error of plain masking, layer error fed) per solved level
    errors: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class _Level:
    """One layer of a refit-aware curve: what every level's solve reads."""

    name: str
    plan: Plan
    dense: Array  # the dense weight (the mask is re-selected from it with ``select``)
    bias: Array | None  # the dense bias refit with the weight, if any
    stats: Stats
    factors: Factors | None = None

    @property
    def names(self) -> list[str]:
        """The tensors fed for a candidate: the weight, then its bias."""
        return [self.name] + ([self.plan.bias] if self.plan.bias is not None else [])

    def fed(self, weight: Array, bias: Array | None = None) -> dict[str, Array]:
        """``weight`` and ``bias`` (the dense bias when None) under their tensor names."""
        fed = {self.name: weight}
        if self.plan.bias is not None:
            assert self.bias is not None
            fed[self.plan.bias] = bias if bias is not None else self.bias
        return fed


class RefitCandidates:
    """The candidate factory of refit-aware curves (``measure_curves(candidates=...)``).

    Called once per layer with its dense weight; returns how to turn each masked weight
    into the refit weight (and bias) to feed, or None for plain masking.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        data: Mapping[str, Array],
        *,
        batch_size: int = 32,
        config: SessionConfig | None = None,
        solver: str = "auto",
        damping: float = REFIT_DAMPING,
        refit_bias: bool = True,
        select: bool = False,
        select_refits: bool = True,
    ) -> None:
        check_solver(solver, damping)
        self.typed = infer_types(model)
        self.graph = RefitGraph(self.typed)
        self.data = data
        self.batch_size = batch_size
        self.config = config or SessionConfig()
        self.solver = solver
        self.damping = damping
        self.refit_bias = refit_bias
        self.select = select
        self.select_refits = select_refits
        self.token_mask = token_mask_name(data)
        self.costs: dict[str, CurveRefitCost] = {}
        self._last: tuple[tuple[object, ...], Sums | None] | None = None
        self._lock = threading.Lock()

    def __call__(self, layer: Layer, weight: Array) -> LayerCandidates | None:
        plans = plan_layer(self.graph, layer, self.refit_bias)
        if isinstance(plans, str):
            self._plain(layer.name, plans)
            return None
        plan, bias = plans[0], self._bias(plans[0])
        started = time.perf_counter()
        key = tuple(rows_key(p) for p in plans)
        shared = self._last is not None and self._last[0] == key
        sums = self._last[1] if shared and self._last is not None else self._hessian(plans)
        self._last = (key, sums)
        if sums is None:
            self._plain(layer.name, "no calibration rows")
            return None
        level = _Level(layer.name, plan, weight, bias, dense_stats(sums, weight, bias, plan))
        cost = self._start(level, 0.0 if shared else time.perf_counter() - started)
        log.info(
            "%s: refit-aware curve (%d inputs, %d rows, Hessian %.2f s%s)",
            layer.name,
            cost.width,
            cost.rows,
            cost.hessian_s,
            ", shared" if shared else "",
        )
        memo: dict[bytes, dict[str, Array]] = {}
        memo_room = [MEMO_BYTES]

        def make(masked: Array, ratio: float) -> dict[str, Array]:
            if masked.shape != weight.shape or masked.dtype != weight.dtype:
                raise ValueError(f"{layer.name}: candidate is not shaped like the weight")
            keep = masked != 0
            if np.array_equal(keep, weight != 0):  # prunes nothing: the dense layer
                return level.fed(masked)
            # One solve at a time: the solver's BLAS thread limit is process-wide, and
            # the curve runs candidates on several threads (their ONNX Runtime runs still
            # overlap the solves). The same mask again (a curve measured over chunks of
            # the calibration data) is not solved twice.
            key = np.packbits(keep).tobytes()
            with self._lock:
                if key in memo:
                    return dict(memo[key])
                fed = self._solve(level, masked, cost, ratio)
                size = sum(v.nbytes for v in fed.values())
                if size <= memo_room[0]:
                    memo[key] = fed
                    memo_room[0] -= size
            return dict(fed)

        return LayerCandidates(level.names, make)

    def _bias(self, plan: Plan) -> Array | None:
        """The dense value of the bias refit with the weight (None: no bias)."""
        if plan.bias is None:
            return None
        found = self.graph.constant(plan.bias)
        assert found is not None
        return found[1]

    def _start(self, level: _Level, hessian_s: float) -> CurveRefitCost:
        """The layer's cost record, its factorisations prepared (on first use)."""
        width = level.stats.hessian.shape[1]
        level.factors = layer_factors(level.name, level.stats, level.bias is not None, self.damping)
        cost = CurveRefitCost(level.name, True, width=width, rows=level.stats.rows)
        cost.hessian_s = hessian_s
        self.costs[level.name] = cost
        return cost

    def _solve(
        self, level: _Level, given: Array, cost: CurveRefitCost, ratio: float
    ) -> dict[str, Array]:
        """What to feed for the masked weight ``given``: its refit (or SparseGPT's selection
        at its count of zeros), or ``given`` itself when that does not lower the error."""
        assert level.factors is not None
        t = time.perf_counter()
        layer = LayerSolve(
            level.name, level.plan, level.dense, level.bias, level.stats, self.solver, level.factors
        )
        refit = refit_layer(layer, given, select=self.select, refits=self.select_refits)
        cost.solve_s += time.perf_counter() - t
        cost.levels += 1
        cost.methods[refit.info.method] = cost.methods.get(refit.info.method, 0) + 1
        if refit.weight is None:
            cost.kept_mask += 1
        info = refit.info
        cost.errors.append((float(ratio), info.error_before, info.error_after))
        if refit.weight is None:
            return level.fed(given.copy())
        return level.fed(refit.weight, refit.bias)

    def _plain(self, name: str, reason: str) -> None:
        log.info("%s: plain-mask curve (%s)", name, reason)
        self.costs[name] = CurveRefitCost(name, False, reason)

    def _hessian(self, plans: list[Plan]) -> Sums | None:
        """``[X, 1]ᵀ[X, 1]`` over the dense activations of every use, in one data pass."""
        return dense_sums(
            self.typed,
            [plans],
            self.data,
            batch_size=self.batch_size,
            config=self.config,
            token_mask=self.token_mask,
        )[0]

    def summary(self) -> dict[str, float | int]:
        """Totals over the layers measured so far."""
        refit = [c for c in self.costs.values() if c.refit]
        return {
            "layers_refit": len(refit),
            "layers_plain": len(self.costs) - len(refit),
            "hessian_s": sum(c.hessian_s for c in refit),
            "solve_s": sum(c.solve_s for c in refit),
            "levels_solved": sum(c.levels for c in refit),
            "levels_kept_mask": sum(c.kept_mask for c in refit),
        }


# --------------------------------------------------------------------------------------
# Curves re-measured on the pruned-and-refit model (what the sequential refit applies)


class SequentialRefitCandidates(RefitCandidates):
    """Refit-aware curves measured on a pruned-and-refit model ``base`` (a first
    allocation + :func:`rdprune_onnx.reconstruct.reconstruct`), the way the final,
    sequential refit will treat each layer.

    One-layer refit-aware curves (:class:`RefitCandidates`) refit a layer on the DENSE
    model's inputs, with the rest of the model dense; the applied refit is sequential:
    each layer is refit on the inputs of the model pruned so far (X̂) towards the dense
    layer's output, absorbing upstream error, and the layers below it are pruned too. Here
    a curve point of layer l at ratio p is: the base model, with l's DENSE weight masked by
    magnitude at p (or re-selected by SparseGPT, ``select``) and refit on the base model's
    activations X̂ towards the dense outputs Y (``G = X̂ᵀY``), everything else as in
    ``base``. Levels below the base's own ratio for l are measured too (the mask comes
    from the dense weight, not from the base's). Measure with
    :func:`remeasure_curves` (``measure_curves`` on ``base``, reference rebased on it).

    Cost per layer: one pass of ``base`` up to the layer (inputs) and of the dense model
    (targets), then one solve per level, as :class:`RefitCandidates`.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        base_weights: Mapping[str, Array],
        data: Mapping[str, Array],
        **options: Any,
    ) -> None:
        """``options``: the keyword options of :class:`RefitCandidates` (batch_size,
        config, solver, damping, refit_bias, select, select_refits), checked there."""
        super().__init__(model, data, **options)
        self.base = replace_weights(self.typed, base_weights)

    def __call__(self, layer: Layer, weight: Array) -> LayerCandidates | None:
        plans = plan_layer(self.graph, layer, self.refit_bias)
        found = self.graph.constant(layer.name)
        if isinstance(plans, str) or found is None:
            self._plain(layer.name, plans if isinstance(plans, str) else "weight is not a constant")
            return None
        dense = found[1]
        plan, bias = plans[0], self._bias(plans[0])
        started = time.perf_counter()
        stats = self._stats(plans, bias)
        if stats is None:
            self._plain(layer.name, "no calibration rows")
            return None
        level = _Level(layer.name, plan, dense, bias, stats)
        cost = self._start(level, time.perf_counter() - started)
        memo: dict[int, dict[str, Array]] = {}

        def make(masked: Array, ratio: float) -> dict[str, Array]:
            count = max(prune_count(float(ratio), dense.size), int(np.count_nonzero(dense == 0)))
            with self._lock:
                if count not in memo:
                    given = apply_mask(dense, count)
                    if np.array_equal(given, dense):  # prunes nothing: the dense layer
                        memo[count] = level.fed(dense)
                    else:
                        memo[count] = self._solve(level, given, cost, ratio)
                return dict(memo[count])

        return LayerCandidates(level.names, make)

    def _stats(self, plans: list[Plan], bias: Array | None) -> Stats | None:
        """H = X̂ᵀX̂ (base model inputs), G = X̂ᵀY and ΣY² (dense outputs), one pass."""
        return refit_stats(
            self.base,
            self.typed,
            plans,
            bias,
            self.data,
            batch_size=self.batch_size,
            config=self.config,
            token_mask=self.token_mask,
        )


def remeasure_curves(
    model: onnx.ModelProto,
    layers: list[Layer],
    base_weights: Mapping[str, Array],
    data: Mapping[str, Array],
    reference: Reference,
    *,
    ratios: Array,
    metric: str = "mse",
    batch_size: int = 32,
    config: SessionConfig | None = None,
    solver: str = "auto",
    select: bool = False,
    select_refits: bool = True,
) -> tuple[dict[str, Curve], SequentialRefitCandidates]:
    """Curves of ``layers`` measured on the pruned-and-refit model ``base_weights`` (the
    weights and biases of a first ``reconstruct``) with :class:`SequentialRefitCandidates`;
    ``reference`` holds the dense model's outputs (it is rebased on the base model here).
    Allocate from them (rd DP) and reconstruct again from the dense model."""
    config = config or SessionConfig()
    factory = SequentialRefitCandidates(
        model,
        base_weights,
        data,
        batch_size=batch_size,
        config=config,
        solver=solver,
        select=select,
        select_refits=select_refits,
    )
    rebased = reference.rebased(factory.base, config)
    curves = measure_curves(
        factory.base,
        layers,
        rebased,
        ratios=ratios,
        metric=metric,
        config=config,
        candidates=factory,
    )
    return curves, factory
