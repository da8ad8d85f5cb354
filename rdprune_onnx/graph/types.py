"""Facts about a graph's value types: the inferred-type copy, the name -> type map, element
sizes, and a copy with static input shapes."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from rdprune_onnx.graph.load import data_bytes

log = logging.getLogger(__name__)


def infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value types (needed to cut it); unchanged if inference fails."""
    try:
        if data_bytes(model, in_memory=True) < 2**31 - 1:  # tensors on disk are not in it
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # inference is best effort: fall back to whole-model runs
        log.info("shape inference failed (%s); measuring on the whole model", exc)
    return model


def value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every typed tensor of the main graph by name: value_info, then the graph inputs,
    then the graph outputs (a later entry wins for a name listed twice)."""
    graph = model.graph
    types = {v.name: v for v in graph.value_info}
    types.update({v.name: v for v in graph.input})
    types.update({v.name: v for v in graph.output})
    return types


def elem_bytes(value: onnx.ValueInfoProto) -> int:
    """Bytes per element of a tensor value (8 for an element type numpy has no match for)."""
    try:
        kind = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        return int(np.dtype(kind).itemsize)
    except Exception:  # an element type without a numpy equivalent
        return 8


def static_model(
    model: onnx.ModelProto, sample_shapes: Mapping[str, tuple[int, ...]]
) -> onnx.ModelProto:
    """A shape-inferred copy of ``model`` whose graph inputs have the static shapes of one
    sample (``sample_shapes``: the shape without the sample axis; a batch axis of the input
    becomes 1)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name not in sample_shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        shape = sample_shapes[value.name]
        full = (1, *shape) if len(dims) == len(shape) + 1 else shape
        for dim, size in zip(dims, full, strict=False):
            dim.Clear()
            dim.dim_value = int(size)
    return onnx.shape_inference.infer_shapes(fixed, data_prop=True)
