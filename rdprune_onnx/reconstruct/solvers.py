"""The refit solvers, in pure numpy: the damped Hessian, the exact per-row least squares,
SparseGPT's blockwise sweep with a fixed mask and with mask selection, and the ``auto``
rule between them (see :mod:`rdprune_onnx.reconstruct` for the maths and the costs).

Every solver works in the effective layout: ``damped`` (g, D, D) is ``H + λI`` per group,
``cross`` (g, D, r) is ``X̂ᵀY``, a mask (g, D, r) marks the kept entries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from threadpoolctl import threadpool_limits

from rdprune_onnx.errors import UserError

DAMPING = 0.01  # of the mean Hessian diagonal, added before solving
SOLVERS = ("auto", "exact", "sparsegpt")


SELECT_METHOD = "sparsegpt-select"  # LayerRefit.method of a mask chosen by SparseGPT


EXACT_MAX_FLOPS = 1.5e11  # auto: exact when its estimated cost is below this ...


EXACT_FLOP_FACTOR = 4.0  # ... or below this multiple of the SparseGPT estimate


BLOCK_SIZE = 128  # SparseGPT columns per lazy-update block


CHUNK_BYTES = 64 * 2**20  # working memory for one chunk of gathered systems / float64 rows

Array = np.ndarray


def check_solver(solver: str, damping: float) -> None:
    """Refuse an unknown solver or a negative damping (the user's settings)."""
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}", f"choose one of {', '.join(SOLVERS)}")
    if damping < 0:
        raise UserError(f"damping must be >= 0, got {damping}", "e.g. 0.01")


def damped_hessian(hessian: Array, damping: float, width: int) -> Array:
    """``H + λI`` per group, ``λ = damping * mean(diag(H[:width, :width]))`` on the
    weight inputs; a bias column (index ``width``, when present) gets ``damping`` times its
    own diagonal entry (the row count), so that scaling the activations by any factor
    scales the refit weights by its inverse and leaves the bias unchanged. A zero diagonal
    (all-zero activations) gets 1."""
    out = hessian.copy()
    size = out.shape[1]
    diagonal = np.arange(size)
    means = out[:, diagonal[:width], diagonal[:width]].mean(axis=1) if width else np.zeros(1)
    lam = np.where(means > 0, damping * means, 1.0)
    out[:, diagonal[:width], diagonal[:width]] += lam[:, None]
    if size > width:
        ones = out[:, width, width].copy()
        out[:, width, width] += np.where(ones > 0, damping * ones, 1.0)
    return out


def exact_cost(mask: Array) -> float:
    """Estimated flops of :func:`solve_exact` for a ``(g, D, r)`` keep-mask."""
    g, d, _r = mask.shape
    kept = mask.sum(axis=1)
    m = np.minimum(kept, d - kept).astype(np.float64)
    inverse = float(g) * d**3 if np.any(kept > d - kept) else 0.0
    return float(np.sum(2.0 / 3.0 * m**3 + 2.0 * m * m + 2.0 * d * m)) + inverse


def sparsegpt_cost(mask: Array) -> float:
    """Estimated flops of :func:`solve_sparsegpt` for a ``(g, D, r)`` keep-mask."""
    g, d, r = mask.shape
    return float(g) * (2.0 * d**3 + 2.0 * r * d * d)


def _padded(sets: list[Array], order: Array, start: int, stop: int) -> tuple[Array, Array, Array]:
    """Systems ``order[start:stop]`` as padded index arrays (c, m) and their validity."""
    chosen = order[start:stop]
    m = max(1, max(len(sets[i]) for i in chosen))
    idx = np.zeros((len(chosen), m), dtype=np.int64)
    valid = np.zeros((len(chosen), m), dtype=bool)
    for row, i in enumerate(chosen):
        size = len(sets[i])
        idx[row, :size] = sets[i]
        valid[row, :size] = True
    return chosen, idx, valid


def _chunks(sizes: Array, per_system: Array) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of (size-sorted) systems whose padded memory fits the budget."""
    start, count = 0, len(sizes)
    while start < count:
        stop = start + 1
        while stop < count and (stop + 1 - start) * per_system[stop] <= CHUNK_BYTES:
            stop += 1
        yield start, stop
        start = stop


def _solve_padded(a: Array, b: Array, valid: Array) -> Array:
    """Solve the padded systems ``a x = b`` (padding rows/cols replaced by identity)."""
    both = valid[:, :, None] & valid[:, None, :]
    a = np.where(both, a, 0.0)
    diagonal = np.arange(a.shape[1])
    a[:, diagonal, diagonal] += ~valid
    rhs = np.where(valid, b, 0.0)
    # A batch of independent factorisations: one BLAS thread each. A thread team per
    # matrix gains little below ~1000 rows and, when the CPUs are shared with other work,
    # makes each factorisation 10-80x slower (measured with OpenBLAS on 2 busy cores).
    with _blas_threads(1):
        return np.linalg.solve(a, rhs[..., None])[..., 0] * valid


@contextmanager
def _blas_threads(limit: int) -> Iterator[None]:
    """Limit BLAS threads inside the block."""
    with threadpool_limits(limit, user_api="blas"):
        yield


class Factors:
    """The mask-independent factorisations of one layer's damped Hessian, computed on
    first use and kept: every solve against the same ``damped`` and ``cross`` (the levels of
    a refit-aware curve, :mod:`rdprune_onnx.reconstruct.refit_curves`) reuses them.

    ``inverse`` (g, D, D) = ``(H + λI)⁻¹`` (exact's pruned form, SparseGPT), ``free``
    (g, D, r) = ``inverse @ cross``, the unconstrained optimum, and ``upper(k)``, the upper
    Cholesky factor of group k's (symmetrised) inverse (SparseGPT).
    """

    def __init__(self, damped: Array, cross: Array) -> None:
        self.damped = damped
        self.cross = cross
        self._inverse: Array | None = None
        self._free: Array | None = None
        self._upper: dict[int, Array] = {}

    @property
    def inverse(self) -> Array:
        if self._inverse is None:
            self._inverse = np.linalg.inv(self.damped)
        return self._inverse

    @property
    def free(self) -> Array:
        if self._free is None:
            self._free = self.inverse @ self.cross
        return self._free

    def upper(self, k: int) -> Array:
        """Raises ``np.linalg.LinAlgError`` when the inverse is not positive definite."""
        if k not in self._upper:
            inverse = self.inverse[k]
            self._upper[k] = np.linalg.cholesky((inverse + inverse.T) / 2.0).T
        return self._upper[k]


def _row_systems(mask: Array) -> tuple[list[Array], list[Array], Array, Array]:
    """One system per (group, output row) of a ``(g, D, r)`` keep-mask: its kept inputs,
    its pruned inputs, its group and its row."""
    g, _d, r = mask.shape
    kept_sets: list[Array] = []
    pruned_sets: list[Array] = []
    for k in range(g):
        for j in range(r):
            keep = mask[k, :, j]
            kept_sets.append(np.flatnonzero(keep))
            pruned_sets.append(np.flatnonzero(~keep))
    groups = np.repeat(np.arange(g, dtype=np.int64), r)
    rows = np.tile(np.arange(r, dtype=np.int64), g)
    return kept_sets, pruned_sets, groups, rows


def solve_exact(damped: Array, cross: Array, mask: Array, factors: Factors | None = None) -> Array:
    """Per output row, the damped least squares restricted to its kept inputs.

    ``damped`` (g, D, D) is ``H + λI``, ``cross`` (g, D, r) is ``X̂ᵀY``, ``mask`` (g, D, r)
    the kept entries. Returns ``W`` (g, D, r), exactly zero where ``mask`` is False.
    ``factors`` (of the same ``damped`` and ``cross``) shares the inverse between calls.
    """
    factors = factors if factors is not None else Factors(damped, cross)
    g, d, r = mask.shape
    out = np.zeros((g, d, r))
    kept_sets, pruned_sets, groups, rows = _row_systems(mask)
    kept_size = np.array([len(s) for s in kept_sets], dtype=np.int64)
    pruned_size = d - kept_size
    use_kept = kept_size <= pruned_size

    # Kept form: solve H[S, S] w_S = G[S, j].
    systems = np.flatnonzero(use_kept)
    if systems.size:
        order = systems[np.argsort(kept_size[systems], kind="stable")]
        sizes = kept_size[order]
        per = 8.0 * (np.maximum(sizes, 1) ** 2 + 2 * np.maximum(sizes, 1))
        for start, stop in _chunks(sizes, per):
            chosen, idx, valid = _padded(kept_sets, order, start, stop)
            gs, js = groups[chosen], rows[chosen]
            a = damped[gs[:, None, None], idx[:, :, None], idx[:, None, :]]
            b = cross[gs[:, None], idx, js[:, None]]
            x = _solve_padded(a, b, valid)
            cg = np.broadcast_to(gs[:, None], idx.shape)[valid]
            cj = np.broadcast_to(js[:, None], idx.shape)[valid]
            out[cg, idx[valid], cj] = x[valid]

    # Pruned form: w = w* - Hinv[:, P] (Hinv[P, P])⁻¹ w*[P], w* = Hinv G.
    systems = np.flatnonzero(~use_kept)
    if systems.size:
        inverse = factors.inverse
        free = factors.free  # (g, D, r)
        order = systems[np.argsort(pruned_size[systems], kind="stable")]
        sizes = pruned_size[order]
        per = 8.0 * (np.maximum(sizes, 1) ** 2 + (d + 2) * np.maximum(sizes, 1) + d)
        columns = np.arange(d)
        for start, stop in _chunks(sizes, per):
            chosen, idx, valid = _padded(pruned_sets, order, start, stop)
            gs, js = groups[chosen], rows[chosen]
            a = inverse[gs[:, None, None], idx[:, :, None], idx[:, None, :]]
            b = free[gs[:, None], idx, js[:, None]]
            z = _solve_padded(a, b, valid)
            side = inverse[gs[:, None, None], columns[None, :, None], idx[:, None, :]]
            w = free[gs, :, js] - np.einsum("cdm,cm->cd", side, z)
            out[gs, :, js] = w
    out[~mask] = 0.0
    return out


def _sweep_block(w: Array, block: Array, upper: Array, i1: int, i2: int, keep: Array) -> None:
    """One SparseGPT block, in place: columns ``i1:i2`` of ``w`` (r, d) eliminated in order
    with the upper Cholesky factor of the inverse Hessian, the entries where ``keep`` (r,
    i2 - i1) is False set to zero and their error spread over the block's later columns,
    then the block's errors applied to the columns after it at once (the lazy update)."""
    errors = np.zeros((w.shape[0], i2 - i1))
    hinv = upper[i1:i2, i1:i2]
    for i in range(i2 - i1):
        column = block[:, i]
        quantised = np.where(keep[:, i], column, 0.0)
        err = (column - quantised) / hinv[i, i]
        block[:, i:] -= np.outer(err, hinv[i, i:])
        block[:, i] = quantised
        errors[:, i] = err
    w[:, i1:i2] = block
    if i2 < w.shape[1]:
        w[:, i2:] -= errors @ upper[i1:i2, i2:]


def solve_sparsegpt(
    damped: Array,
    cross: Array,
    mask: Array,
    block_size: int = BLOCK_SIZE,
    factors: Factors | None = None,
) -> Array:
    """SparseGPT's blockwise OBS reconstruction with a fixed mask (see the module doc).

    Same arguments and result as :func:`solve_exact`. Raises ``np.linalg.LinAlgError``
    when the damped Hessian is not positive definite.
    """
    factors = factors if factors is not None else Factors(damped, cross)
    g, d, r = mask.shape
    out = np.zeros((g, d, r))
    for k in range(g):
        upper = factors.upper(k)  # inverse = upperᵀ upper
        w = np.ascontiguousarray(factors.free[k].T)  # (r, d): one row per output row
        keep = mask[k].T
        for i1 in range(0, d, block_size):
            i2 = min(i1 + block_size, d)
            block = w[:, i1:i2].copy()
            _sweep_block(w, block, upper, i1, i2, keep[:, i1:i2])
        out[k] = w.T
    out[~mask] = 0.0
    return out


def block_quotas(eligible: Array, count: int) -> Array:
    """Split ``count`` over units holding ``eligible`` candidates each, proportionally to
    ``eligible``, by largest remainder (equal remainders: the lower index first). Exact
    integer arithmetic; every quota is at most its unit's ``eligible``."""
    eligible = np.asarray(eligible, dtype=np.int64)
    total = int(eligible.sum())
    if not 0 <= count <= total:
        raise ValueError(f"cannot choose {count} of {total} entries")
    if total == 0:
        return np.zeros_like(eligible)
    scaled = eligible * count
    quotas = scaled // total
    remainders = scaled - quotas * total
    left = count - int(quotas.sum())
    order = np.lexsort((np.arange(len(eligible)), -remainders))
    quotas[order[:left]] += 1
    return quotas


def solve_sparsegpt_select(
    damped: Array,
    dense_eff: Array,
    count: int,
    *,
    cross: Array | None = None,
    prunable: Array | None = None,
    block_size: int = BLOCK_SIZE,
    factors: Factors | None = None,
) -> tuple[Array, Array]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): choose the mask AND update the
    kept weights in one blockwise OBS sweep.

    ``damped`` (g, D, D) is ``H + λI``; ``dense_eff`` (g, D, r) the dense weight in the
    effective layout (with the bias row last when a bias is refit); ``count`` the number of
    entries to zero in total over all groups. ``prunable`` (D,) marks the rows that may be
    pruned (False for a bias row: never pruned, only updated); default all.

    The sweep starts from ``(H + λI)⁻¹ cross`` when ``cross`` is given (reconstruct
    passes ``G + λ W``: the optimum of ``|X̂ W' - Y|² + λ|W' - W|²``, which is W itself
    on dense statistics and compensates upstream error on sequential ones), else from
    ``dense_eff`` itself (the reference implementation).
    Inputs are processed in blocks of ``block_size`` columns with lazy batch updates, using
    the upper Cholesky factor U of ``(H + λI)⁻¹``. At the start of each block the entries
    to prune are those of least OBS saliency ``w² / U_jj²`` over the whole block (all
    output rows x block columns, the weights as updated so far; equal saliencies: the lower
    (input, row) index first). Entries that are zero in ``dense_eff`` are pruned first and
    stay zero; the rest of ``count`` is split over the (group, block) units proportionally
    to their nonzero prunable entries (= to block size when the dense weight has no zeros)
    by :func:`block_quotas`, so the total is exactly ``count``.

    Returns ``(weight, keep)``, both (g, D, r); ``weight`` is exactly 0 where ``keep`` is
    False. Raises ``ValueError`` when ``count`` is below the dense zeros or above the
    prunable entries, ``np.linalg.LinAlgError`` when ``damped`` is not positive definite.
    """
    # ~65 lines only because the docstring states the algorithm; the body is ~30.
    g, d, r = dense_eff.shape
    if factors is None:
        factors = Factors(damped, cross if cross is not None else np.zeros((g, d, r)))
    start = factors.inverse @ cross if cross is not None else dense_eff.astype(np.float64)
    rows_ok = np.ones(d, dtype=bool) if prunable is None else np.asarray(prunable, dtype=bool)
    allowed = np.broadcast_to(rows_ok[None, :, None], (g, d, r))
    zero = allowed & (dense_eff == 0)
    eligible = allowed & ~zero
    units = [(k, i1, min(i1 + block_size, d)) for k in range(g) for i1 in range(0, d, block_size)]
    counts = [int(eligible[k, i1:i2].sum()) for k, i1, i2 in units]
    quotas = block_quotas(np.array(counts, dtype=np.int64), count - int(zero.sum()))
    keep = np.ones((g, d, r), dtype=bool)
    out = np.zeros((g, d, r))
    unit = 0
    for k in range(g):
        upper = factors.upper(k)  # inverse = upperᵀ upper
        diagonal = np.diag(upper)
        w = np.ascontiguousarray(start[k].T)  # (r, D): one row per output row
        for i1 in range(0, d, block_size):
            i2 = min(i1 + block_size, d)
            quota = int(quotas[unit])
            unit += 1
            block = w[:, i1:i2].copy()
            prune = _least_salient(block, diagonal[i1:i2], eligible[k, i1:i2], quota)
            prune |= zero[k, i1:i2]
            keep[k, i1:i2] = ~prune
            _sweep_block(w, block, upper, i1, i2, ~prune.T)
        out[k] = w.T
    out[~keep] = 0.0
    return out, keep


def _least_salient(block: Array, diagonal: Array, eligible: Array, quota: int) -> Array:
    """The ``quota`` entries of ``eligible`` (block columns x rows, the effective layout's
    (input, row) order) of least OBS saliency ``w² / U_jj²`` in ``block`` (r, columns);
    equal saliencies: the lower (input, row) index first."""
    saliency = (block / diagonal).T ** 2
    candidates = np.flatnonzero(eligible)
    order = np.argsort(saliency.reshape(-1)[candidates], kind="stable")
    prune = np.zeros(eligible.shape, dtype=bool)
    prune.reshape(-1)[candidates[order[:quota]]] = True
    return prune


def choose_solver(mask: Array) -> str:
    """The ``auto`` rule (see the module doc) for a ``(g, D, r)`` keep-mask."""
    cost = exact_cost(mask)
    if cost <= EXACT_MAX_FLOPS or cost <= EXACT_FLOP_FACTOR * sparsegpt_cost(mask):
        return "exact"
    return "sparsegpt"
