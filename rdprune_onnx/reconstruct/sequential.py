"""The sequential refit: :func:`reconstruct` visits the layers in graph order and refits each
on the activations of the model pruned and refit so far (or on the dense model's, with
``inputs="dense"``), see :mod:`rdprune_onnx.reconstruct`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx
from tqdm import tqdm

from rdprune_onnx.calibration import batches, sample_count
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import Layer
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.graph.types import infer_types
from rdprune_onnx.memory import DEFAULT_MEMORY_BUDGET
from rdprune_onnx.reconstruct.layout import (
    Plan,
    RefitGraph,
    plan_layer,
    rows_key,
    target_rows,
    to_effective,
)
from rdprune_onnx.reconstruct.refit import (
    LayerRefit,
    LayerSolve,
    Refit,
    layer_factors,
    refit_layer,
    skipped,
)
from rdprune_onnx.reconstruct.solvers import DAMPING, check_solver
from rdprune_onnx.reconstruct.statistics import (
    Fetcher,
    Stats,
    Sums,
    add_rows,
    dense_stats,
    dense_sums,
    token_mask_name,
)
from rdprune_onnx.runtime import SessionConfig

log = logging.getLogger(__name__)

Array = np.ndarray

INPUTS = ("sequential", "dense")  # where the refit statistics come from (see reconstruct)


DENSE_CACHE_BYTES = DEFAULT_MEMORY_BUDGET  # keep all layers' dense targets within this (2 GiB)


@dataclass
class Reconstruction:
    # Refit weights (same dtype/shape as the originals; pruned positions exactly 0), for
    # every entry of ``pruned`` (layers not refit keep the given masked weight).
    weights: dict[str, Array]
    # Refit bias constants keyed by their tensor name (only where a bias exists).
    biases: dict[str, Array]
    layers: list[LayerRefit] = field(default_factory=list)

    def all_weights(self) -> dict[str, Array]:
        """Weights and biases together, as :func:`replace_weights` takes them."""
        return {**self.weights, **self.biases}


class _DenseTargets:
    """The dense model's outputs of the refit nodes, per calibration batch.

    When all of them fit in ``DENSE_CACHE_BYTES`` they come from one dense pass, kept for
    every layer; otherwise each group of layers runs the dense model up to its nodes again.
    """

    def __init__(self, ctx: _Context, names: Sequence[str]) -> None:
        self.cache: list[dict[str, Array]] | None = None
        feeds_names = set(ctx.data)
        first = next(batches(ctx.data, ctx.batch_size), None)
        if not names or first is None:
            return
        fetcher = Fetcher(ctx.typed, names, feeds_names, ctx.config)
        values = fetcher.run(first)
        count = -(-sample_count(ctx.data) // ctx.batch_size)
        size = sum(v.nbytes for k, v in values.items() if k not in feeds_names) * count
        if size > DENSE_CACHE_BYTES:
            log.info("dense targets take %.0f MiB: recomputed per layer", size / 2**20)
            return
        self.cache = [values] + [
            fetcher.run(feeds) for feeds in islice(batches(ctx.data, ctx.batch_size), 1, None)
        ]


def _graph_order(g: RefitGraph, layers: Sequence[Layer]) -> list[Layer]:
    def key(layer: Layer) -> int:
        positions = [g.position.get(u.node, len(g.nodes)) for u in layer.uses if not u.graph]
        return min(positions, default=len(g.nodes))

    return sorted(layers, key=key)


@dataclass
class _Context:
    """What every layer's refit needs."""

    typed: onnx.ModelProto  # the dense model, type-inferred
    graph: RefitGraph
    data: Mapping[str, Array]
    batch_size: int
    config: SessionConfig
    solver: str
    damping: float
    select: bool = False
    inputs: str = "sequential"
    token_mask: str | None = None  # the attention-mask input, if any (see real_rows)
    select_refits: bool = True


@dataclass
class _Todo:
    """A layer to refit, with its plans."""

    name: str
    index: int  # position in the report
    plans: list[Plan]
    masked: Array
    bias: Array | None  # the dense value of the bias refit with it
    dense: Array  # the dense weight

    @property
    def rows_key(self) -> tuple[object, ...] | None:
        """Layers with equal keys read the same activation rows (None: never grouped)."""
        if len(self.plans) != 1:
            return None
        return rows_key(self.plans[0])


def reconstruct(
    model: onnx.ModelProto,
    pruned: Mapping[str, Array],
    layers: Sequence[Layer],
    data: Mapping[str, Array],
    *,
    batch_size: int = 32,
    config: SessionConfig | None = None,
    solver: str = "auto",
    damping: float = DAMPING,
    refit_bias: bool = True,
    progress: bool = False,
    select: bool = False,
    inputs: str = "sequential",
    select_refits: bool = True,
) -> Reconstruction:
    """Refit the kept weights of ``layers`` after masking (see the module doc).

    ``model`` is the dense model; ``pruned`` maps weight names to their masked values
    (zeros = pruned); ``data`` holds the calibration inputs (first axis = samples). Layers
    are visited in graph order, each fed by the model whose upstream layers are already
    refit; consecutive layers reading the same activation (Q/K/V projections) share one
    pass over the data. Layers of ``layers`` missing from ``pruned`` are left dense and not
    reported; entries of ``pruned`` that are not refit are returned as given.

    ``select=True`` (SparseGPT): each layer keeps the NUMBER of zeros of ``pruned[name]``
    but the zeros are re-chosen, with the kept weights updated, by
    :func:`solve_sparsegpt_select` from the dense weight and the layer's Hessian. The
    result is kept only when its calibration error is below that of the given mask refit
    (else the given mask's result is kept and ``reason`` says so); the method reported is
    ``"sparsegpt-select"``. ``select_refits=False`` skips the two fixed-mask solves of
    :func:`select_refit` (SparseGPT's own weights, checked against plain masking only).

    ``inputs``: ``"sequential"`` (H and targets from the model pruned and refit so far,
    X̂) or ``"dense"`` (H from the dense model's activations X, in one pass for all layers;
    the targets follow from the dense weight, ``G = H W``).
    """
    # ~64 lines only because the docstring states every option; the body is ~35.
    ctx = _make_context(
        model, data, batch_size, config, solver, damping, select, inputs, select_refits
    )
    weights: dict[str, Array] = {name: np.asarray(w) for name, w in pruned.items()}
    biases: dict[str, Array] = {}
    ordered = [layer for layer in _graph_order(ctx.graph, layers) if layer.name in pruned]
    results: list[LayerRefit | None] = [None] * len(ordered)
    todo: list[_Todo] = []
    for index, layer in enumerate(ordered):
        prepared = _prepare(ctx, layer, weights[layer.name], refit_bias, index)
        if isinstance(prepared, LayerRefit):
            results[index] = prepared
        else:
            todo.append(prepared)
    with tqdm(
        total=len(ordered), disable=not progress, desc="refit", unit="layer", leave=False
    ) as bar:
        bar.update(len(ordered) - len(todo))
        for group, refits in _steps(ctx, todo, replace_weights(ctx.typed, weights)):
            for item, refit in zip(group, refits, strict=True):
                results[item.index] = refit.info
                _log(refit.info)
                fitted_weights, fitted_biases = _fitted(item, refit)
                weights.update(fitted_weights)
                biases.update(fitted_biases)
            bar.update(len(group))
    return Reconstruction(weights, biases, [r for r in results if r is not None])


def _make_context(
    model: onnx.ModelProto,
    data: Mapping[str, Array],
    batch_size: int,
    config: SessionConfig | None,
    solver: str,
    damping: float,
    select: bool,
    inputs: str,
    select_refits: bool,
) -> _Context:
    """The settings checked, the dense model typed and indexed, the padding input found."""
    check_solver(solver, damping)
    if inputs not in INPUTS:
        raise UserError(f"unknown refit inputs {inputs!r}", f"choose one of {', '.join(INPUTS)}")
    typed = infer_types(model)
    ctx = _Context(
        typed,
        RefitGraph(typed),
        data,
        batch_size,
        config or SessionConfig(),
        solver,
        damping,
        select,
        inputs,
        token_mask_name(data),
        select_refits,
    )
    if ctx.token_mask is not None:
        log.info("refit rows: padding excluded by the %r input", ctx.token_mask)
    return ctx


def _steps(
    ctx: _Context, todo: list[_Todo], current: onnx.ModelProto
) -> Iterator[tuple[list[_Todo], list[Refit]]]:
    """The refits of each group of layers, in graph order. Sequential inputs: each group's
    pass runs ``current``, the masked model with every group before it refit."""
    if ctx.inputs == "dense":
        yield from _refit_dense(ctx, list(_groups(todo)))
        return
    dense = _DenseTargets(ctx, [p.output for item in todo for p in item.plans])
    for group in _groups(todo):
        refits = _refit_group(ctx, group, current, dense)
        yield group, refits
        update: dict[str, Array] = {}
        for item, refit in zip(group, refits, strict=True):
            fitted_weights, fitted_biases = _fitted(item, refit)
            update.update(fitted_weights)
            update.update(fitted_biases)
        if update:
            current = replace_weights(current, update)


def _fitted(item: _Todo, refit: Refit) -> tuple[dict[str, Array], dict[str, Array]]:
    """The weight and the bias a layer's refit replaces (none when it kept the mask)."""
    if refit.weight is None:
        return {}, {}
    biases: dict[str, Array] = {}
    if refit.bias is not None and refit.info.bias is not None:
        biases[refit.info.bias] = refit.bias
    return {item.name: refit.weight}, biases


def _log(info: LayerRefit) -> None:
    log.info(
        "refit %s: %s, error %.4g -> %.4g (%.2f s)%s",
        info.name,
        info.method,
        info.error_before,
        info.error_after,
        info.seconds,
        f" [{info.reason}]" if info.reason else "",
    )


def _prepare(
    ctx: _Context, layer: Layer, masked: Array, refit_bias: bool, index: int
) -> _Todo | LayerRefit:
    found = ctx.graph.constant(layer.name)
    if found is None:
        return skipped(layer.name, "weight is not a constant of the main graph")
    dense = found[1]
    if masked.shape != dense.shape or masked.dtype != dense.dtype:
        raise UserError(
            f"pruned weight {layer.name!r} is {masked.dtype}{list(masked.shape)}, "
            f"the model's is {dense.dtype}{list(dense.shape)}",
            "pass the masked weights of this model",
        )
    if np.array_equal(masked, dense):
        return skipped(layer.name, "mask removes nothing; unchanged")
    plans = plan_layer(ctx.graph, layer, refit_bias)
    if isinstance(plans, str):
        return skipped(layer.name, plans)
    bias: Array | None = None
    if plans[0].bias is not None:
        found = ctx.graph.constant(plans[0].bias)
        assert found is not None
        bias = found[1]
    return _Todo(layer.name, index, plans, masked, bias, dense)


def _groups(todo: Sequence[_Todo]) -> Iterator[list[_Todo]]:
    """Runs of consecutive layers that read the same activation rows.

    Such layers are siblings (none feeds another's input), so their inputs are final
    before any of them is refit.
    """
    group: list[_Todo] = []
    for item in todo:
        if group and (item.rows_key is None or item.rows_key != group[0].rows_key):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _refit_group(
    ctx: _Context, group: list[_Todo], current: onnx.ModelProto, dense: _DenseTargets
) -> list[Refit]:
    started = time.perf_counter()
    plans = group[0].plans
    feeds_names = set(ctx.data)
    targets: Fetcher | None = None
    if dense.cache is None:
        outputs = [p.output for item in group for p in item.plans]
        targets = Fetcher(ctx.typed, outputs, feeds_names, ctx.config)
    inputs = Fetcher(current, [p.activation for p in plans], feeds_names, ctx.config)
    sums: Sums | None = None
    for b, feeds in enumerate(batches(ctx.data, ctx.batch_size)):
        if targets is not None:
            dense_out = targets.run(feeds)
        else:
            assert dense.cache is not None
            dense_out = dense.cache[b]
        current_in = inputs.run(feeds)
        token = feeds.get(ctx.token_mask) if ctx.token_mask is not None else None
        for k, plan in enumerate(plans):
            ys = [
                target_rows(item.plans[k], dense_out[item.plans[k].output], item.bias)
                for item in group
            ]
            sums = add_rows(sums, plan, current_in[plan.activation], ys, token)
    shared = (time.perf_counter() - started) / len(group)
    refits: list[Refit] = []
    for i, item in enumerate(group):
        solve_started = time.perf_counter()
        if sums is None:
            refit = Refit(skipped(item.name, "no calibration rows"))
        else:
            refit = _solve_layer(ctx, item, sums.stats(i, item.bias is not None))
        refit.info.seconds = shared + time.perf_counter() - solve_started
        refits.append(refit)
    return refits


def _refit_dense(
    ctx: _Context, groups: list[list[_Todo]]
) -> Iterator[tuple[list[_Todo], list[Refit]]]:
    """``inputs="dense"``: every group's Hessian from the dense model's activations, in one
    pass over the data for as many groups as fit in ``DENSE_CACHE_BYTES``."""
    chunk: list[list[_Todo]] = []
    used = 0
    for group in groups:
        g, d, _r = to_effective(group[0].masked, group[0].plans[0]).shape
        size = 8 * g * (d + 2) ** 2
        if chunk and used + size > DENSE_CACHE_BYTES:
            yield from _refit_dense_chunk(ctx, chunk)
            chunk, used = [], 0
        chunk.append(group)
        used += size
    if chunk:
        yield from _refit_dense_chunk(ctx, chunk)


def _refit_dense_chunk(
    ctx: _Context, chunk: list[list[_Todo]]
) -> Iterator[tuple[list[_Todo], list[Refit]]]:
    started = time.perf_counter()
    all_sums = dense_sums(
        ctx.typed,
        [group[0].plans for group in chunk],
        ctx.data,
        batch_size=ctx.batch_size,
        config=ctx.config,
        token_mask=ctx.token_mask,
    )
    shared = (time.perf_counter() - started) / sum(len(group) for group in chunk)
    for group, sums in zip(chunk, all_sums, strict=True):
        refits: list[Refit] = []
        for item in group:
            solve_started = time.perf_counter()
            if sums is None:
                refit = Refit(skipped(item.name, "no calibration rows"))
            else:
                stats = dense_stats(sums, item.dense, item.bias, item.plans[0])
                refit = _solve_layer(ctx, item, stats)
            refit.info.seconds = shared + time.perf_counter() - solve_started
            refits.append(refit)
        yield group, refits


def _solve_layer(ctx: _Context, item: _Todo, stats: Stats) -> Refit:
    factors = layer_factors(item.name, stats, item.bias is not None, ctx.damping)
    layer = LayerSolve(item.name, item.plans[0], item.dense, item.bias, stats, ctx.solver, factors)
    return refit_layer(layer, item.masked, select=ctx.select, refits=ctx.select_refits)
