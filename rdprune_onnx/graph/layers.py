"""Finding the prunable layers of an ONNX graph.

A prunable layer is a constant weight tensor (an initializer or the value of a Constant
node, in the main graph or a subgraph) consumed as the weight of a Conv, ConvTranspose,
Gemm or MatMul. Layers are keyed by the weight tensor's name; a tensor shared by several
nodes is one layer. Everything that looks like a layer but cannot be pruned is listed with
the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from rdprune_onnx.graph.external import tensor_array
from rdprune_onnx.graph.walk import constant_value, iter_graphs, node_label, subgraphs

PRUNABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_RECURRENT_OPS = ("LSTM", "GRU", "RNN")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
_QUANT_OPS = ("DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear")
# Ops whose output is their input unchanged (followed when tracing a weight to its constant).
_PASS_THROUGH = ("Identity",)
_PLAIN_ATTRIBUTES = (
    onnx.AttributeProto.INT,
    onnx.AttributeProto.FLOAT,
    onnx.AttributeProto.INTS,
    onnx.AttributeProto.FLOATS,
    onnx.AttributeProto.STRING,
)


@dataclass
class Use:
    """One node that consumes a weight."""

    node: str  # node name (or a synthetic "<op>#<index>" when the node has none)
    op_type: str
    input_index: int
    graph: str  # "" for the main graph, else the path of the subgraph
    attributes: dict[str, object] = field(default_factory=dict)


@dataclass
class Layer:
    """A prunable weight tensor."""

    name: str  # the weight tensor's name (the key used everywhere)
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    storage: str  # "initializer" or "constant"
    uses: list[Use]
    zeros: int  # weights already exactly zero

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size if self.size else 0.0

    @property
    def op_types(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(u.op_type for u in self.uses))

    @property
    def in_subgraph(self) -> bool:
        return any(u.graph for u in self.uses)


@dataclass
class Skipped:
    """A Conv/ConvTranspose/Gemm/MatMul weight operand that is not pruned, and why."""

    node: str
    op_type: str
    tensor: str
    reason: str
    shape: tuple[int, ...] | None = None


@dataclass
class LayerScan:
    layers: list[Layer]
    skipped: list[Skipped]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def _walk(
    graph: onnx.GraphProto, path: str = ""
) -> Iterator[tuple[onnx.GraphProto, str, int, onnx.NodeProto]]:
    for index, node in enumerate(graph.node):
        yield graph, path, index, node
        label = node_label(node, index)
        for k, sub in enumerate(subgraphs(node)):
            yield from _walk(sub, f"{path}/{label}.{sub.name or k}")


@dataclass
class _Constant:
    tensor: onnx.TensorProto
    storage: str


class ConstantIndex:
    """Maps every constant tensor name in a model (all scopes) to where it is stored."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.constants: dict[str, _Constant] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        for _graph, _path, _index, node in _walk(model.graph):
            for out in node.output:
                self.producers[out] = node
            tensor = constant_value(node)
            if tensor is not None:
                self.constants[node.output[0]] = _Constant(tensor, "constant")
        for graph in iter_graphs(model.graph):
            for init in graph.initializer:
                self.constants[init.name] = _Constant(init, "initializer")

    def resolve(self, name: str) -> tuple[str, str | None]:
        """Follow pass-through ops from ``name`` to a constant.

        Returns (the constant's name, None) or (name, reason it is not a constant).
        """
        seen: set[str] = set()
        current = name
        while current not in seen:
            seen.add(current)
            if current in self.constants:
                return current, None
            producer = self.producers.get(current)
            if producer is None:
                return current, "operand is a graph input, not a constant"
            if producer.op_type in _PASS_THROUGH and producer.input:
                current = producer.input[0]
                continue
            if producer.op_type in _QUANT_OPS:
                return current, f"quantized weight (behind {producer.op_type})"
            return current, f"operand is computed by a {producer.op_type} node"
        return current, "cyclic Identity chain"


def _weight_operands(node: onnx.NodeProto) -> list[int]:
    """Indices of the inputs that can be the weight of this node."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return [1]
    # Gemm and MatMul: B is the usual weight; A when the constant is on the left.
    return [1, 0]


def _tensor_dims(tensor: onnx.TensorProto) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.dims)


def _recurrent_weights(node: onnx.NodeProto, label: str) -> list[Skipped]:
    """An LSTM / GRU / RNN's weights, each listed as skipped."""
    roles = {1: "W (input weights)", 2: "R (recurrence weights)", 3: "B (biases)"}
    return [
        Skipped(
            label,
            node.op_type,
            node.input[position],
            f"recurrent {node.op_type} {role} {node.input[position]!r}: "
            "recurrent weights are not pruned",
        )
        for position, role in roles.items()
        if position < len(node.input) and node.input[position]
    ]


def _unprunable(
    tensor: onnx.TensorProto, dims: tuple[int, ...], op_type: str, input_index: int
) -> str | None:
    """Why a constant weight operand cannot be pruned (None: it can)."""
    if tensor.data_type not in FLOAT_TYPES:
        dtype_name = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
        return f"weight dtype {dtype_name} is not float"
    if len(dims) < 2:
        return f"weight has rank {len(dims)} (a vector or scalar, not a matrix)"
    if op_type in ("Conv", "ConvTranspose") and input_index != 1:
        return "weight is not the Conv's second input"
    if 0 in dims:
        return f"weight is empty (shape {'x'.join(map(str, dims))}): nothing to prune"
    return None


def find_layers(model: onnx.ModelProto) -> LayerScan:
    """Scan the model (subgraphs included) for prunable weights."""
    index = ConstantIndex(model)
    layers: dict[str, Layer] = {}
    skipped: list[Skipped] = []
    for _graph, path, node_index, node in _walk(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        label = node_label(node, node_index)
        if node.op_type in _RECURRENT_OPS:
            skipped.extend(_recurrent_weights(node, label))
            continue
        if node.op_type not in PRUNABLE_OPS:
            continue
        candidates = [i for i in _weight_operands(node) if i < len(node.input)]
        resolved = [(i, *index.resolve(node.input[i])) for i in candidates]
        constant = [(i, name) for i, name, reason in resolved if reason is None]
        if not constant:
            reasons = [reason for _i, _name, reason in resolved if reason]
            main = next((r for r in reasons if "quantized" in r), None)
            if main is None:
                main = (
                    "activation x activation MatMul (no constant operand)"
                    if node.op_type in ("MatMul", "Gemm")
                    else reasons[0]
                    if reasons
                    else "no weight"
                )
            tensor_name = resolved[0][1] if resolved else ""
            skipped.append(Skipped(label, node.op_type, tensor_name, main))
            continue
        input_index, name = constant[0]
        entry = index.constants[name]
        tensor = entry.tensor
        dims = _tensor_dims(tensor)
        reason = _unprunable(tensor, dims, node.op_type, input_index)
        if reason is not None:
            skipped.append(Skipped(label, node.op_type, name, reason, dims))
            continue
        attrs = {
            a.name: onnx.helper.get_attribute_value(a)
            for a in node.attribute
            if a.type in _PLAIN_ATTRIBUTES
        }
        use = Use(label, node.op_type, input_index, path, attrs)
        if name in layers:
            layers[name].uses.append(use)
            continue
        array = tensor_array(tensor)
        layers[name] = Layer(
            name=name,
            shape=dims,
            dtype=array.dtype.name,
            storage=entry.storage,
            uses=[use],
            zeros=int(np.count_nonzero(array == 0)),
        )
    return LayerScan(list(layers.values()), skipped)


def read_weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    entry = ConstantIndex(model).constants[name]
    return tensor_array(entry.tensor)
