"""Folding a BatchNormalization into the Conv before it, in a graph whose Conv weight is
fed at run time (the curves' cut models: ONNX Runtime cannot fold the norm itself there)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rdprune_onnx.graph.cut import node_inputs
from rdprune_onnx.graph.layers import ConstantIndex
from rdprune_onnx.graph.walk import node_attributes


def constant_arrays(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The values of constant tensors: initializers, Constant outputs, or either through
    Identity nodes (exporters share equal tensors that way); None if one is not constant
    or its data cannot be read here (e.g. not loaded)."""
    index = ConstantIndex(model)
    found: dict[str, np.ndarray] = {}
    for name in names:
        source, reason = index.resolve(name)
        if reason is not None:
            return None
        try:
            found[name] = numpy_helper.to_array(index.constants[source].tensor)
        except Exception:  # data this numpy cannot read here (e.g. not loaded)
            return None
    return found


def _conv_then_norm(
    graph: onnx.GraphProto, weight: str
) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The Conv whose only use of ``weight`` is its W, and the inference-mode
    BatchNormalization that alone reads its output (not a graph output); None otherwise."""
    users = [n for n in graph.node if weight in node_inputs(n)]
    if len(users) != 1:
        return None
    conv = users[0]
    if (
        conv.op_type != "Conv"
        or conv.domain not in ("", "ai.onnx")
        or list(conv.input).count(weight) != 1
        or len(conv.input) < 2
        or conv.input[1] != weight
    ):
        return None
    produced = conv.output[0]
    readers = [n for n in graph.node if produced in node_inputs(n)]
    if len(readers) != 1 or produced in {o.name for o in graph.output}:
        return None
    norm = readers[0]
    if (
        norm.op_type != "BatchNormalization"
        or norm.domain not in ("", "ai.onnx")
        or list(norm.input).index(produced) != 0
        or list(norm.input).count(produced) != 1
        or len([o for o in norm.output if o]) != 1
        or not norm.output[0]
        or node_attributes(norm).get("training_mode", 0)
    ):
        return None
    return conv, norm


def fold_batchnorm(
    model: onnx.ModelProto, weight: str
) -> Callable[[np.ndarray], np.ndarray] | None:
    """Fold the BatchNormalization that follows the Conv of ``weight`` into the Conv.

    With the weight a graph input ONNX Runtime cannot fold the norm itself (nor fuse the
    activation after it). The rewritten graph takes the weight scaled per output channel
    (the returned function scales a candidate) and a folded bias: the same function to
    float rounding, with the mask still chosen on the original weight. ``model`` (a cut
    built for this layer) is edited in place; None when the pattern is not there.
    """
    graph = model.graph
    pair = _conv_then_norm(graph, weight)
    if pair is None:
        return None
    conv, norm = pair
    attrs = node_attributes(norm)
    params = list(norm.input[1:5])
    bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    arrays = constant_arrays(model, [*params, *([bias_name] if bias_name else [])])
    if arrays is None or len(params) != 4:
        return None
    scale, beta, mean, var = (arrays[p].astype(np.float64) for p in params)
    epsilon = float(attrs.get("epsilon", 1e-5))  # type: ignore[arg-type]
    factor = scale / np.sqrt(var + epsilon)
    weight_type = next((i for i in graph.input if i.name == weight), None)
    if weight_type is None:
        return None
    dims = [d.dim_value for d in weight_type.type.tensor_type.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(weight_type.type.tensor_type.elem_type)
    if not dims or dims[0] != factor.size:
        return None
    bias = arrays[bias_name].astype(np.float64) if bias_name else np.zeros(factor.size)
    folded_name = f"{weight}__rdprune_bn_bias"
    folded = ((bias - mean) * factor + beta).astype(dtype)
    _replace_norm(graph, conv, norm, numpy_helper.from_array(folded, folded_name))
    _drop_unused(graph, [*params, bias_name])
    shaped = factor.astype(dtype).reshape((-1,) + (1,) * (len(dims) - 1))

    def scaled(candidate: np.ndarray) -> np.ndarray:
        result: np.ndarray = candidate * shaped
        return result

    return scaled


def _replace_norm(
    graph: onnx.GraphProto, conv: onnx.NodeProto, norm: onnx.NodeProto, bias: onnx.TensorProto
) -> None:
    """The Conv takes ``bias`` as its B and writes the norm's output; the norm is removed."""
    produced = conv.output[0]
    graph.initializer.append(bias)
    if len(conv.input) > 2:
        conv.input[2] = bias.name
    else:
        conv.input.append(bias.name)
    conv.output[0] = norm.output[0]
    kept = [n for n in graph.node if n is not norm]
    del graph.node[:]
    graph.node.extend(kept)
    keep_info = [v for v in graph.value_info if v.name != produced]
    del graph.value_info[:]
    graph.value_info.extend(keep_info)


def _drop_unused(graph: onnx.GraphProto, names: Sequence[str | None]) -> None:
    """Remove the initializers among ``names`` that no node reads any more."""
    still_used = {n for node in graph.node for n in node_inputs(node)}
    unused = {p for p in names if p and p not in still_used}
    unused &= {t.name for t in graph.initializer}
    if unused:
        keep_init = [t for t in graph.initializer if t.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(keep_init)
