"""Cutting a graph below a layer: the part that a change of one weight can affect.

When only one layer's weight changes, everything upstream of it computes the same values
as in the dense model. :func:`downstream` builds a model of the nodes that depend on the
weight, fed by the tensors that cross from the unchanged upstream part (activations, skip
connections, inputs used again later). Running the dense model once with those crossing
tensors as extra outputs, then only the downstream model for each candidate weight, gives
the same outputs as running the whole model for each candidate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import helper

from rdprune_onnx.graph.walk import subgraphs


@dataclass
class Cut:
    model: onnx.ModelProto  # inputs: the crossing tensors and the weight
    crossing: list[str]  # tensors computed upstream (or graph inputs) that it needs
    outputs: list[str]  # the original graph outputs that depend on the weight


def _subgraph_references(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    names: set[str] = set()
    for graph in subgraphs(node):
        defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        for inner in graph.node:
            defined.update(inner.output)
        for inner in graph.node:
            used = set(inner.input) | _subgraph_references(inner)
            names.update(n for n in used if n and n not in defined)
    return names


def node_inputs(node: onnx.NodeProto) -> set[str]:
    return {n for n in node.input if n} | _subgraph_references(node)


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    types = {v.name: v for v in graph.value_info}
    types.update({v.name: v for v in graph.input})
    types.update({v.name: v for v in graph.output})
    return types


def downstream(model: onnx.ModelProto, weight: str) -> Cut | None:
    """The part of ``model`` that depends on the graph input ``weight``.

    ``model`` should be shape-inferred (crossing tensors need types) and have the weight
    exposed as a graph input (:func:`rdprune_onnx.graph.surgery.expose_as_inputs`).

    Returns None when the cut cannot be made (the weight is used inside a subgraph, or a
    crossing tensor has no known type); the caller then runs the whole model instead.
    """
    graph = model.graph
    nodes = list(graph.node)
    initializers = {t.name for t in graph.initializer}
    affected: set[str] = {weight}
    selected: list[bool] = []
    for node in nodes:
        inputs = node_inputs(node)
        if weight in _subgraph_references(node):
            return None
        hit = bool(inputs & affected)
        selected.append(hit)
        if hit:
            affected.update(o for o in node.output if o)
    if not any(selected):
        return None
    # Constant-only producers (Constant nodes, shape arithmetic on initializers) that the
    # selected nodes read are copied in rather than crossing the cut.
    constant: set[str] = set(initializers)
    constant_nodes: list[bool] = []
    for node in nodes:
        is_const = node.op_type != "If" and all(n in constant for n in node_inputs(node))
        constant_nodes.append(is_const)
        if is_const:
            constant.update(o for o in node.output if o)
    needed: set[str] = set()
    for node, hit in zip(nodes, selected, strict=True):
        if hit:
            needed |= node_inputs(node)
    keep = list(selected)
    changed = True
    while changed:  # pull in the constant producers of anything needed
        changed = False
        for i, node in enumerate(nodes):
            if not keep[i] and constant_nodes[i] and any(o in needed for o in node.output):
                keep[i] = True
                needed |= node_inputs(node)
                changed = True
    produced: set[str] = set()
    for node, kept in zip(nodes, keep, strict=True):
        if kept:
            produced.update(node.output)
    crossing = sorted(n for n in needed if n not in produced and n not in initializers)
    crossing = [n for n in crossing if n != weight]
    types = _value_types(model)
    if weight not in types or any(
        n not in types or not types[n].type.tensor_type.elem_type for n in crossing
    ):
        return None
    outputs = [o.name for o in graph.output if o.name in affected]
    sub = helper.make_graph(
        [node for node, kept in zip(nodes, keep, strict=True) if kept],
        graph.name + "_downstream",
        [types[n] for n in crossing] + [types[weight]],
        [o for o in graph.output if o.name in affected],
        [t for t in graph.initializer if t.name in needed and t.name != weight],
        value_info=[v for v in graph.value_info if v.name in produced],
    )
    out = helper.make_model(sub, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    for func in model.functions:
        out.functions.append(func)
    return Cut(out, crossing, outputs)


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of a shape-inferred ``model`` that also outputs the named tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = _value_types(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(types[name])
    return out
