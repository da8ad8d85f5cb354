"""Multiply-accumulates (MACs) per weight, for the ``--budget flops`` budget (which counts
MACs: one multiply and one add per weight per position).

Every weight of a layer takes part in the same number of multiply-accumulates per sample:
the output positions of a Conv, the input positions of a ConvTranspose, the rows of the
activation of a Gemm or MatMul. These counts come from shape inference with the
calibration shapes (batch 1), summed over every node that uses the weight.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.cut import with_outputs
from rdprune_onnx.graph.layers import Layer
from rdprune_onnx.graph.types import static_model
from rdprune_onnx.graph.walk import node_label
from rdprune_onnx.runtime import Session

log = logging.getLogger(__name__)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    """Fully known shapes of the graph's tensors (None where a dimension is unknown)."""
    out: dict[str, tuple[int, ...] | None] = {}
    graph = model.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = value.type.tensor_type
        if not t.HasField("shape"):
            out[value.name] = None
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        out[value.name] = None if any(d <= 0 for d in dims) else dims
    for init in graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _measured_shapes(
    typed: onnx.ModelProto, names: Sequence[str], sample: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """Shapes of intermediate tensors, from one run of ONNX Runtime on one sample."""
    known = {v.name for v in typed.graph.value_info if v.type.tensor_type.elem_type}
    wanted = [n for n in names if n in known]
    if not wanted:
        return {}
    values = Session(with_outputs(typed, wanted)).run(sample, wanted)
    return {n: tuple(v.shape) for n, v in zip(wanted, values, strict=True)}


def macs_per_weight(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    sample: Mapping[str, np.ndarray],
) -> dict[str, int]:
    """Multiply-accumulates each weight of each layer performs per sample.

    ``sample`` is one calibration sample per input, with its sample axis (length 1).
    """
    sample_shapes = {k: tuple(v.shape[1:]) for k, v in sample.items() if v.ndim}
    typed = static_model(model, sample_shapes)
    shapes = _shapes(typed)
    nodes = {node_label(n, i): n for i, n in enumerate(typed.graph.node)}
    unknown = [
        name
        for layer in layers
        for use in layer.uses
        if not use.graph and use.node in nodes
        for name in (*nodes[use.node].input[:2], nodes[use.node].output[0])
        if name and shapes.get(name) is None
    ]
    if unknown:
        shapes.update(_measured_shapes(typed, list(dict.fromkeys(unknown)), sample))
    costs: dict[str, int] = {}
    for layer in layers:
        total = 0
        for use in layer.uses:
            node = nodes.get(use.node)
            if use.graph or node is None:
                log.warning("%s: used inside a subgraph; counting one pass", layer.name)
                total += 1
                continue
            total += _use_macs(node, use.input_index, shapes, layer.name)
        costs[layer.name] = max(1, total)
    return costs


def _need(shape: tuple[int, ...] | None, tensor: str, layer: str) -> tuple[int, ...]:
    if shape is None:
        raise UserError(
            f"cannot infer the shape of {tensor!r} (used with layer {layer!r}) for a FLOPs budget",
            "give static shapes with --input-shape, or use --budget params",
        )
    return shape


def _use_macs(
    node: onnx.NodeProto,
    weight_index: int,
    shapes: Mapping[str, tuple[int, ...] | None],
    layer: str,
) -> int:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        out = _need(shapes.get(node.output[0]), node.output[0], layer)
        return int(np.prod(out[2:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        x = _need(shapes.get(node.input[0]), node.input[0], layer)
        return int(np.prod(x[2:], dtype=np.int64))
    other = node.input[1 - weight_index]
    x = _need(shapes.get(other), other, layer)
    if node.op_type == "Gemm":
        trans = attrs.get("transA" if weight_index == 1 else "transB", 0)
        # Rows of A (weight on the right) or columns of B (weight on the left).
        if weight_index == 1:
            return int(x[1] if trans else x[0])
        return int(x[0] if trans else x[1])
    # MatMul: x @ W repeats W for every row of x; W @ x for every column of x.
    if weight_index == 1:
        return int(np.prod(x[:-1], dtype=np.int64)) if len(x) > 1 else 1
    return int(np.prod(x, dtype=np.int64) // x[-2]) if len(x) > 1 else 1
