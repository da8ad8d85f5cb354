"""The activation that produces each graph output (Softmax, LogSoftmax, Sigmoid), seen
through the shape-only ops that may follow it, and the class axis it normalises over."""

from __future__ import annotations

import onnx

# Ops that move values without changing them: the activation before them still describes
# the output. The class axis is followed through Identity, Cast and Transpose; after an op
# that reshapes, it is left to the data to say.
_KEEP_AXIS = ("Identity", "Cast")
_RESHAPE = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")
_ACTIVATIONS = {"Softmax": "probs", "LogSoftmax": "log-probs", "Sigmoid": "sigmoid"}


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _int_attr(node: onnx.NodeProto, name: str) -> int | None:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return None


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return [int(p) for p in attr.ints]
    return None


def output_activation(model: onnx.ModelProto, output: str) -> tuple[str, int | None] | None:
    """``(kind, class axis)`` of the activation producing ``output``, or None.

    ``kind`` is ``probs`` (Softmax), ``log-probs`` (LogSoftmax) or ``sigmoid``; the axis is
    the Softmax's, mapped through any Transpose after it (None where a reshape after it
    makes it unknown, and for Sigmoid).
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    path: list[onnx.NodeProto] = []
    node = producers.get(output)
    while node is not None and node.domain in ("", "ai.onnx"):
        if node.op_type in _ACTIVATIONS:
            break
        if node.op_type not in _KEEP_AXIS + _RESHAPE + ("Transpose",) or not node.input:
            return None
        path.append(node)
        node = producers.get(node.input[0])
    else:
        return None
    kind = _ACTIVATIONS[node.op_type]
    if kind == "sigmoid":
        return kind, None
    axis = _int_attr(node, "axis")
    axis_now: int | None = axis if axis is not None else (-1 if _opset(model) >= 13 else 1)
    for step in reversed(path):  # from the activation down to the output
        if axis_now is None or step.op_type in _KEEP_AXIS:
            continue
        if step.op_type in _RESHAPE:
            axis_now = None
            continue
        perm = _perm(step)  # Transpose
        if perm is None:
            axis_now = None
            continue
        source = axis_now + len(perm) if axis_now < 0 else axis_now
        axis_now = perm.index(source) if 0 <= source < len(perm) else None
    return kind, axis_now


def output_activations(model: onnx.ModelProto) -> dict[str, tuple[str, int | None]]:
    """:func:`output_activation` for every graph output that has one."""
    found = {}
    for out in model.graph.output:
        activation = output_activation(model, out.name)
        if activation is not None:
            found[out.name] = activation
    return found
