"""Walking a graph and its subgraphs (If branches, Loop and Scan bodies)."""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import helper


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held in a node's attributes."""
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a ``Constant`` node's ``value`` attribute (None for any other node, or
    a Constant given as sparse_value, value_float, ...)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from iter_graphs(sub)


def node_label(node: onnx.NodeProto, index: int) -> str:
    """How a node is named in layers and reports: its name, or ``<op_type>#<index>`` (its
    position in its graph) when it has none."""
    return node.name or f"{node.op_type}#{index}"


def node_attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
