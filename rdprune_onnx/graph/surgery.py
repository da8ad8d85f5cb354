"""Graph surgery on weights: replace their values, or turn them into graph inputs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rdprune_onnx.graph.walk import constant_value, iter_graphs


def _tensor_slots(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every named constant tensor (initializers, Constant values) in all scopes."""
    slots: dict[str, onnx.TensorProto] = {}
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            tensor = constant_value(node)
            if tensor is not None:
                slots[node.output[0]] = tensor
        for init in graph.initializer:
            slots[init.name] = init
    return slots


def replace_weights(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the named constant tensors replaced; nothing else changes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    slots = _tensor_slots(out)
    for name, array in weights.items():
        slot = slots[name]
        old_type = slot.data_type
        new = numpy_helper.from_array(np.ascontiguousarray(array), slot.name)
        if new.data_type != old_type or tuple(new.dims) != tuple(slot.dims):
            raise ValueError(f"replacement for {name} changes its type or shape")
        slot.Clear()
        slot.CopyFrom(new)
    return out


def expose_as_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the named constants are graph inputs instead.

    The graph then computes the same function with the weight fed at run time, so one
    ONNX Runtime session can evaluate many candidate values of that weight.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names)
    existing_inputs = {i.name for i in out.graph.input}
    for graph in iter_graphs(out.graph):
        found = [(t.name, t.data_type, list(t.dims)) for t in graph.initializer if t.name in wanted]
        if found:
            keep_init = [t for t in graph.initializer if t.name not in wanted]
            del graph.initializer[:]
            graph.initializer.extend(keep_init)
        keep_nodes = []
        for node in graph.node:
            tensor = constant_value(node)
            if tensor is not None and node.output[0] in wanted:
                found.append((node.output[0], tensor.data_type, list(tensor.dims)))
                continue
            keep_nodes.append(node)
        if len(keep_nodes) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep_nodes)
        for name, data_type, dims in found:
            if name not in existing_inputs:
                out.graph.input.append(helper.make_tensor_value_info(name, data_type, dims))
                existing_inputs.add(name)
    return out
