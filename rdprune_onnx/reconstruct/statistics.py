"""The refit's statistics: ``H = [X̂, 1]ᵀ[X̂, 1]``, ``G = X̂ᵀY`` and ``ΣY²`` summed in float64
over the calibration rows (padding rows excluded), the activations fetched with ONNX
Runtime, and the dense-input shortcut ``G = H [W; b]``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from rdprune_onnx.calibration import batches
from rdprune_onnx.graph.cut import upstream
from rdprune_onnx.reconstruct.layout import Plan, effective_with_bias, input_rows, target_rows
from rdprune_onnx.reconstruct.solvers import CHUNK_BYTES
from rdprune_onnx.runtime import Session, SessionConfig

log = logging.getLogger(__name__)

Array = np.ndarray


def token_mask_name(data: Mapping[str, Array]) -> str | None:
    """The calibration input that marks real token positions, if there is one: a 2-D
    integer or boolean input (batch, seq) whose name contains ``attention_mask`` or, when
    no name does, ``mask`` (one such input only; several: None, logged)."""
    found = [
        name
        for name, array in data.items()
        if getattr(array, "ndim", 0) == 2
        and np.dtype(array.dtype).kind in "biu"
        and "mask" in name.lower()
    ]
    preferred = [name for name in found if "attention_mask" in name.lower()] or found
    if len(preferred) > 1:
        log.info("several mask inputs (%s): every activation row counts", ", ".join(preferred))
        return None
    return preferred[0] if preferred else None


def real_rows(plan: Plan, act: Array, token_mask: Array | None) -> Array | None:
    """Which activation rows of ``plan`` are real tokens (None: all rows count).

    Rule: only ``x @ W`` layers (MatMul with the weight on the right) have token rows.
    When ``act`` has rank >= 3 and its two leading axes equal the attention mask's shape
    (batch, seq), the rows (the flattened leading axes) at positions where the mask is 0
    are padding and excluded from H, G, ΣY² and the row count. Any other shape (a pooled
    (batch, hidden) activation, a reshaped (batch * seq, hidden) one, heads before seq)
    counts every row; a rank >= 3 activation that does not line up is logged.
    """
    if token_mask is None or plan.kind != "matmul_right":
        return None
    mask = np.asarray(token_mask) != 0
    if act.ndim >= 3 and act.shape[:2] == mask.shape:
        full = mask.reshape(mask.shape + (1,) * (act.ndim - 3))
        return np.broadcast_to(full, act.shape[:-1]).reshape(-1)
    if act.ndim >= 3:
        log.info(
            "%s: activation %s does not line up with the attention mask %s: every row counts",
            plan.activation,
            list(act.shape),
            list(mask.shape),
        )
    return None


@dataclass
class Stats:
    hessian: Array  # (g, D, D)  D = d (+1 with a bias column, last)
    cross: Array  # (g, D, r)
    target_sq: float = 0.0
    rows: int = 0

    def error(self, w: Array) -> float:
        """Mean squared error per output element of the effective weight ``w`` (g, D, r)."""
        quad = float(np.sum(w * (self.hessian @ w)))
        lin = float(np.sum(w * self.cross))
        total = quad - 2.0 * lin + self.target_sq
        count = self.rows * w.shape[0] * w.shape[2]
        return max(total, 0.0) / count if count else 0.0


class Sums:
    """Float64 sums over calibration rows shared by the layers of one group.

    The layers of a group read the same activation rows ``x`` (g, n, d), so they share
    ``H = [x, 1]ᵀ[x, 1]`` (the all-ones bias column is always summed; layers without a bias
    use the leading d x d block); each has its own cross term and target energy.
    """

    def __init__(self, groups: int, width: int, outputs: Sequence[int]) -> None:
        self.width = width
        self.hessian = np.zeros((groups, width + 1, width + 1))
        self.cross = [np.zeros((groups, width + 1, r)) for r in outputs]
        self.target_sq = [0.0 for _ in outputs]
        self.rows = 0

    def add(self, x: Array, ys: Sequence[Array]) -> None:
        """Rows ``x`` (g, n, d) and, per layer, its targets (g, n, r_i)."""
        g, n, d = x.shape
        step = max(1, CHUNK_BYTES // (8 * g * (d + 1 + max((y.shape[2] for y in ys), default=0))))
        for a in range(0, n, step):
            chunk = x[:, a : a + step].astype(np.float64)
            xc = np.concatenate([chunk, np.ones((g, chunk.shape[1], 1))], axis=2)
            xt = xc.transpose(0, 2, 1)
            self.hessian += xt @ xc
            for i, y in enumerate(ys):
                self.cross[i] += xt @ y[:, a : a + step]
        for i, y in enumerate(ys):
            self.target_sq[i] += float(np.einsum("gnr,gnr->", y, y))
        self.rows += n

    def stats(self, index: int, bias: bool) -> Stats:
        size = self.width + (1 if bias else 0)
        return Stats(
            self.hessian[:, :size, :size],
            self.cross[index][:, :size],
            self.target_sq[index],
            self.rows,
        )


class Fetcher:
    """Runs a model for some of its tensors (graph inputs are taken from the feeds); only
    the part of the model that computes them is built (:func:`upstream`)."""

    def __init__(
        self, model: onnx.ModelProto, names: Sequence[str], feeds: set[str], config: SessionConfig
    ) -> None:
        self.names = list(dict.fromkeys(names))
        self.computed = [n for n in self.names if n not in feeds]
        self.session = Session(upstream(model, self.computed), config) if self.computed else None

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        values = {n: np.asarray(feeds[n]) for n in self.names if n in feeds}
        if self.session is not None:
            used = {n: v for n, v in feeds.items() if n in self.session.input_names}
            got = self.session.run(used, self.computed)
            values.update(zip(self.computed, got, strict=True))
        return values


def dense_sums(
    typed: onnx.ModelProto,
    plan_lists: Sequence[Sequence[Plan]],
    data: Mapping[str, Array],
    *,
    batch_size: int,
    config: SessionConfig,
    token_mask: str | None = None,
) -> list[Sums | None]:
    """``[X, 1]ᵀ[X, 1]`` over the dense activations of every use, for each list of plans
    (one list per weight or per group of weights reading the same rows), in one data pass
    (padding rows excluded when ``token_mask`` names the attention-mask input)."""
    names = [p.activation for plans in plan_lists for p in plans]
    fetcher = Fetcher(typed, names, set(data), config)
    all_sums: list[Sums | None] = [None] * len(plan_lists)
    for feeds in batches(data, batch_size):
        values = fetcher.run(feeds)
        token = feeds.get(token_mask) if token_mask is not None else None
        for i, plans in enumerate(plan_lists):
            for plan in plans:
                all_sums[i] = add_rows(all_sums[i], plan, values[plan.activation], [], token)
    return all_sums


def add_rows(
    sums: Sums | None, plan: Plan, act: Array, ys: Sequence[Array], token: Array | None
) -> Sums | None:
    """Add one batch of ``plan``'s activation rows from ``act`` and, per layer, its target
    rows ``ys`` (g, rows, r_i) to ``sums`` (a new :class:`Sums` when None); padding rows
    (``token``: the batch's attention mask) are left out."""
    real = real_rows(plan, act, token)
    for rows, x in input_rows(plan, act):
        chunk = [y[:, rows] for y in ys]
        if real is not None:
            x, chunk = x[:, real[rows]], [y[:, real[rows]] for y in chunk]
        if sums is None:
            sums = Sums(x.shape[0], x.shape[2], [y.shape[2] for y in chunk])
        sums.add(x, chunk)
    return sums


def refit_stats(
    inputs_model: onnx.ModelProto,
    targets_model: onnx.ModelProto,
    plans: Sequence[Plan],
    bias: Array | None,
    data: Mapping[str, Array],
    *,
    batch_size: int,
    config: SessionConfig,
    token_mask: str | None = None,
) -> Stats | None:
    """One weight's statistics in one data pass: ``H = X̂ᵀX̂`` from the activations of
    ``inputs_model``, ``G = X̂ᵀY`` and ``ΣY²`` from the outputs of ``targets_model`` (the
    dense model), over the rows of every use (``plans``); None without any row."""
    feeds_names = set(data)
    inputs = Fetcher(inputs_model, [p.activation for p in plans], feeds_names, config)
    targets = Fetcher(targets_model, [p.output for p in plans], feeds_names, config)
    sums: Sums | None = None
    for feeds in batches(data, batch_size):
        acts, outs = inputs.run(feeds), targets.run(feeds)
        token = feeds.get(token_mask) if token_mask is not None else None
        for plan in plans:
            y = target_rows(plan, outs[plan.output], bias)
            sums = add_rows(sums, plan, acts[plan.activation], [y], token)
    return None if sums is None else sums.stats(0, bias is not None)


def dense_stats(sums: Sums, weight: Array, bias: Array | None, plan: Plan) -> Stats:
    """The refit statistics against the dense layer's own output on dense inputs.

    The target is ``Y = [X, 1] [W; b]`` (what the dense node computes, less any fixed
    offset), so ``G = H [W; b]`` and ``ΣY² = tr([W; b]ᵀ G)`` need no pass over the outputs.
    """
    size = sums.width + (1 if bias is not None else 0)
    hessian = sums.hessian[:, :size, :size]
    dense = effective_with_bias(weight, bias, plan)
    cross = hessian @ dense
    return Stats(hessian, cross, float(np.sum(dense * cross)), sums.rows)


def warn_few_rows(name: str, rows: int, width: int) -> None:
    if rows < width:
        log.warning(
            "%s: %d calibration rows for %d inputs; the refit may fit the calibration data "
            "rather than the layer (use more samples or a larger damping)",
            name,
            rows,
            width,
        )
