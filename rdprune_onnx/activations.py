"""Layer input statistics for data-aware masks (``--mask wanda``), from ONNX Runtime runs.

For every prunable layer, the L2 norm over the calibration data of each input feature the
weight multiplies, laid out like the weight (:class:`rdprune_onnx.masks.LayerStats`):

- MatMul ``x @ W`` (W of shape (..., K, N)): feature k is x's last axis, the norm is over
  every other axis of x (batch, sequence, ...; activations of any rank), per batch matrix
  of a batched W; output rows are W's columns. MatMul ``W @ x``: feature k is x's
  second-to-last axis, output rows are W's rows.
- Gemm (either operand constant, transA/transB): the feature axis of the other operand;
  the norm is scaled by |alpha| (the weight's effective value is alpha W).
- Conv (any group, depthwise included): the norm per input channel over the batch and all
  spatial positions; the entry W[o, c, ...] reads channel ``group(o) * C/group + c``; output
  rows are output channels. ConvTranspose: the input channel is W's axis 0, the output
  channel of W[c, o, ...] is ``group(c) * O/group + o``.
- A weight used by several nodes combines the norms of its uses: the root of the sum of
  their squares (rows are taken from its first use).

Padded token positions are not data: when the calibration data has an ``*attention_mask``
input (0/1, (samples, seq)), positions where it is 0 are left out of the norms of every
activation laid out as (samples, seq, ..., features) or (samples * seq, features).

The layers' input tensors are added as outputs of the type-inferred model; one pass over
the calibration batches gives every layer's statistics at once (:func:`input_statistics`).
:func:`sequential_masks` masks the layers in graph order, each with statistics from the
model pruned so far. Weights used inside subgraphs (If/Loop bodies) get no statistics: the
caller masks them by magnitude (and says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from rdprune_onnx.calibration import batches
from rdprune_onnx.graph.cut import node_inputs, upstream
from rdprune_onnx.graph.layers import Layer, Use
from rdprune_onnx.graph.types import infer_types
from rdprune_onnx.graph.walk import constant_value, node_label
from rdprune_onnx.masks import LayerStats, MaskCriterion, apply_mask, get_mask
from rdprune_onnx.runtime import Session, SessionConfig

log = logging.getLogger(__name__)

# The squared norms of one use's input features, from one batch of its activation and the
# batch's real-token indicator (1 = real, 0 = padding; None when the model has none).
_Reducer = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
# Inputs whose name ends with this mark the real tokens (1) and the padding (0) of each row.
TOKEN_MASK_SUFFIX = "attention_mask"


@dataclass
class _Probe:
    """How one use of a weight turns its activation into squared feature norms."""

    activation: str  # the tensor multiplied by the weight
    reduce: _Reducer  # activation batch -> squared norms, broadcastable to the weight
    rows: np.ndarray  # output row id of every weight entry (broadcastable)


def _square(x: np.ndarray) -> np.ndarray:
    return np.square(np.asarray(x, dtype=np.float64))


def _real_tokens(sq: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
    """``sq`` (squared activations, features last) without the padded token positions:
    an activation (batch, seq, ...) or (batch * seq, features) lined up with the token mask
    (batch, seq) has its padded positions zeroed; any other shape is left as it is."""
    if tokens is None:
        return sq
    if sq.ndim >= 3 and sq.shape[:2] == tokens.shape:
        return sq * tokens.reshape(tokens.shape + (1,) * (sq.ndim - 2))
    if sq.ndim == 2 and sq.shape[0] == tokens.size and tokens.ndim == 2:
        return sq * tokens.reshape(-1, 1)
    return sq


def _aligned(x_batch: tuple[int, ...], w_batch: tuple[int, ...]) -> int:
    """How many of the trailing batch axes of x line up with W's batch axes."""
    return min(len(x_batch), len(w_batch))


def _matmul_reducer(shape: tuple[int, ...], weight_on_right: bool) -> _Reducer:
    """x @ W (feature = x's last axis) or W @ x (feature = x's second-to-last axis); batch
    axes of x that line up with W's batch axes are kept (summed where W's axis is 1)."""
    w_batch = shape[:-2]
    features = shape[-2] if weight_on_right else shape[-1]

    def reduce(x: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
        sq = _square(x)
        if weight_on_right:
            sq = _real_tokens(sq, tokens)
        if sq.ndim == 1:
            if sq.shape[0] != features:
                raise ValueError(f"activation of shape {x.shape} does not fit weight {shape}")
            layout = (features, 1) if weight_on_right else (1, features)
            return sq.reshape((1,) * len(w_batch) + layout)
        feature_axis = sq.ndim - 1 if weight_on_right else sq.ndim - 2
        other_axis = sq.ndim - 2 if weight_on_right else sq.ndim - 1
        if sq.shape[feature_axis] != features:
            raise ValueError(f"activation of shape {x.shape} does not fit weight {shape}")
        x_batch = sq.shape[:-2]
        keep = _aligned(x_batch, w_batch)
        lead = len(x_batch) - keep
        summed = sq.sum(axis=(*range(lead), other_axis), keepdims=True)
        summed = summed.reshape(summed.shape[lead:])  # drop the leading (summed) axes
        # x's (..., 1, K) for x @ W, or (..., K, 1) for W @ x, into W's layout.
        summed = np.swapaxes(summed, -1, -2)
        kept_batch = summed.shape[:keep]
        w_kept = w_batch[len(w_batch) - keep :]
        collapse = tuple(i for i in range(keep) if w_kept[i] == 1 and kept_batch[i] != 1)
        if collapse:
            summed = summed.sum(axis=collapse, keepdims=True)
        return summed.reshape((1,) * (len(w_batch) - keep) + summed.shape)

    return reduce


def _matmul_rows(shape: tuple[int, ...], weight_on_right: bool) -> np.ndarray:
    batch = shape[:-2]
    outputs = shape[-1] if weight_on_right else shape[-2]
    ids = np.arange(int(np.prod(batch, dtype=np.int64)) * outputs)
    layout = (1, outputs) if weight_on_right else (outputs, 1)
    return ids.reshape(batch + layout)


def _conv_probe(node: onnx.NodeProto, use: Use, shape: tuple[int, ...]) -> _Probe:
    group = int(use.attributes.get("group", 1))  # type: ignore[call-overload]
    spatial = (1,) * (len(shape) - 2)
    transpose = use.op_type == "ConvTranspose"
    first, second = shape[0], shape[1]
    if group < 1 or first % group:
        raise ValueError(f"weight {shape} does not fit group={group}")
    if transpose:
        channels = first  # input channels on axis 0
        out_per_group = second
        in_per_group = first // group
        group_of = np.arange(first) // in_per_group
        rows = (group_of[:, None] * out_per_group + np.arange(second)[None, :]).reshape(
            (first, second, *spatial)
        )
    else:
        channels = second * group
        out_per_group = first // group
        group_of = np.arange(first) // out_per_group
        index = group_of[:, None] * second + np.arange(second)[None, :]  # (O, C/g)
        rows = np.arange(first).reshape((first, 1, *spatial))

    def reduce(x: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
        if x.ndim < 2 or x.shape[1] != channels:
            raise ValueError(f"activation of shape {x.shape} does not fit weight {shape}")
        sq = _square(x)
        per_channel = sq.sum(axis=tuple(i for i in range(sq.ndim) if i != 1))
        if transpose:
            return per_channel.reshape((first, 1, *spatial))
        return per_channel[index].reshape((first, second, *spatial))

    return _Probe(node.input[0], reduce, rows)


def _gemm_probe(node: onnx.NodeProto, use: Use, shape: tuple[int, ...]) -> _Probe:
    trans_a = bool(use.attributes.get("transA", 0))
    trans_b = bool(use.attributes.get("transB", 0))
    alpha2 = float(use.attributes.get("alpha", 1.0)) ** 2  # type: ignore[arg-type]
    if len(shape) != 2:
        raise ValueError(f"Gemm weight of rank {len(shape)}")
    if use.input_index == 1:  # Y = A' @ B': features on A' axis 1, rows = B' columns
        feature_axis = 0 if trans_a else 1
        k, outputs = (shape[1], shape[0]) if trans_b else shape
        norms_layout = (1, k) if trans_b else (k, 1)
        rows = np.arange(outputs).reshape((outputs, 1) if trans_b else (1, outputs))
    else:  # weight A: features on B' axis 0, rows = A' rows
        feature_axis = 1 if trans_b else 0
        outputs, k = (shape[1], shape[0]) if trans_a else shape
        norms_layout = (k, 1) if trans_a else (1, k)
        rows = np.arange(outputs).reshape((1, outputs) if trans_a else (outputs, 1))

    def reduce(x: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
        if x.ndim != 2 or x.shape[feature_axis] != k:
            raise ValueError(f"activation of shape {x.shape} does not fit Gemm weight {shape}")
        sq = _square(x)
        if feature_axis == 1:
            sq = _real_tokens(sq, tokens)
        sq = sq.sum(axis=1 - feature_axis)
        return (sq * alpha2).reshape(norms_layout)

    return _Probe(node.input[1 - use.input_index], reduce, rows)


def _probe(node: onnx.NodeProto, use: Use, shape: tuple[int, ...]) -> _Probe:
    if use.op_type in ("Conv", "ConvTranspose"):
        return _conv_probe(node, use, shape)
    if use.op_type == "Gemm":
        return _gemm_probe(node, use, shape)
    on_right = use.input_index == 1
    return _Probe(
        node.input[0 if on_right else 1],
        _matmul_reducer(shape, on_right),
        _matmul_rows(shape, on_right),
    )


def _main_nodes(model: onnx.ModelProto) -> dict[str, tuple[int, onnx.NodeProto]]:
    """Main-graph nodes by the label layer discovery gives them (name or ``op#index``)."""
    return {node_label(node, i): (i, node) for i, node in enumerate(model.graph.node)}


def plan_probes(
    model: onnx.ModelProto, layers: Sequence[Layer]
) -> tuple[dict[str, list[_Probe]], dict[str, str]]:
    """Each layer's probes, and the layers that get no statistics (with the reason)."""
    nodes = _main_nodes(model)
    probes: dict[str, list[_Probe]] = {}
    missing: dict[str, str] = {}
    for layer in layers:
        if layer.in_subgraph:
            missing[layer.name] = "used inside a subgraph"
            continue
        found = []
        for use in layer.uses:
            entry = nodes.get(use.node)
            if entry is None:
                missing[layer.name] = f"node {use.node!r} not found"
                break
            found.append(_probe(entry[1], use, layer.shape))
        else:
            probes[layer.name] = found
    return probes, missing


def token_mask(data: Mapping[str, np.ndarray]) -> str | None:
    """The input that marks real tokens and padding (``*attention_mask``: integer or
    boolean, (samples, seq), values 0/1), whose padded positions the statistics skip."""
    for name, array in data.items():
        if (
            name.endswith(TOKEN_MASK_SUFFIX)
            and array.ndim == 2
            and (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_)
            and np.isin(array, (0, 1)).all()
        ):
            return name
    return None


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if constant_value(node) is not None:
            names.add(node.output[0])
    return names


def _collect(
    typed: onnx.ModelProto,
    probes: Mapping[str, list[_Probe]],
    data: Mapping[str, np.ndarray],
    batch_size: int,
    config: SessionConfig,
    weights: Mapping[str, np.ndarray] | None,
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, LayerStats]:
    """One pass over the calibration data for the given layers' statistics."""
    inputs = set(data)
    wanted = [p.activation for ps in probes.values() for p in ps]
    computed = [n for n in dict.fromkeys(wanted) if n not in inputs]
    session = None
    if computed:
        fetch = upstream(typed, computed)
        kept = _constants(fetch)
        replaced = {k: v for k, v in (weights or {}).items() if k in kept}
        session = Session(fetch, config, weights=replaced or None)
    sums: dict[str, list[np.ndarray | None]] = {n: [None] * len(ps) for n, ps in probes.items()}
    mask_name = token_mask(data)
    for feeds in batches(data, batch_size):
        values = {n: feeds[n] for n in wanted if n in inputs}
        if session is not None:
            needed = {n: v for n, v in feeds.items() if n in session.input_names}
            got = session.run(needed, computed)
            values.update(zip(computed, got, strict=True))
        tokens = None if mask_name is None else (feeds[mask_name] != 0).astype(np.float64)
        for name, layer_probes in probes.items():
            for i, probe in enumerate(layer_probes):
                part = probe.reduce(values[probe.activation], tokens)
                current = sums[name][i]
                sums[name][i] = part if current is None else current + part
    if session is not None:
        session.close()
    stats: dict[str, LayerStats] = {}
    for name, layer_probes in probes.items():
        total: np.ndarray = np.zeros((1,) * len(shapes[name]))
        for summed in sums[name]:
            if summed is not None:
                total = total + summed
        stats[name] = LayerStats(norms=np.sqrt(total), rows=layer_probes[0].rows)
    return stats


@dataclass
class Statistics:
    """Layer statistics for a mask, and the layers that have none (masked by magnitude)."""

    layers: dict[str, LayerStats]
    missing: dict[str, str]

    def warn_missing(self) -> None:
        if self.missing:
            first = next(iter(self.missing.items()))
            log.warning(
                "%d layer(s) get no input statistics and are masked by magnitude, e.g. %s (%s)",
                len(self.missing),
                *first,
            )


def input_statistics(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    data: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    config: SessionConfig,
    weights: Mapping[str, np.ndarray] | None = None,
) -> Statistics:
    """Every layer's input feature norms from one pass of ``model`` over ``data``.

    ``weights`` replaces named constants for the pass (statistics of a partly pruned
    model) without building a copy of the model.
    """
    probes, missing = plan_probes(model, layers)
    shapes = {layer.name: layer.shape for layer in layers}
    typed = infer_types(model)
    _log_tokens(data)
    found = _collect(typed, probes, data, batch_size, config, weights, shapes) if probes else {}
    return Statistics(found, missing)


def _log_tokens(data: Mapping[str, np.ndarray]) -> None:
    name = token_mask(data)
    if name is not None:
        array = data[name]
        log.info(
            "mask statistics count %d real token positions of %d (padding in %r skipped)",
            int(np.count_nonzero(array)),
            array.size,
            name,
        )


def _waves(
    model: onnx.ModelProto, layers: Sequence[Layer], probes: Mapping[str, list[_Probe]]
) -> list[list[str]]:
    """Layers grouped by how many measured layers lie upstream of their inputs.

    A layer's wave is the largest number of prunable layers on a path from the graph
    inputs to any of its activations; layers of one wave see only inputs computed by
    layers of earlier waves, so one pass per wave gives them all their statistics.
    """
    labels = {use.node for layer in layers if layer.name in probes for use in layer.uses}
    depth: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        reads = node_inputs(node)
        level = max((depth.get(n, 0) for n in reads), default=0)
        if node_label(node, index) in labels:
            level += 1
        for out in node.output:
            if out:
                depth[out] = level
    waves: dict[int, list[str]] = {}
    for name, layer_probes in probes.items():
        wave = max(depth.get(p.activation, 0) for p in layer_probes)
        waves.setdefault(wave, []).append(name)
    return [waves[k] for k in sorted(waves)]


def sequential_masks(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    weights: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    data: Mapping[str, np.ndarray],
    *,
    mask: str,
    batch_size: int,
    config: SessionConfig,
) -> tuple[dict[str, np.ndarray], Statistics]:
    """Mask every layer at ``counts`` with statistics from the model pruned so far.

    Layers go in waves (see :func:`_waves`); each wave's statistics come from one pass of
    ``model`` with every earlier wave's layers already masked (``weights`` holds the layers'
    current values, e.g. the partly pruned ones of an earlier iterative step). Layers
    without statistics are masked by magnitude.
    """
    criterion: MaskCriterion = get_mask(mask)
    probes, missing = plan_probes(model, layers)
    shapes = {layer.name: layer.shape for layer in layers}
    typed = infer_types(model)
    _log_tokens(data)
    pruned: dict[str, np.ndarray] = {}
    found: dict[str, LayerStats] = {}
    waves = _waves(typed, layers, probes)
    for wave in waves:
        upstream = {**weights, **pruned}
        wave_probes = {name: probes[name] for name in wave}
        stats = _collect(typed, wave_probes, data, batch_size, config, upstream, shapes)
        for name in wave:
            weight = weights[name]
            order = criterion.order(weight, stats[name])
            pruned[name] = apply_mask(weight, int(counts[name]), order)
        found.update(stats)
    for name in missing:
        pruned[name] = apply_mask(weights[name], int(counts[name]))
    log.info("sequential mask statistics: %d pass(es) over the calibration data", len(waves))
    return pruned, Statistics(found, missing)


def passes(model: onnx.ModelProto, layers: Sequence[Layer]) -> int:
    """Passes :func:`sequential_masks` makes over the calibration data."""
    probes, _missing = plan_probes(model, layers)
    return len(_waves(model, layers, probes)) if probes else 0


__all__ = [
    "Statistics",
    "input_statistics",
    "passes",
    "plan_probes",
    "sequential_masks",
]
