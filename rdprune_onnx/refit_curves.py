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

import numpy as np
import onnx

from rdprune_onnx.curves import LayerCandidates, infer_types
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import Layer
from rdprune_onnx.reconstruct import (
    DAMPING,
    SOLVERS,
    Factors,
    _damped,
    _Graph,
    _Plan,
    _plan_layer,
    _refit_masked,
    _rows_key,
    _Sums,
    _warn_few_rows,
    dense_stats,
    dense_sums,
    select_refit,
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
    ) -> None:
        if solver not in SOLVERS:
            raise UserError(f"unknown solver {solver!r}", f"choose one of {', '.join(SOLVERS)}")
        if damping < 0:
            raise UserError(f"damping must be >= 0, got {damping}", "e.g. 0.01")
        self.typed = infer_types(model)
        self.graph = _Graph(self.typed)
        self.data = data
        self.batch_size = batch_size
        self.config = config or SessionConfig()
        self.solver = solver
        self.damping = damping
        self.refit_bias = refit_bias
        self.select = select
        self.token_mask = token_mask_name(data)
        self.costs: dict[str, CurveRefitCost] = {}
        self._last: tuple[tuple[object, ...], _Sums | None] | None = None
        self._lock = threading.Lock()

    def __call__(self, layer: Layer, weight: Array) -> LayerCandidates | None:
        plans = _plan_layer(self.graph, layer, self.refit_bias)
        if isinstance(plans, str):
            self._plain(layer.name, plans)
            return None
        plan = plans[0]
        bias: Array | None = None
        if plan.bias is not None:
            found = self.graph.constant(plan.bias)
            assert found is not None
            bias = found[1]
        started = time.perf_counter()
        key = tuple(_rows_key(p) for p in plans)
        shared = self._last is not None and self._last[0] == key
        sums = self._last[1] if shared and self._last is not None else self._hessian(plans)
        self._last = (key, sums)
        if sums is None:
            self._plain(layer.name, "no calibration rows")
            return None
        stats = dense_stats(sums, weight, bias, plan)
        width = stats.hessian.shape[1]
        d = width - (1 if bias is not None else 0)
        _warn_few_rows(layer.name, stats.rows, width)
        factors = Factors(_damped(stats.hessian, self.damping, d), stats.cross)
        cost = CurveRefitCost(layer.name, True, width=width, rows=stats.rows)
        cost.hessian_s = 0.0 if shared else time.perf_counter() - started
        self.costs[layer.name] = cost
        names = [layer.name] + ([plan.bias] if plan.bias is not None else [])

        memo: dict[bytes, dict[str, Array]] = {}
        memo_room = [MEMO_BYTES]

        def make(masked: Array, ratio: float) -> dict[str, Array]:
            if masked.shape != weight.shape or masked.dtype != weight.dtype:
                raise ValueError(f"{layer.name}: candidate is not shaped like the weight")
            keep = masked != 0
            if np.array_equal(keep, weight != 0):  # prunes nothing: the dense layer
                fed = {layer.name: masked}
                if plan.bias is not None and bias is not None:
                    fed[plan.bias] = bias
                return fed
            # One solve at a time: the solver's BLAS thread limit is process-wide, and
            # the curve runs candidates on several threads (their ONNX Runtime runs still
            # overlap the solves). The same mask again (a curve measured over chunks of
            # the calibration data) is not solved twice.
            key = np.packbits(keep).tobytes()
            with self._lock:
                if key in memo:
                    return dict(memo[key])
                t = time.perf_counter()
                if self.select:
                    refit = select_refit(
                        layer.name, plan, weight, masked, bias, stats, self.solver, factors
                    )
                else:
                    refit = _refit_masked(
                        layer.name, plan, masked, bias, stats, self.solver, factors
                    )
                cost.solve_s += time.perf_counter() - t
                cost.levels += 1
                method = refit.info.method
                cost.methods[method] = cost.methods.get(method, 0) + 1
                if refit.weight is None:
                    cost.kept_mask += 1
                    fed = {layer.name: masked.copy()}
                else:
                    fed = {layer.name: refit.weight}
                    if refit.bias is not None and plan.bias is not None:
                        fed[plan.bias] = refit.bias
                if plan.bias is not None and plan.bias not in fed:
                    assert bias is not None
                    fed[plan.bias] = bias
                info = refit.info
                cost.errors.append((float(ratio), info.error_before, info.error_after))
                size = sum(v.nbytes for v in fed.values())
                if size <= memo_room[0]:
                    memo[key] = fed
                    memo_room[0] -= size
            return dict(fed)

        log.info(
            "%s: refit-aware curve (%d inputs, %d rows, Hessian %.2f s%s)",
            layer.name,
            width,
            stats.rows,
            cost.hessian_s,
            ", shared" if shared else "",
        )
        return LayerCandidates(names, make)

    def _plain(self, name: str, reason: str) -> None:
        log.info("%s: plain-mask curve (%s)", name, reason)
        self.costs[name] = CurveRefitCost(name, False, reason)

    def _hessian(self, plans: list[_Plan]) -> _Sums | None:
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
