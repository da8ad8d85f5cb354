"""How a Conv, Gemm or MatMul weight maps to a linear map: the effective layout
``X̂ (n, d) @ W (d, r)`` per group, the plan of each use of a weight (which operand, which
transposes, which bias), Conv patches (im2col), and the conversions between a weight in its
own layout and the effective one."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from rdprune_onnx.graph.cut import node_inputs
from rdprune_onnx.graph.external import tensor_array
from rdprune_onnx.graph.layers import ConstantIndex, Layer
from rdprune_onnx.graph.walk import node_attributes, node_label

PATCH_ELEMENTS = 2**24  # im2col elements materialised at once (per chunk of samples)

Array = np.ndarray


def conv_pads(
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    auto_pad: str = "NOTSET",
    pads: Sequence[int] | None = None,
) -> list[int]:
    """ONNX Conv padding ``[begin_1..begin_k, end_1..end_k]`` for an input of ``spatial``."""
    k = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, ks, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (ks - 1) + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin + end
    if auto_pad == "VALID" or not pads:
        return [0] * (2 * k)
    return [int(p) for p in pads]


def im2col(
    x: Array,
    kernel: Sequence[int],
    *,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    group: int = 1,
) -> Array:
    """Conv input patches: ``(group, N * prod(out_spatial), C/group * prod(kernel))``.

    Rows are ordered (sample, output position); a row's features are ordered (channel,
    kernel position), the order of ``W.reshape(M, -1)``, so that for group g
    ``patches[g] @ W[g*Mg:(g+1)*Mg].reshape(Mg, -1).T`` is that group's Conv output.
    """
    k = len(kernel)
    n, c = x.shape[:2]
    width = [(0, 0), (0, 0)] + [(int(pads[i]), int(pads[i + k])) for i in range(k)]
    padded = np.pad(x, width) if any(pads) else x
    window = [d * (ks - 1) + 1 for ks, d in zip(kernel, dilations, strict=True)]
    view = sliding_window_view(padded, window, axis=tuple(range(2, 2 + k)))
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, int(s)) for s in strides)
    index += tuple(slice(None, None, int(d)) for d in dilations)
    view = view[index]  # (N, C, *out, *kernel)
    out = view.shape[2 : 2 + k]
    view = view.reshape(n, group, c // group, *out, *kernel)
    perm = (1, 0, *range(3, 3 + k), 2, *range(3 + k, 3 + 2 * k))
    rows = n * math.prod(out)
    return view.transpose(perm).reshape(group, rows, (c // group) * math.prod(kernel))


@dataclass
class ConvAttributes:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str
    pads: tuple[int, ...] | None


@dataclass
class Plan:
    """One use of a weight, as ``rows(activation) @ W_eff -> rows(output)`` per group."""

    kind: str  # "conv" | "matmul_right" | "matmul_left" | "gemm_right" | "gemm_left"
    activation: str
    output: str
    layout: tuple[object, ...]  # uses of a shared weight must agree on this
    group: int = 1
    transpose: bool = False  # 2-D weights: W_eff = scale * (W.T if transpose else W)
    scale: float = 1.0
    act_transpose: bool = False  # Gemm: the activation operand is transposed (transA/transB)
    conv: ConvAttributes | None = None
    bias: str | None = None  # constant refit with the weight
    bias_shape: tuple[int, ...] = ()
    bias_scale: float = 1.0  # Gemm beta
    bias_add: bool = False  # the bias lives in the Add after a MatMul (target = out + b)
    offset: Array | None = None  # fixed additive term in the node output (subtracted)


def _as_str(value: object, default: str) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value) if value is not None else default


def _ints(value: object, default: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(value, list | tuple) and value:
        return tuple(int(v) for v in value)
    return default


class RefitGraph:
    """Indexes of the main graph used to plan refits."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.constants = ConstantIndex(model)
        self.nodes = list(model.graph.node)
        self.position: dict[str, int] = {}
        self.by_label: dict[str, onnx.NodeProto] = {}
        for i, node in enumerate(self.nodes):
            label = node_label(node, i)
            self.by_label[label] = node
            self.position[label] = i
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node_inputs(node):
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in model.graph.output}

    def constant(self, name: str) -> tuple[str, Array] | None:
        resolved, reason = self.constants.resolve(name)
        if reason is not None:
            return None
        return resolved, tensor_array(self.constants.constants[resolved].tensor)

    def real_consumers(self, name: str) -> list[onnx.NodeProto]:
        """Non-Identity nodes reading ``name`` directly or through Identity chains."""
        found: list[onnx.NodeProto] = []
        stack, seen = [name], set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in self.graph_outputs:
                found.append(onnx.NodeProto())  # a graph output counts as a consumer
            for node in self.consumers.get(current, []):
                if node.op_type == "Identity":
                    stack.extend(node.output)
                else:
                    found.append(node)
        return found

    def sole_user(self, constant: str, node: onnx.NodeProto) -> bool:
        users = self.real_consumers(constant)
        return len(users) == 1 and users[0] is node


def _float_constant(array: Array) -> bool:
    return array.dtype.kind == "f"


def _plan_use(
    g: RefitGraph, node: onnx.NodeProto, input_index: int, shape: tuple[int, ...], bias_ok: bool
) -> Plan | str:
    """How ``node`` uses its weight input ``input_index``, or why it cannot be refit."""
    op = node.op_type
    if op == "ConvTranspose":
        return "ConvTranspose refit is not implemented"
    other = 0 if input_index == 1 else 1
    if other >= len(node.input) or not node.input[other]:
        return "node has no activation operand"
    if g.constant(node.input[other]) is not None:
        return "both operands are constants"
    if op == "Conv":
        return _plan_conv(g, node, shape, bias_ok)
    if len(shape) != 2:
        return f"{op} weight of rank {len(shape)} (batched weights are not refit)"
    if op == "MatMul":
        return _plan_matmul(g, node, input_index, shape, bias_ok)
    return _plan_gemm(g, node, input_index, shape, bias_ok)


def _plan_conv(
    g: RefitGraph, node: onnx.NodeProto, shape: tuple[int, ...], bias_ok: bool
) -> Plan | str:
    attrs = node_attributes(node)
    group = int(attrs.get("group", 1))  # type: ignore[call-overload]
    if shape[0] % group:
        return f"output channels {shape[0]} not divisible by group {group}"
    k = len(shape) - 2
    conv = ConvAttributes(
        kernel=tuple(int(s) for s in shape[2:]),
        strides=_ints(attrs.get("strides"), (1,) * k),
        dilations=_ints(attrs.get("dilations"), (1,) * k),
        auto_pad=_as_str(attrs.get("auto_pad"), "NOTSET"),
        pads=_ints(attrs.get("pads"), ()) or None,
    )
    plan = Plan("conv", node.input[0], node.output[0], ("conv", group), group=group, conv=conv)
    if len(node.input) > 2 and node.input[2]:
        found = g.constant(node.input[2])
        if found is None:
            return "Conv bias is computed, not a constant"
        name, bias = found
        if bias_ok and _float_constant(bias) and g.sole_user(name, node):
            plan.bias, plan.bias_shape = name, tuple(bias.shape)
        else:
            plan.offset = bias.astype(np.float64).reshape(1, -1, *([1] * k))
    return plan


def _plan_matmul(
    g: RefitGraph, node: onnx.NodeProto, input_index: int, shape: tuple[int, ...], bias_ok: bool
) -> Plan:
    activation, output = node.input[1 - input_index], node.output[0]
    if input_index == 0:
        return Plan("matmul_left", activation, output, ("mat", True, 1.0), transpose=True)
    plan = Plan("matmul_right", activation, output, ("mat", False, 1.0))
    users = g.consumers.get(output, [])
    if not bias_ok or output in g.graph_outputs or len(users) != 1:
        return plan
    add = users[0]
    if add.op_type != "Add" or len(add.input) != 2:
        return plan
    other_name = add.input[0] if add.input[1] == output else add.input[1]
    found = g.constant(other_name) if other_name != output else None
    if found is not None:
        name, bias = found
        vector = bias.ndim >= 1 and all(d == 1 for d in bias.shape[:-1])
        if (
            vector
            and bias.shape[-1] == shape[1]
            and _float_constant(bias)
            and g.sole_user(name, add)
        ):
            plan.bias, plan.bias_shape, plan.bias_add = name, tuple(bias.shape), True
    return plan


def _plan_gemm(
    g: RefitGraph, node: onnx.NodeProto, input_index: int, shape: tuple[int, ...], bias_ok: bool
) -> Plan | str:
    """Gemm: ``Y = alpha * op(A) @ op(B) + beta * C``."""
    attrs = node_attributes(node)
    alpha = float(attrs.get("alpha", 1.0))  # type: ignore[arg-type]
    beta = float(attrs.get("beta", 1.0))  # type: ignore[arg-type]
    trans_a = bool(attrs.get("transA", 0))
    trans_b = bool(attrs.get("transB", 0))
    if alpha == 0.0:
        return "Gemm alpha is 0 (the weight has no effect)"
    activation, output = node.input[1 - input_index], node.output[0]
    if input_index == 1:
        plan = Plan(
            "gemm_right",
            activation,
            output,
            ("mat", trans_b, alpha),
            transpose=trans_b,
            scale=alpha,
            act_transpose=trans_a,
        )
        columns = shape[0] if trans_b else shape[1]
    else:
        plan = Plan(
            "gemm_left",
            activation,
            output,
            ("mat", not trans_a, alpha),
            transpose=not trans_a,
            scale=alpha,
            act_transpose=trans_b,
        )
        columns = -1  # a bias per output row of a left weight is not refit
    if len(node.input) > 2 and node.input[2] and beta != 0.0:
        found = g.constant(node.input[2])
        if found is None:
            return "Gemm C is computed, not a constant"
        name, c = found
        vector = c.ndim in (1, 2) and c.shape[-1] == columns and (c.ndim == 1 or c.shape[0] == 1)
        if bias_ok and vector and _float_constant(c) and g.sole_user(name, node):
            plan.bias, plan.bias_shape, plan.bias_scale = name, tuple(c.shape), beta
        else:
            plan.offset = beta * c.astype(np.float64)
    return plan


def plan_layer(g: RefitGraph, layer: Layer, refit_bias: bool) -> list[Plan] | str:
    if layer.in_subgraph:
        return "weight is used inside a subgraph (If/Loop/Scan)"
    plans: list[Plan] = []
    single = len(layer.uses) == 1
    for use in layer.uses:
        node = g.by_label.get(use.node)
        if node is None:
            return f"node {use.node} not found in the main graph"
        plan = _plan_use(g, node, use.input_index, layer.shape, refit_bias and single)
        if isinstance(plan, str):
            return plan
        plans.append(plan)
    if len({p.layout for p in plans}) > 1:
        return "shared weight used in different layouts by its nodes"
    return plans


def rows_key(p: Plan) -> tuple[object, ...]:
    """Uses with equal keys read the same activation rows (one Hessian serves them all)."""
    return (p.kind, p.activation, p.act_transpose, p.group, p.conv)


def to_effective(weight: Array, plan: Plan) -> Array:
    """``weight`` (original layout) as ``(group, d, r)`` float64."""
    w = weight.astype(np.float64)
    if plan.kind == "conv":
        m = w.shape[0]
        return w.reshape(plan.group, m // plan.group, -1).transpose(0, 2, 1)
    return plan.scale * (w.T if plan.transpose else w)[None]


def from_effective(eff: Array, plan: Plan, shape: tuple[int, ...]) -> Array:
    if plan.kind == "conv":
        return eff.transpose(0, 2, 1).reshape(shape)
    w = eff[0] / plan.scale
    return w.T if plan.transpose else w


def bias_to_effective(bias: Array, plan: Plan) -> Array:
    return plan.bias_scale * bias.astype(np.float64).reshape(plan.group, -1)


def bias_from_effective(eff: Array, plan: Plan) -> Array:
    return (eff / plan.bias_scale).reshape(plan.bias_shape)


def effective_with_bias(weight: Array, bias: Array | None, plan: Plan) -> Array:
    eff = to_effective(weight, plan)
    if bias is None:
        return eff
    return np.concatenate([eff, bias_to_effective(bias, plan)[:, None, :]], axis=1)


def keep_mask(masked: Array, plan: Plan, bias: bool) -> Array:
    """The ``(g, D, r)`` keep-mask of a masked weight (zeros = pruned), bias row kept."""
    mask = to_effective(masked != 0, plan) != 0
    if bias:
        groups, _d, r = mask.shape
        mask = np.concatenate([mask, np.ones((groups, 1, r), dtype=bool)], axis=1)
    return mask


def cast_weight(eff: Array, plan: Plan, original: Array, keep: Array) -> Array:
    """The effective refit weight in the original layout and dtype; zeros where pruned,
    nonzero where kept (a kept value that rounds to 0 becomes the smallest subnormal)."""
    wide = from_effective(eff, plan, original.shape)
    cast = np.where(keep, wide, 0.0).astype(original.dtype)
    lost = keep & (cast == 0)
    if np.any(lost):
        tiny = np.finfo(original.dtype).smallest_subnormal
        sign = np.where(wide[lost] < 0, -1.0, 1.0)
        cast[lost] = (sign * tiny).astype(original.dtype)
    return cast


def input_rows(plan: Plan, act: Array) -> Iterator[tuple[slice, Array]]:
    """Chunks of ``(group, rows, d)`` activation rows, with the row range they cover."""
    if plan.kind == "conv":
        assert plan.conv is not None
        conv = plan.conv
        pads = conv_pads(
            act.shape[2:], conv.kernel, conv.strides, conv.dilations, conv.auto_pad, conv.pads
        )
        per_sample = max(1, act[:1].size * math.prod(conv.kernel))
        step = max(1, PATCH_ELEMENTS // per_sample)
        start = 0
        for s in range(0, act.shape[0], step):
            x = im2col(
                act[s : s + step],
                conv.kernel,
                strides=conv.strides,
                pads=pads,
                dilations=conv.dilations,
                group=plan.group,
            )
            yield slice(start, start + x.shape[1]), x
            start += x.shape[1]
        return
    if plan.kind == "matmul_right":
        x = act.reshape(-1, act.shape[-1])
    elif plan.kind == "matmul_left":
        a = act[:, None] if act.ndim == 1 else act
        x = np.swapaxes(a, -1, -2).reshape(-1, a.shape[-2])
    elif plan.kind == "gemm_right":
        x = act.T if plan.act_transpose else act
    else:  # gemm_left: rows are op(B)ᵀ
        x = act if plan.act_transpose else act.T
    yield slice(0, x.shape[0]), x[None]


def target_rows(plan: Plan, out: Array, bias: Array | None) -> Array:
    """The dense node output as ``(group, rows, r)`` float64 targets."""
    y = out.astype(np.float64)
    if plan.offset is not None:
        y = y - plan.offset
    if plan.kind == "conv":
        y = np.moveaxis(y, 1, -1).reshape(-1, plan.group, y.shape[1] // plan.group)
        return y.transpose(1, 0, 2)
    if plan.kind == "matmul_right":
        y = y.reshape(-1, y.shape[-1])
        if plan.bias_add and bias is not None:
            y = y + bias.astype(np.float64).reshape(-1)
        return y[None]
    if plan.kind == "matmul_left":
        y = y[:, None] if y.ndim == 1 else y
        return np.swapaxes(y, -1, -2).reshape(-1, y.shape[-2])[None]
    if plan.kind == "gemm_right":
        return y[None]
    return y.T[None]
