"""Cutting a graph below a layer: the part that a change of some weights can affect.

:func:`upstream` is the other half: the part of a graph that computes some tensors (the
activations a statistic or a refit reads).

When only one layer's weight changes, everything upstream of it computes the same values
as in the dense model. :func:`downstream` builds a model of the nodes that depend on the
weight, fed by the tensors that cross from the unchanged upstream part (activations, skip
connections, inputs used again later). Running the dense model once with those crossing
tensors as extra outputs, then only the downstream model for each candidate weight, gives
the same outputs as running the whole model for each candidate.

The weights may be graph inputs already, or constants of the main graph (initializers or
``Constant`` nodes): the cut then takes them as inputs itself, so that the model need not
be copied first (:func:`rdprune_onnx.graph.surgery.expose_as_inputs` copies it whole).
Only the kept part of the graph is copied into the cut model, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import helper

from rdprune_onnx.graph.types import value_types
from rdprune_onnx.graph.walk import constant_value, subgraphs


@dataclass
class Cut:
    """The downstream part of a graph below some weights.

    ``model`` is None when the cut was planned without building it (``build=False``);
    :func:`build_cut` builds it.
    """

    model: onnx.ModelProto | None  # inputs: the crossing tensors, then the weights
    crossing: list[str]  # tensors computed upstream (or graph inputs) that it needs
    outputs: list[str]  # the original graph outputs that depend on the weights
    weights: list[str] = field(default_factory=list)  # the fed tensors, in input order
    keep: list[int] = field(default_factory=list)  # indices of the kept nodes


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
    """The tensors a node reads: its inputs and what its subgraphs read from outside."""
    return {n for n in node.input if n} | _subgraph_references(node)


def _weight_types(
    graph: onnx.GraphProto, weights: Sequence[str], types: dict[str, onnx.ValueInfoProto]
) -> dict[str, onnx.ValueInfoProto] | None:
    """The value types of the weights: graph inputs, initializers or Constant outputs."""
    found: dict[str, onnx.ValueInfoProto] = {}
    wanted = set(weights)
    inputs = {i.name for i in graph.input}
    for name in wanted & inputs:
        found[name] = types[name]
    for tensor in graph.initializer:
        if tensor.name in wanted and tensor.name not in found:
            found[tensor.name] = helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)
            )
    for node in graph.node:
        value = constant_value(node)
        if value is not None and node.output[0] in wanted and node.output[0] not in found:
            found[node.output[0]] = helper.make_tensor_value_info(
                node.output[0], value.data_type, list(value.dims)
            )
    if set(found) != wanted:
        return None
    return found


def _with_constant_producers(
    nodes: Sequence[onnx.NodeProto],
    selected: list[bool],
    constant: set[str],
    excluded: set[int],
) -> tuple[list[bool], set[str]]:
    """The selected nodes plus the constant-only producers (Constant nodes, shape
    arithmetic on initializers; not those in ``excluded``) of anything they read, which
    are copied into the cut rather than crossing it; and every tensor the kept nodes read.
    ``constant`` starts as the constant initializers' names."""
    constant = set(constant)
    constant_nodes: list[bool] = []
    for index, node in enumerate(nodes):
        is_const = (
            index not in excluded
            and node.op_type != "If"
            and all(n in constant for n in node_inputs(node))
        )
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
    return keep, needed


def downstream(
    model: onnx.ModelProto, weights: str | Sequence[str], *, build: bool = True
) -> Cut | None:
    """The part of ``model`` that depends on the tensors ``weights``.

    ``model`` should be shape-inferred (crossing tensors need types). Each weight is a graph
    input, an initializer or the output of a ``Constant`` node of the main graph; in the cut
    it is a graph input (after the crossing tensors), so candidates are fed at run time.
    ``build=False`` only plans the cut (crossing tensors, outputs, kept nodes) without
    copying anything; :func:`build_cut` builds it later.

    Returns None when the cut cannot be made (a weight is used inside a subgraph or is not a
    constant of the main graph, or a crossing tensor has no known type); the caller then
    runs the whole model instead.
    """
    names = [weights] if isinstance(weights, str) else list(dict.fromkeys(weights))
    wanted = set(names)
    graph = model.graph
    nodes = list(graph.node)
    initializers = {t.name for t in graph.initializer}
    affected: set[str] = set(wanted)
    selected: list[bool] = []
    producers: set[int] = set()  # Constant nodes that make a weight: dropped
    for index, node in enumerate(nodes):
        if wanted & _subgraph_references(node):
            return None
        if constant_value(node) is not None and node.output[0] in wanted:
            producers.add(index)
            selected.append(False)
            continue
        hit = bool(node_inputs(node) & affected)
        selected.append(hit)
        if hit:
            affected.update(o for o in node.output if o)
    if not any(selected):
        return None
    keep, needed = _with_constant_producers(nodes, selected, initializers - wanted, producers)
    produced: set[str] = set()
    for node, kept in zip(nodes, keep, strict=True):
        if kept:
            produced.update(node.output)
    crossing = sorted(
        n for n in needed if n not in produced and n not in initializers and n not in wanted
    )
    types = value_types(model)
    if _weight_types(graph, names, types) is None or any(
        n not in types or not types[n].type.tensor_type.elem_type for n in crossing
    ):
        return None
    outputs = [o.name for o in graph.output if o.name in affected]
    cut = Cut(None, crossing, outputs, names, [i for i, k in enumerate(keep) if k])
    if build:
        cut.model = build_cut(model, cut)
    return cut


def build_cut(model: onnx.ModelProto, cut: Cut) -> onnx.ModelProto:
    """The model of a planned cut; only the kept nodes and tensors are copied (once)."""
    graph = model.graph
    types = value_types(model)
    weight_types = _weight_types(graph, cut.weights, types)
    if weight_types is None:
        raise ValueError("the cut's weights are not in this model")
    nodes = graph.node
    kept = [nodes[i] for i in cut.keep]
    produced = {o for node in kept for o in node.output}
    needed = {n for node in kept for n in node_inputs(node)}
    fed = set(cut.weights)
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    sub = out.graph
    sub.name = graph.name + "_downstream"
    sub.node.extend(kept)
    sub.input.extend(types[n] for n in cut.crossing)
    sub.input.extend(weight_types[n] for n in cut.weights)
    sub.output.extend(o for o in graph.output if o.name in cut.outputs)
    sub.initializer.extend(t for t in graph.initializer if t.name in needed and t.name not in fed)
    sub.value_info.extend(
        v for v in graph.value_info if v.name in produced and v.name not in cut.outputs
    )
    return out


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of a shape-inferred ``model`` that also outputs the named tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = value_types(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(types[name])
    return out


def upstream(
    model: onnx.ModelProto,
    names: Sequence[str],
    *,
    output_types: Mapping[str, onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    """A model that computes only the tensors ``names``: they are its outputs, and only the
    nodes, initializers, graph inputs and value types they need are copied (once).

    An output's type is ``output_types[name]`` when given, else the one ``model`` has
    inferred for it, else left empty (ONNX Runtime infers it from the producing node).
    """
    graph = model.graph
    types = value_types(model)
    types.update(output_types or {})
    wanted = list(dict.fromkeys(names))
    needed = set(wanted)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= node_inputs(node)
    keep.reverse()
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    sub = out.graph
    sub.name = graph.name
    sub.node.extend(keep)
    sub.input.extend(i for i in graph.input if i.name in needed)
    sub.initializer.extend(t for t in graph.initializer if t.name in needed)
    produced = {o for node in keep for o in node.output}
    sub.value_info.extend(v for v in graph.value_info if v.name in produced)
    for name in wanted:
        sub.output.append(types.get(name) or helper.make_empty_tensor_value_info(name))
    return out
