"""One-shot weight reconstruction: refit the kept weights of each layer after masking.

After the masks are chosen, each prunable layer is visited in graph order and its kept
weights (and its bias, where the node has one) are refit by least squares so that the
layer, fed with the activations of the already masked-and-refit upstream model (X̂),
reproduces the dense layer's output on the dense activations (Y = dense layer(X)):

    minimise  || X̂ W' + b' - Y ||²   over the kept entries of W' (pruned entries stay 0).

Every layer is written as a matrix product in an *effective* layout ``X̂ (n, d) @ W (d, r)``
per group: ``d`` inputs, ``r`` output rows (output channels / columns), ``n`` calibration
rows. MatMul ``x @ W`` flattens the leading dimensions of x; ``W @ x`` is handled as
``xᵀ @ Wᵀ``; Gemm folds alpha into the weight and beta into the bias; Conv uses im2col
patches (:func:`im2col`), one problem per group. A weight shared by several nodes is refit
once against all its uses stacked.

Statistics stream over the calibration batches in float64: ``H = X̂ᵀX̂`` (d x d),
``G = X̂ᵀY`` (d x r) and ``ΣY²``; the layer's calibration error of any candidate weight
follows from them exactly (``tr(WᵀHW) - 2 tr(WᵀG) + ΣY²``), so the error before and after
the refit costs no extra pass. Activations come from ONNX Runtime: the layer's input and
output tensors are added as graph outputs of the type-inferred model and the graph is cut
to the nodes that compute them. The dense targets of all layers come from one dense pass
and are kept when they fit in ``DENSE_CACHE_BYTES`` (2 GiB), else they are recomputed per
layer. The inputs X̂ need one pass of the current (masked, upstream-refit) model per group
of layers; consecutive layers that read the same activation (Q/K/V projections, the
branches of a block) form one group and share the pass and the Hessian. A pass runs the
graph only up to the group's nodes, so the total is O(L²/2) layer evaluations for a chain
of L groups.

Inputs (``inputs=``): ``"sequential"`` (above: X̂ from the model pruned and refit so far,
the way SparseGPT calibrates LLMs) or ``"dense"``: H from the dense model's activations X,
summed in ONE pass over the data for all layers (as many as fit in ``DENSE_CACHE_BYTES`` per
pass), and ``G = H [W; b]``, ``ΣY² = tr([W; b]ᵀ G)`` from the dense weight, with no target
pass (:func:`dense_stats`, shared with the refit-aware curves).

Rows: calibration rows are real rows only. When the data has an attention-mask input
(:func:`token_mask_name`: a 2-D integer/bool input named ``*attention_mask*``, else
``*mask*``), the rows of ``x @ W`` layers whose activation's two leading axes are that
mask's (batch, seq) are dropped where the mask is 0 (padding), from H, G, ΣY² and the row
count (:func:`_real_rows`; other shapes count every row, logged). The warning about fewer
rows than inputs uses that count.

Solvers (the damped Hessian is ``H + λI`` with ``λ = damping * mean(diag(H))`` over the
weight inputs, and ``damping`` times its own diagonal entry for a bias column, so that
scaling the activations scales the refit weights back exactly):

- ``exact``: for every output row, the least-squares solution restricted to the kept
  inputs of that row. A row with k kept and p pruned inputs solves either the k x k system
  on the kept set, or (when p < k) the equivalent p x p system on the pruned set through
  the inverse Hessian (``w = w* - H⁻¹[:, P] (H⁻¹[P, P])⁻¹ w*[P]``). Time
  ``O(Σ_rows min(k, p)³)`` (plus ``O(d³)`` for the inverse), memory ``O(d²)`` plus a
  bounded chunk (64 MiB) of gathered systems. The systems are solved in batches with one
  BLAS thread each (through threadpoolctl when it is installed).
- ``sparsegpt``: the blockwise OBS update of SparseGPT (Frantar & Alistarh, 2023) with
  the FIXED mask given (no mask re-selection): starting from the unconstrained optimum
  ``W* = (H + λI)⁻¹ G``, columns are eliminated in order using the upper Cholesky factor of
  the inverse Hessian, 128 columns per block with lazy batch updates. Time
  ``O(d³ + r d²)``, memory ``O(d² + r d)``. It is an approximation of ``exact`` (each
  elimination assumes the later columns are free, and a processed column is frozen): its
  error reduction is typically 40-70% of the exact one.
- ``auto`` decides by estimated cost rather than by width alone: ``exact`` when its flop
  count (:func:`exact_cost`) is at most ``EXACT_MAX_FLOPS`` (1.5e11, about 10-15 s of one
  core) or at most ``EXACT_FLOP_FACTOR`` (4) times the SparseGPT estimate
  (:func:`sparsegpt_cost`); else ``sparsegpt``. Exact costs the most at 50% sparsity
  (min(k, p) = d/2): there it is picked up to d of about 1500-2000 for r of a few hundred
  to a few thousand rows (MiniLM's 384x1536 and 1536x384 both get exact) and SparseGPT
  above (ResNet-50's 3x3x256 and 3x3x512 convolutions); at 90% or 10% sparsity exact is
  cheap at any width. Here d counts the inputs of one group (Conv: channels per group x
  kernel size) plus one for a refit bias.

Mask selection (``select=True``): :func:`solve_sparsegpt_select` is SparseGPT proper
(Frantar & Alistarh 2023, Algorithm 1): the same blockwise sweep, but at the start of each
128-column block the entries to prune are chosen by the OBS saliency ``w² / U_jj²`` (U the
upper Cholesky factor of the damped inverse Hessian) over the whole block, before the
block's columns are eliminated; the total count of zeros is kept exactly (block quotas by
largest remainder, dense zeros first). The layer keeps the number of zeros of the given
mask; the selected-and-updated weight replaces the given mask's refit only when its
calibration error is lower (LayerRefit method ``"sparsegpt-select"``).

Guarantee: after solving, the refit weight (cast back to the weight's dtype) is scored on
the calibration statistics; if it does not lower the layer's error below plain masking,
the plain masked weight (and the original bias) are kept. Pruned positions are exactly
zero and every kept position stays nonzero, so each layer's count of zeros is unchanged.

Not supported (reported as ``skipped`` with the reason): ConvTranspose, weights used inside
If/Loop/Scan subgraphs, MatMul weights of rank above 2, nodes whose activation operand is a
constant, Gemm with a computed (non-constant) C, Conv with a computed bias, and weights
shared by nodes that use them in different layouts. A bias is refit only when it is a
float constant used by this node alone and the weight has a single use: Conv input 2, Gemm
C of shape (N,) or (1, N) (beta != 0), or a constant (N,)-shaped operand of the Add that is
the sole consumer of a ``x @ W`` MatMul's output.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper
from tqdm import tqdm

from rdprune_onnx.calibration import batches, sample_count
from rdprune_onnx.curves import DEFAULT_MEMORY_BUDGET, infer_types
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.cut import node_inputs, with_outputs
from rdprune_onnx.graph.external import tensor_array
from rdprune_onnx.graph.layers import ConstantIndex, Layer
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.runtime import Session, SessionConfig

DAMPING = 0.01  # of the mean Hessian diagonal, added before solving

log = logging.getLogger(__name__)


def _load_threadpool_limits() -> Callable[..., AbstractContextManager[object]] | None:
    """threadpoolctl's ``threadpool_limits`` if installed (optional: it caps BLAS threads
    for the exact solver's many small solves; without it BLAS keeps its thread count)."""
    try:
        module = importlib.import_module("threadpoolctl")
    except ImportError:  # pragma: no cover
        return None
    limits: Callable[..., AbstractContextManager[object]] = module.threadpool_limits
    return limits


_threadpool_limits = _load_threadpool_limits()

SOLVERS = ("auto", "exact", "sparsegpt")
INPUTS = ("sequential", "dense")  # where the refit statistics come from (see reconstruct)
SELECT_METHOD = "sparsegpt-select"  # LayerRefit.method of a mask chosen by SparseGPT
EXACT_MAX_FLOPS = 1.5e11  # auto: exact when its estimated cost is below this ...
EXACT_FLOP_FACTOR = 4.0  # ... or below this multiple of the SparseGPT estimate
BLOCK_SIZE = 128  # SparseGPT columns per lazy-update block
_CHUNK_BYTES = 64 * 2**20  # working memory for one chunk of gathered systems / float64 rows
_PATCH_ELEMENTS = 2**24  # im2col elements materialised at once (per chunk of samples)
DENSE_CACHE_BYTES = DEFAULT_MEMORY_BUDGET  # keep all layers' dense targets within this (2 GiB)

Array = np.ndarray


@dataclass
class LayerRefit:
    """What the refit did to one layer."""

    name: str
    method: str  # "exact" | "sparsegpt" | "sparsegpt-select" | "skipped"
    # Mean squared error of the layer's output (X̂ inputs) against the dense layer's output
    # on the dense inputs, per output element, over the calibration data: plain masking ...
    error_before: float
    # ... and after the refit (equal to error_before when the mask was kept).
    error_after: float
    seconds: float
    reason: str | None = None  # why skipped, or why the plain mask was kept
    bias: str | None = None  # the bias constant refit along with the weight, if any


@dataclass
class Reconstruction:
    # Refit weights (same dtype/shape as the originals; pruned positions exactly 0), for
    # every entry of ``pruned`` (layers not refit keep the given masked weight).
    weights: dict[str, Array]
    # Refit bias constants keyed by their tensor name (only where a bias exists).
    biases: dict[str, Array]
    layers: list[LayerRefit] = field(default_factory=list)

    def all_weights(self) -> dict[str, Array]:
        """Weights and biases together, as :func:`replace_weights` takes them."""
        return {**self.weights, **self.biases}


# --------------------------------------------------------------------------------------
# Conv patches


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


# --------------------------------------------------------------------------------------
# Plans: how one node uses a weight, in the effective layout


@dataclass
class _Conv:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str
    pads: tuple[int, ...] | None


@dataclass
class _Plan:
    """One use of a weight, as ``rows(activation) @ W_eff -> rows(output)`` per group."""

    kind: str  # "conv" | "matmul_right" | "matmul_left" | "gemm_right" | "gemm_left"
    activation: str
    output: str
    layout: tuple[object, ...]  # uses of a shared weight must agree on this
    group: int = 1
    transpose: bool = False  # 2-D weights: W_eff = scale * (W.T if transpose else W)
    scale: float = 1.0
    act_transpose: bool = False  # Gemm: the activation operand is transposed (transA/transB)
    conv: _Conv | None = None
    bias: str | None = None  # constant refit with the weight
    bias_shape: tuple[int, ...] = ()
    bias_scale: float = 1.0  # Gemm beta
    bias_add: bool = False  # the bias lives in the Add after a MatMul (target = out + b)
    offset: Array | None = None  # fixed additive term in the node output (subtracted)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _as_str(value: object, default: str) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value) if value is not None else default


def _ints(value: object, default: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(value, list | tuple) and value:
        return tuple(int(v) for v in value)
    return default


class _Graph:
    """Indexes of the main graph used to plan refits."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.constants = ConstantIndex(model)
        self.nodes = list(model.graph.node)
        self.position: dict[str, int] = {}
        self.by_label: dict[str, onnx.NodeProto] = {}
        for i, node in enumerate(self.nodes):
            label = node.name or f"{node.op_type}#{i}"
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
    g: _Graph, node: onnx.NodeProto, input_index: int, shape: tuple[int, ...], bias_ok: bool
) -> _Plan | str:
    """How ``node`` uses its weight input ``input_index``, or why it cannot be refit."""
    attrs = _attrs(node)
    op = node.op_type
    if op == "ConvTranspose":
        return "ConvTranspose refit is not implemented"
    other = 0 if input_index == 1 else 1
    if other >= len(node.input) or not node.input[other]:
        return "node has no activation operand"
    activation = node.input[other]
    if g.constant(activation) is not None:
        return "both operands are constants"
    output = node.output[0]
    if op == "Conv":
        group = int(attrs.get("group", 1))  # type: ignore[call-overload]
        if shape[0] % group:
            return f"output channels {shape[0]} not divisible by group {group}"
        k = len(shape) - 2
        conv = _Conv(
            kernel=tuple(int(s) for s in shape[2:]),
            strides=_ints(attrs.get("strides"), (1,) * k),
            dilations=_ints(attrs.get("dilations"), (1,) * k),
            auto_pad=_as_str(attrs.get("auto_pad"), "NOTSET"),
            pads=_ints(attrs.get("pads"), ()) or None,
        )
        plan = _Plan("conv", activation, output, ("conv", group), group=group, conv=conv)
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
    if len(shape) != 2:
        return f"{op} weight of rank {len(shape)} (batched weights are not refit)"
    if op == "MatMul":
        if input_index == 0:
            return _Plan("matmul_left", activation, output, ("mat", True, 1.0), transpose=True)
        plan = _Plan("matmul_right", activation, output, ("mat", False, 1.0))
        users = g.consumers.get(output, [])
        if bias_ok and output not in g.graph_outputs and len(users) == 1:
            add = users[0]
            if add.op_type == "Add" and len(add.input) == 2:
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
    # Gemm: Y = alpha * op(A) @ op(B) + beta * C
    alpha = float(attrs.get("alpha", 1.0))  # type: ignore[arg-type]
    beta = float(attrs.get("beta", 1.0))  # type: ignore[arg-type]
    trans_a = bool(attrs.get("transA", 0))
    trans_b = bool(attrs.get("transB", 0))
    if alpha == 0.0:
        return "Gemm alpha is 0 (the weight has no effect)"
    if input_index == 1:
        plan = _Plan(
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
        plan = _Plan(
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


def _plan_layer(g: _Graph, layer: Layer, refit_bias: bool) -> list[_Plan] | str:
    if layer.in_subgraph:
        return "weight is used inside a subgraph (If/Loop/Scan)"
    plans: list[_Plan] = []
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


# --------------------------------------------------------------------------------------
# Effective layout


def _to_effective(weight: Array, plan: _Plan) -> Array:
    """``weight`` (original layout) as ``(group, d, r)`` float64."""
    w = weight.astype(np.float64)
    if plan.kind == "conv":
        m = w.shape[0]
        return w.reshape(plan.group, m // plan.group, -1).transpose(0, 2, 1)
    return plan.scale * (w.T if plan.transpose else w)[None]


def _from_effective(eff: Array, plan: _Plan, shape: tuple[int, ...]) -> Array:
    if plan.kind == "conv":
        return eff.transpose(0, 2, 1).reshape(shape)
    w = eff[0] / plan.scale
    return w.T if plan.transpose else w


def _bias_to_effective(bias: Array, plan: _Plan) -> Array:
    return plan.bias_scale * bias.astype(np.float64).reshape(plan.group, -1)


def _bias_from_effective(eff: Array, plan: _Plan) -> Array:
    return (eff / plan.bias_scale).reshape(plan.bias_shape)


def _input_rows(plan: _Plan, act: Array) -> Iterator[tuple[slice, Array]]:
    """Chunks of ``(group, rows, d)`` activation rows, with the row range they cover."""
    if plan.kind == "conv":
        assert plan.conv is not None
        conv = plan.conv
        pads = conv_pads(
            act.shape[2:], conv.kernel, conv.strides, conv.dilations, conv.auto_pad, conv.pads
        )
        per_sample = max(1, act[:1].size * math.prod(conv.kernel))
        step = max(1, _PATCH_ELEMENTS // per_sample)
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


def token_mask_name(data: Mapping[str, Array]) -> str | None:
    """The calibration input that marks real token positions, if there is one: a 2-D
    integer or boolean input (batch, seq) whose name contains ``attention_mask`` or, when
    no name does, ``mask`` (one such input only; several: None, logged)."""
    found = [
        name
        for name, array in data.items()
        if getattr(array, "ndim", 0) == 2
        and np.dtype(array.dtype).kind in "biu"
        and "mask" in name.lower()
    ]
    preferred = [name for name in found if "attention_mask" in name.lower()] or found
    if len(preferred) > 1:
        log.info("several mask inputs (%s): every activation row counts", ", ".join(preferred))
        return None
    return preferred[0] if preferred else None


def _real_rows(plan: _Plan, act: Array, token_mask: Array | None) -> Array | None:
    """Which activation rows of ``plan`` are real tokens (None: all rows count).

    Rule: only ``x @ W`` layers (MatMul with the weight on the right) have token rows.
    When ``act`` has rank >= 3 and its two leading axes equal the attention mask's shape
    (batch, seq), the rows (the flattened leading axes) at positions where the mask is 0
    are padding and excluded from H, G, ΣY² and the row count. Any other shape (a pooled
    (batch, hidden) activation, a reshaped (batch * seq, hidden) one, heads before seq)
    counts every row; a rank >= 3 activation that does not line up is logged.
    """
    if token_mask is None or plan.kind != "matmul_right":
        return None
    mask = np.asarray(token_mask) != 0
    if act.ndim >= 3 and act.shape[:2] == mask.shape:
        full = mask.reshape(mask.shape + (1,) * (act.ndim - 3))
        return np.broadcast_to(full, act.shape[:-1]).reshape(-1)
    if act.ndim >= 3:
        log.info(
            "%s: activation %s does not line up with the attention mask %s: every row counts",
            plan.activation,
            list(act.shape),
            list(mask.shape),
        )
    return None


def _target_rows(plan: _Plan, out: Array, bias: Array | None) -> Array:
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


# --------------------------------------------------------------------------------------
# Statistics


@dataclass
class _Stats:
    hessian: Array  # (g, D, D)  D = d (+1 with a bias column, last)
    cross: Array  # (g, D, r)
    target_sq: float = 0.0
    rows: int = 0

    def error(self, w: Array) -> float:
        """Mean squared error per output element of the effective weight ``w`` (g, D, r)."""
        quad = float(np.sum(w * (self.hessian @ w)))
        lin = float(np.sum(w * self.cross))
        total = quad - 2.0 * lin + self.target_sq
        count = self.rows * w.shape[0] * w.shape[2]
        return max(total, 0.0) / count if count else 0.0


class _Sums:
    """Float64 sums over calibration rows shared by the layers of one group.

    The layers of a group read the same activation rows ``x`` (g, n, d), so they share
    ``H = [x, 1]ᵀ[x, 1]`` (the all-ones bias column is always summed; layers without a bias
    use the leading d x d block); each has its own cross term and target energy.
    """

    def __init__(self, groups: int, width: int, outputs: Sequence[int]) -> None:
        self.width = width
        self.hessian = np.zeros((groups, width + 1, width + 1))
        self.cross = [np.zeros((groups, width + 1, r)) for r in outputs]
        self.target_sq = [0.0 for _ in outputs]
        self.rows = 0

    def add(self, x: Array, ys: Sequence[Array]) -> None:
        """Rows ``x`` (g, n, d) and, per layer, its targets (g, n, r_i)."""
        g, n, d = x.shape
        step = max(1, _CHUNK_BYTES // (8 * g * (d + 1 + max((y.shape[2] for y in ys), default=0))))
        for a in range(0, n, step):
            chunk = x[:, a : a + step].astype(np.float64)
            xc = np.concatenate([chunk, np.ones((g, chunk.shape[1], 1))], axis=2)
            xt = xc.transpose(0, 2, 1)
            self.hessian += xt @ xc
            for i, y in enumerate(ys):
                self.cross[i] += xt @ y[:, a : a + step]
        for i, y in enumerate(ys):
            self.target_sq[i] += float(np.einsum("gnr,gnr->", y, y))
        self.rows += n

    def stats(self, index: int, bias: bool) -> _Stats:
        size = self.width + (1 if bias else 0)
        return _Stats(
            self.hessian[:, :size, :size],
            self.cross[index][:, :size],
            self.target_sq[index],
            self.rows,
        )


# --------------------------------------------------------------------------------------
# Solvers


def _damped(hessian: Array, damping: float, width: int) -> Array:
    """``H + λI`` per group, ``λ = damping * mean(diag(H[:width, :width]))`` on the
    weight inputs; a bias column (index ``width``, when present) gets ``damping`` times its
    own diagonal entry (the row count), so that scaling the activations by any factor
    scales the refit weights by its inverse and leaves the bias unchanged. A zero diagonal
    (all-zero activations) gets 1."""
    out = hessian.copy()
    size = out.shape[1]
    diagonal = np.arange(size)
    means = out[:, diagonal[:width], diagonal[:width]].mean(axis=1) if width else np.zeros(1)
    lam = np.where(means > 0, damping * means, 1.0)
    out[:, diagonal[:width], diagonal[:width]] += lam[:, None]
    if size > width:
        ones = out[:, width, width].copy()
        out[:, width, width] += np.where(ones > 0, damping * ones, 1.0)
    return out


def exact_cost(mask: Array) -> float:
    """Estimated flops of :func:`solve_exact` for a ``(g, D, r)`` keep-mask."""
    g, d, _r = mask.shape
    kept = mask.sum(axis=1)
    m = np.minimum(kept, d - kept).astype(np.float64)
    inverse = float(g) * d**3 if np.any(kept > d - kept) else 0.0
    return float(np.sum(2.0 / 3.0 * m**3 + 2.0 * m * m + 2.0 * d * m)) + inverse


def sparsegpt_cost(mask: Array) -> float:
    """Estimated flops of :func:`solve_sparsegpt` for a ``(g, D, r)`` keep-mask."""
    g, d, r = mask.shape
    return float(g) * (2.0 * d**3 + 2.0 * r * d * d)


def _padded(sets: list[Array], order: Array, start: int, stop: int) -> tuple[Array, Array, Array]:
    """Systems ``order[start:stop]`` as padded index arrays (c, m) and their validity."""
    chosen = order[start:stop]
    m = max(1, max(len(sets[i]) for i in chosen))
    idx = np.zeros((len(chosen), m), dtype=np.int64)
    valid = np.zeros((len(chosen), m), dtype=bool)
    for row, i in enumerate(chosen):
        size = len(sets[i])
        idx[row, :size] = sets[i]
        valid[row, :size] = True
    return chosen, idx, valid


def _chunks(sizes: Array, per_system: Array) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of (size-sorted) systems whose padded memory fits the budget."""
    start, count = 0, len(sizes)
    while start < count:
        stop = start + 1
        while stop < count and (stop + 1 - start) * per_system[stop] <= _CHUNK_BYTES:
            stop += 1
        yield start, stop
        start = stop


def _solve_padded(a: Array, b: Array, valid: Array) -> Array:
    """Solve the padded systems ``a x = b`` (padding rows/cols replaced by identity)."""
    both = valid[:, :, None] & valid[:, None, :]
    a = np.where(both, a, 0.0)
    diagonal = np.arange(a.shape[1])
    a[:, diagonal, diagonal] += ~valid
    rhs = np.where(valid, b, 0.0)
    # A batch of independent factorisations: one BLAS thread each. A thread team per
    # matrix gains little below ~1000 rows and, when the CPUs are shared with other work,
    # makes each factorisation 10-80x slower (measured with OpenBLAS on 2 busy cores).
    with _blas_threads(1):
        return np.linalg.solve(a, rhs[..., None])[..., 0] * valid


@contextmanager
def _blas_threads(limit: int) -> Iterator[None]:
    """Limit BLAS threads inside the block (when threadpoolctl is installed)."""
    if _threadpool_limits is None:
        yield
        return
    with _threadpool_limits(limit, user_api="blas"):
        yield


class Factors:
    """The mask-independent factorisations of one layer's damped Hessian, computed on
    first use and kept: every solve against the same ``damped`` and ``cross`` (the levels of
    a refit-aware curve, :mod:`rdprune_onnx.refit_curves`) reuses them.

    ``inverse`` (g, D, D) = ``(H + λI)⁻¹`` (exact's pruned form, SparseGPT), ``free``
    (g, D, r) = ``inverse @ cross``, the unconstrained optimum, and ``upper(k)``, the upper
    Cholesky factor of group k's (symmetrised) inverse (SparseGPT).
    """

    def __init__(self, damped: Array, cross: Array) -> None:
        self.damped = damped
        self.cross = cross
        self._inverse: Array | None = None
        self._free: Array | None = None
        self._upper: dict[int, Array] = {}

    @property
    def inverse(self) -> Array:
        if self._inverse is None:
            self._inverse = np.linalg.inv(self.damped)
        return self._inverse

    @property
    def free(self) -> Array:
        if self._free is None:
            self._free = self.inverse @ self.cross
        return self._free

    def upper(self, k: int) -> Array:
        """Raises ``np.linalg.LinAlgError`` when the inverse is not positive definite."""
        if k not in self._upper:
            inverse = self.inverse[k]
            self._upper[k] = np.linalg.cholesky((inverse + inverse.T) / 2.0).T
        return self._upper[k]


def solve_exact(damped: Array, cross: Array, mask: Array, factors: Factors | None = None) -> Array:
    """Per output row, the damped least squares restricted to its kept inputs.

    ``damped`` (g, D, D) is ``H + λI``, ``cross`` (g, D, r) is ``X̂ᵀY``, ``mask`` (g, D, r)
    the kept entries. Returns ``W`` (g, D, r), exactly zero where ``mask`` is False.
    ``factors`` (of the same ``damped`` and ``cross``) shares the inverse between calls.
    """
    factors = factors if factors is not None else Factors(damped, cross)
    g, d, r = mask.shape
    out = np.zeros((g, d, r))
    kept_sets: list[Array] = []
    pruned_sets: list[Array] = []
    system_group: list[int] = []
    system_row: list[int] = []
    for k in range(g):
        for j in range(r):
            keep = mask[k, :, j]
            kept_sets.append(np.flatnonzero(keep))
            pruned_sets.append(np.flatnonzero(~keep))
            system_group.append(k)
            system_row.append(j)
    groups = np.array(system_group, dtype=np.int64)
    rows = np.array(system_row, dtype=np.int64)
    kept_size = np.array([len(s) for s in kept_sets], dtype=np.int64)
    pruned_size = d - kept_size
    use_kept = kept_size <= pruned_size

    # Kept form: solve H[S, S] w_S = G[S, j].
    systems = np.flatnonzero(use_kept)
    if systems.size:
        order = systems[np.argsort(kept_size[systems], kind="stable")]
        sizes = kept_size[order]
        per = 8.0 * (np.maximum(sizes, 1) ** 2 + 2 * np.maximum(sizes, 1))
        for start, stop in _chunks(sizes, per):
            chosen, idx, valid = _padded(kept_sets, order, start, stop)
            gs, js = groups[chosen], rows[chosen]
            a = damped[gs[:, None, None], idx[:, :, None], idx[:, None, :]]
            b = cross[gs[:, None], idx, js[:, None]]
            x = _solve_padded(a, b, valid)
            cg = np.broadcast_to(gs[:, None], idx.shape)[valid]
            cj = np.broadcast_to(js[:, None], idx.shape)[valid]
            out[cg, idx[valid], cj] = x[valid]

    # Pruned form: w = w* - Hinv[:, P] (Hinv[P, P])⁻¹ w*[P], w* = Hinv G.
    systems = np.flatnonzero(~use_kept)
    if systems.size:
        inverse = factors.inverse
        free = factors.free  # (g, D, r)
        order = systems[np.argsort(pruned_size[systems], kind="stable")]
        sizes = pruned_size[order]
        per = 8.0 * (np.maximum(sizes, 1) ** 2 + (d + 2) * np.maximum(sizes, 1) + d)
        columns = np.arange(d)
        for start, stop in _chunks(sizes, per):
            chosen, idx, valid = _padded(pruned_sets, order, start, stop)
            gs, js = groups[chosen], rows[chosen]
            a = inverse[gs[:, None, None], idx[:, :, None], idx[:, None, :]]
            b = free[gs[:, None], idx, js[:, None]]
            z = _solve_padded(a, b, valid)
            side = inverse[gs[:, None, None], columns[None, :, None], idx[:, None, :]]
            w = free[gs, :, js] - np.einsum("cdm,cm->cd", side, z)
            out[gs, :, js] = w
    out[~mask] = 0.0
    return out


def _sweep_block(w: Array, block: Array, upper: Array, i1: int, i2: int, keep: Array) -> None:
    """One SparseGPT block, in place: columns ``i1:i2`` of ``w`` (r, d) eliminated in order
    with the upper Cholesky factor of the inverse Hessian, the entries where ``keep`` (r,
    i2 - i1) is False set to zero and their error spread over the block's later columns,
    then the block's errors applied to the columns after it at once (the lazy update)."""
    errors = np.zeros((w.shape[0], i2 - i1))
    hinv = upper[i1:i2, i1:i2]
    for i in range(i2 - i1):
        column = block[:, i]
        quantised = np.where(keep[:, i], column, 0.0)
        err = (column - quantised) / hinv[i, i]
        block[:, i:] -= np.outer(err, hinv[i, i:])
        block[:, i] = quantised
        errors[:, i] = err
    w[:, i1:i2] = block
    if i2 < w.shape[1]:
        w[:, i2:] -= errors @ upper[i1:i2, i2:]


def solve_sparsegpt(
    damped: Array,
    cross: Array,
    mask: Array,
    block_size: int = BLOCK_SIZE,
    factors: Factors | None = None,
) -> Array:
    """SparseGPT's blockwise OBS reconstruction with a fixed mask (see the module doc).

    Same arguments and result as :func:`solve_exact`. Raises ``np.linalg.LinAlgError``
    when the damped Hessian is not positive definite.
    """
    factors = factors if factors is not None else Factors(damped, cross)
    g, d, r = mask.shape
    out = np.zeros((g, d, r))
    for k in range(g):
        upper = factors.upper(k)  # inverse = upperᵀ upper
        w = np.ascontiguousarray(factors.free[k].T)  # (r, d): one row per output row
        keep = mask[k].T
        for i1 in range(0, d, block_size):
            i2 = min(i1 + block_size, d)
            block = w[:, i1:i2].copy()
            _sweep_block(w, block, upper, i1, i2, keep[:, i1:i2])
        out[k] = w.T
    out[~mask] = 0.0
    return out


def block_quotas(eligible: Array, count: int) -> Array:
    """Split ``count`` over units holding ``eligible`` candidates each, proportionally to
    ``eligible``, by largest remainder (equal remainders: the lower index first). Exact
    integer arithmetic; every quota is at most its unit's ``eligible``."""
    eligible = np.asarray(eligible, dtype=np.int64)
    total = int(eligible.sum())
    if not 0 <= count <= total:
        raise ValueError(f"cannot choose {count} of {total} entries")
    if total == 0:
        return np.zeros_like(eligible)
    scaled = eligible * count
    quotas = scaled // total
    remainders = scaled - quotas * total
    left = count - int(quotas.sum())
    order = np.lexsort((np.arange(len(eligible)), -remainders))
    quotas[order[:left]] += 1
    return quotas


def solve_sparsegpt_select(
    damped: Array,
    dense_eff: Array,
    count: int,
    *,
    cross: Array | None = None,
    prunable: Array | None = None,
    block_size: int = BLOCK_SIZE,
    factors: Factors | None = None,
) -> tuple[Array, Array]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): choose the mask AND update the
    kept weights in one blockwise OBS sweep.

    ``damped`` (g, D, D) is ``H + λI``; ``dense_eff`` (g, D, r) the dense weight in the
    effective layout (with the bias row last when a bias is refit); ``count`` the number of
    entries to zero in total over all groups. ``prunable`` (D,) marks the rows that may be
    pruned (False for a bias row: never pruned, only updated); default all.

    The sweep starts from ``(H + λI)⁻¹ cross`` when ``cross`` is given (reconstruct
    passes ``G + λ W``: the optimum of ``|X̂ W' - Y|² + λ|W' - W|²``, which is W itself
    on dense statistics and compensates upstream error on sequential ones), else from
    ``dense_eff`` itself (the reference implementation).
    Inputs are processed in blocks of ``block_size`` columns with lazy batch updates, using
    the upper Cholesky factor U of ``(H + λI)⁻¹``. At the start of each block the entries
    to prune are those of least OBS saliency ``w² / U_jj²`` over the whole block (all
    output rows x block columns, the weights as updated so far; equal saliencies: the lower
    (input, row) index first). Entries that are zero in ``dense_eff`` are pruned first and
    stay zero; the rest of ``count`` is split over the (group, block) units proportionally
    to their nonzero prunable entries (= to block size when the dense weight has no zeros)
    by :func:`block_quotas`, so the total is exactly ``count``.

    Returns ``(weight, keep)``, both (g, D, r); ``weight`` is exactly 0 where ``keep`` is
    False. Raises ``ValueError`` when ``count`` is below the dense zeros or above the
    prunable entries, ``np.linalg.LinAlgError`` when ``damped`` is not positive definite.
    """
    g, d, r = dense_eff.shape
    if factors is None:
        factors = Factors(damped, cross if cross is not None else np.zeros((g, d, r)))
    start = factors.inverse @ cross if cross is not None else dense_eff.astype(np.float64)
    rows_ok = np.ones(d, dtype=bool) if prunable is None else np.asarray(prunable, dtype=bool)
    allowed = np.broadcast_to(rows_ok[None, :, None], (g, d, r))
    zero = allowed & (dense_eff == 0)
    eligible = allowed & ~zero
    units = [(k, i1, min(i1 + block_size, d)) for k in range(g) for i1 in range(0, d, block_size)]
    quotas = block_quotas(
        np.array([int(eligible[k, i1:i2].sum()) for k, i1, i2 in units], dtype=np.int64),
        count - int(zero.sum()),
    )
    keep = np.ones((g, d, r), dtype=bool)
    out = np.zeros((g, d, r))
    unit = 0
    for k in range(g):
        upper = factors.upper(k)  # inverse = upperᵀ upper
        diagonal = np.diag(upper)
        w = np.ascontiguousarray(start[k].T)  # (r, D): one row per output row
        for i1 in range(0, d, block_size):
            i2 = min(i1 + block_size, d)
            quota = int(quotas[unit])
            unit += 1
            block = w[:, i1:i2].copy()
            # Saliency in (input, row) order, the effective layout's, for the tie-break.
            saliency = (block / diagonal[i1:i2]).T ** 2
            candidates = np.flatnonzero(eligible[k, i1:i2])
            order = np.argsort(saliency.reshape(-1)[candidates], kind="stable")
            prune = zero[k, i1:i2].copy()
            prune.reshape(-1)[candidates[order[:quota]]] = True
            keep[k, i1:i2] = ~prune
            _sweep_block(w, block, upper, i1, i2, ~prune.T)
        out[k] = w.T
    out[~keep] = 0.0
    return out, keep


def choose_solver(mask: Array) -> str:
    """The ``auto`` rule (see the module doc) for a ``(g, D, r)`` keep-mask."""
    cost = exact_cost(mask)
    if cost <= EXACT_MAX_FLOPS or cost <= EXACT_FLOP_FACTOR * sparsegpt_cost(mask):
        return "exact"
    return "sparsegpt"


# --------------------------------------------------------------------------------------
# ONNX Runtime plumbing


def _fetch_model(typed: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``typed`` with ``names`` as its only outputs and only the nodes that compute them."""
    try:
        model = with_outputs(typed, names)
    except KeyError:  # no inferred type: ORT infers it from the producing node
        model = onnx.ModelProto()
        model.CopyFrom(typed)
        existing = {o.name for o in model.graph.output}
        for name in names:
            if name not in existing:
                model.graph.output.append(helper.make_empty_tensor_value_info(name))
    graph = model.graph
    wanted = list(dict.fromkeys(names))
    outputs = {o.name: o for o in graph.output}
    needed = set(wanted)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed |= node_inputs(node)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.output[:]
    graph.output.extend(outputs[n] for n in wanted)
    return model


class _Fetcher:
    """Runs a model for some of its tensors (graph inputs are taken from the feeds)."""

    def __init__(
        self, model: onnx.ModelProto, names: Sequence[str], feeds: set[str], config: SessionConfig
    ) -> None:
        self.names = list(dict.fromkeys(names))
        self.computed = [n for n in self.names if n not in feeds]
        self.session = (
            Session(_fetch_model(model, self.computed), config) if self.computed else None
        )

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        values = {n: np.asarray(feeds[n]) for n in self.names if n in feeds}
        if self.session is not None:
            got = self.session.run(feeds, self.computed)
            values.update(zip(self.computed, got, strict=True))
        return values


class _DenseTargets:
    """The dense model's outputs of the refit nodes, per calibration batch.

    When all of them fit in ``DENSE_CACHE_BYTES`` they come from one dense pass, kept for
    every layer; otherwise each group of layers runs the dense model up to its nodes again.
    """

    def __init__(self, ctx: _Context, names: Sequence[str]) -> None:
        self.cache: list[dict[str, Array]] | None = None
        feeds_names = set(ctx.data)
        first = next(batches(ctx.data, ctx.batch_size), None)
        if not names or first is None:
            return
        fetcher = _Fetcher(ctx.typed, names, feeds_names, ctx.config)
        values = fetcher.run(first)
        count = -(-sample_count(ctx.data) // ctx.batch_size)
        size = sum(v.nbytes for k, v in values.items() if k not in feeds_names) * count
        if size > DENSE_CACHE_BYTES:
            log.info("dense targets take %.0f MiB: recomputed per layer", size / 2**20)
            return
        self.cache = [values] + [
            fetcher.run(feeds) for feeds in islice(batches(ctx.data, ctx.batch_size), 1, None)
        ]


# --------------------------------------------------------------------------------------
# The refit


def _rows_key(p: _Plan) -> tuple[object, ...]:
    """Uses with equal keys read the same activation rows (one Hessian serves them all)."""
    return (p.kind, p.activation, p.act_transpose, p.group, p.conv)


def _graph_order(g: _Graph, layers: Sequence[Layer]) -> list[Layer]:
    def key(layer: Layer) -> int:
        positions = [g.position.get(u.node, len(g.nodes)) for u in layer.uses if not u.graph]
        return min(positions, default=len(g.nodes))

    return sorted(layers, key=key)


def _cast_weight(eff: Array, plan: _Plan, original: Array, keep: Array) -> Array:
    """The effective refit weight in the original layout and dtype; zeros where pruned,
    nonzero where kept (a kept value that rounds to 0 becomes the smallest subnormal)."""
    wide = _from_effective(eff, plan, original.shape)
    cast = np.where(keep, wide, 0.0).astype(original.dtype)
    lost = keep & (cast == 0)
    if np.any(lost):
        tiny = np.finfo(original.dtype).smallest_subnormal
        sign = np.where(wide[lost] < 0, -1.0, 1.0)
        cast[lost] = (sign * tiny).astype(original.dtype)
    return cast


def _effective_with_bias(weight: Array, bias: Array | None, plan: _Plan) -> Array:
    eff = _to_effective(weight, plan)
    if bias is None:
        return eff
    return np.concatenate([eff, _bias_to_effective(bias, plan)[:, None, :]], axis=1)


@dataclass
class _Context:
    """What every layer's refit needs."""

    typed: onnx.ModelProto  # the dense model, type-inferred
    graph: _Graph
    data: Mapping[str, Array]
    batch_size: int
    config: SessionConfig
    solver: str
    damping: float
    select: bool = False
    inputs: str = "sequential"
    token_mask: str | None = None  # the attention-mask input, if any (see _real_rows)
    select_refits: bool = True


@dataclass
class _Todo:
    """A layer to refit, with its plans."""

    name: str
    index: int  # position in the report
    plans: list[_Plan]
    masked: Array
    bias: Array | None  # the dense value of the bias refit with it
    dense: Array  # the dense weight

    @property
    def rows_key(self) -> tuple[object, ...] | None:
        """Layers with equal keys read the same activation rows (None: never grouped)."""
        if len(self.plans) != 1:
            return None
        return _rows_key(self.plans[0])


@dataclass
class _Refit:
    info: LayerRefit
    weight: Array | None = None  # None: keep the masked weight
    bias: Array | None = None


def reconstruct(
    model: onnx.ModelProto,
    pruned: Mapping[str, Array],
    layers: Sequence[Layer],
    data: Mapping[str, Array],
    *,
    batch_size: int = 32,
    config: SessionConfig | None = None,
    solver: str = "auto",
    damping: float = DAMPING,
    refit_bias: bool = True,
    progress: bool = False,
    select: bool = False,
    inputs: str = "sequential",
    select_refits: bool = True,
) -> Reconstruction:
    """Refit the kept weights of ``layers`` after masking (see the module doc).

    ``model`` is the dense model; ``pruned`` maps weight names to their masked values
    (zeros = pruned); ``data`` holds the calibration inputs (first axis = samples). Layers
    are visited in graph order, each fed by the model whose upstream layers are already
    refit; consecutive layers reading the same activation (Q/K/V projections) share one
    pass over the data. Layers of ``layers`` missing from ``pruned`` are left dense and not
    reported; entries of ``pruned`` that are not refit are returned as given.

    ``select=True`` (SparseGPT): each layer keeps the NUMBER of zeros of ``pruned[name]``
    but the zeros are re-chosen, with the kept weights updated, by
    :func:`solve_sparsegpt_select` from the dense weight and the layer's Hessian. The
    result is kept only when its calibration error is below that of the given mask refit
    (else the given mask's result is kept and ``reason`` says so); the method reported is
    ``"sparsegpt-select"``. ``select_refits=False`` skips the two fixed-mask solves of
    :func:`select_refit` (SparseGPT's own weights, checked against plain masking only).

    ``inputs``: ``"sequential"`` (H and targets from the model pruned and refit so far,
    X̂) or ``"dense"`` (H from the dense model's activations X, in one pass for all layers;
    the targets follow from the dense weight, ``G = H W``).
    """
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}", f"choose one of {', '.join(SOLVERS)}")
    if inputs not in INPUTS:
        raise UserError(f"unknown refit inputs {inputs!r}", f"choose one of {', '.join(INPUTS)}")
    if damping < 0:
        raise UserError(f"damping must be >= 0, got {damping}", "e.g. 0.01")
    typed = infer_types(model)
    ctx = _Context(
        typed,
        _Graph(typed),
        data,
        batch_size,
        config or SessionConfig(),
        solver,
        damping,
        select,
        inputs,
        token_mask_name(data),
        select_refits,
    )
    if ctx.token_mask is not None:
        log.info("refit rows: padding excluded by the %r input", ctx.token_mask)
    weights: dict[str, Array] = {name: np.asarray(w) for name, w in pruned.items()}
    biases: dict[str, Array] = {}
    current = replace_weights(typed, weights)
    ordered = [layer for layer in _graph_order(ctx.graph, layers) if layer.name in pruned]
    results: list[LayerRefit | None] = [None] * len(ordered)
    todo: list[_Todo] = []
    for index, layer in enumerate(ordered):
        prepared = _prepare(ctx, layer, weights[layer.name], refit_bias, index)
        if isinstance(prepared, LayerRefit):
            results[index] = prepared
        else:
            todo.append(prepared)
    with tqdm(
        total=len(ordered), disable=not progress, desc="refit", unit="layer", leave=False
    ) as bar:
        bar.update(len(ordered) - len(todo))
        if inputs == "dense":
            groups = list(_groups(todo))
            steps: Iterator[tuple[list[_Todo], list[_Refit]]] = _refit_dense(ctx, groups)
        else:
            dense = _DenseTargets(ctx, [p.output for item in todo for p in item.plans])
            # lazy: each group's pass reads ``current`` as refit up to the group before
            steps = ((group, _refit_group(ctx, group, current, dense)) for group in _groups(todo))
        for group, refits in steps:
            update: dict[str, Array] = {}
            for item, refit in zip(group, refits, strict=True):
                info = results[item.index] = refit.info
                _log(info)
                if refit.weight is None:
                    continue
                weights[item.name] = update[item.name] = refit.weight
                if refit.bias is not None and info.bias is not None:
                    biases[info.bias] = update[info.bias] = refit.bias
            if update and inputs == "sequential":
                current = replace_weights(current, update)
            bar.update(len(group))
    return Reconstruction(weights, biases, [r for r in results if r is not None])


def _log(info: LayerRefit) -> None:
    log.info(
        "refit %s: %s, error %.4g -> %.4g (%.2f s)%s",
        info.name,
        info.method,
        info.error_before,
        info.error_after,
        info.seconds,
        f" [{info.reason}]" if info.reason else "",
    )


def _skipped(name: str, reason: str) -> LayerRefit:
    return LayerRefit(name, "skipped", math.nan, math.nan, 0.0, reason)


def _prepare(
    ctx: _Context, layer: Layer, masked: Array, refit_bias: bool, index: int
) -> _Todo | LayerRefit:
    found = ctx.graph.constant(layer.name)
    if found is None:
        return _skipped(layer.name, "weight is not a constant of the main graph")
    dense = found[1]
    if masked.shape != dense.shape or masked.dtype != dense.dtype:
        raise UserError(
            f"pruned weight {layer.name!r} is {masked.dtype}{list(masked.shape)}, "
            f"the model's is {dense.dtype}{list(dense.shape)}",
            "pass the masked weights of this model",
        )
    if np.array_equal(masked, dense):
        return _skipped(layer.name, "mask removes nothing; unchanged")
    plans = _plan_layer(ctx.graph, layer, refit_bias)
    if isinstance(plans, str):
        return _skipped(layer.name, plans)
    bias: Array | None = None
    if plans[0].bias is not None:
        found = ctx.graph.constant(plans[0].bias)
        assert found is not None
        bias = found[1]
    return _Todo(layer.name, index, plans, masked, bias, dense)


def _groups(todo: Sequence[_Todo]) -> Iterator[list[_Todo]]:
    """Runs of consecutive layers that read the same activation rows.

    Such layers are siblings (none feeds another's input), so their inputs are final
    before any of them is refit.
    """
    group: list[_Todo] = []
    for item in todo:
        if group and (item.rows_key is None or item.rows_key != group[0].rows_key):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _refit_group(
    ctx: _Context, group: list[_Todo], current: onnx.ModelProto, dense: _DenseTargets
) -> list[_Refit]:
    started = time.perf_counter()
    plans = group[0].plans
    feeds_names = set(ctx.data)
    targets: _Fetcher | None = None
    if dense.cache is None:
        outputs = [p.output for item in group for p in item.plans]
        targets = _Fetcher(ctx.typed, outputs, feeds_names, ctx.config)
    inputs = _Fetcher(current, [p.activation for p in plans], feeds_names, ctx.config)
    sums: _Sums | None = None
    for b, feeds in enumerate(batches(ctx.data, ctx.batch_size)):
        if targets is not None:
            dense_out = targets.run(feeds)
        else:
            assert dense.cache is not None
            dense_out = dense.cache[b]
        current_in = inputs.run(feeds)
        token = feeds.get(ctx.token_mask) if ctx.token_mask is not None else None
        for k, plan in enumerate(plans):
            ys = [
                _target_rows(item.plans[k], dense_out[item.plans[k].output], item.bias)
                for item in group
            ]
            act = current_in[plan.activation]
            real = _real_rows(plan, act, token)
            for rows, x in _input_rows(plan, act):
                chunk = [y[:, rows] for y in ys]
                if real is not None:
                    x, chunk = x[:, real[rows]], [y[:, real[rows]] for y in chunk]
                if sums is None:
                    sums = _Sums(x.shape[0], x.shape[2], [y.shape[2] for y in ys])
                sums.add(x, chunk)
    shared = (time.perf_counter() - started) / len(group)
    refits: list[_Refit] = []
    for i, item in enumerate(group):
        solve_started = time.perf_counter()
        if sums is None:
            refit = _Refit(_skipped(item.name, "no calibration rows"))
        else:
            refit = _solve_layer(ctx, item, sums.stats(i, item.bias is not None))
        refit.info.seconds = shared + time.perf_counter() - solve_started
        refits.append(refit)
    return refits


def _refit_dense(
    ctx: _Context, groups: list[list[_Todo]]
) -> Iterator[tuple[list[_Todo], list[_Refit]]]:
    """``inputs="dense"``: every group's Hessian from the dense model's activations, in one
    pass over the data for as many groups as fit in ``DENSE_CACHE_BYTES``."""
    chunk: list[list[_Todo]] = []
    used = 0
    for group in groups:
        g, d, _r = _to_effective(group[0].masked, group[0].plans[0]).shape
        size = 8 * g * (d + 2) ** 2
        if chunk and used + size > DENSE_CACHE_BYTES:
            yield from _refit_dense_chunk(ctx, chunk)
            chunk, used = [], 0
        chunk.append(group)
        used += size
    if chunk:
        yield from _refit_dense_chunk(ctx, chunk)


def _refit_dense_chunk(
    ctx: _Context, chunk: list[list[_Todo]]
) -> Iterator[tuple[list[_Todo], list[_Refit]]]:
    started = time.perf_counter()
    all_sums = dense_sums(
        ctx.typed,
        [group[0].plans for group in chunk],
        ctx.data,
        batch_size=ctx.batch_size,
        config=ctx.config,
        token_mask=ctx.token_mask,
    )
    shared = (time.perf_counter() - started) / sum(len(group) for group in chunk)
    for group, sums in zip(chunk, all_sums, strict=True):
        refits: list[_Refit] = []
        for item in group:
            solve_started = time.perf_counter()
            if sums is None:
                refit = _Refit(_skipped(item.name, "no calibration rows"))
            else:
                stats = dense_stats(sums, item.dense, item.bias, item.plans[0])
                refit = _solve_layer(ctx, item, stats)
            refit.info.seconds = shared + time.perf_counter() - solve_started
            refits.append(refit)
        yield group, refits


def dense_sums(
    typed: onnx.ModelProto,
    plan_lists: Sequence[Sequence[_Plan]],
    data: Mapping[str, Array],
    *,
    batch_size: int,
    config: SessionConfig,
    token_mask: str | None = None,
) -> list[_Sums | None]:
    """``[X, 1]ᵀ[X, 1]`` over the dense activations of every use, for each list of plans
    (one list per weight or per group of weights reading the same rows), in one data pass
    (padding rows excluded when ``token_mask`` names the attention-mask input)."""
    names = [p.activation for plans in plan_lists for p in plans]
    fetcher = _Fetcher(typed, names, set(data), config)
    all_sums: list[_Sums | None] = [None] * len(plan_lists)
    for feeds in batches(data, batch_size):
        values = fetcher.run(feeds)
        token = feeds.get(token_mask) if token_mask is not None else None
        for i, plans in enumerate(plan_lists):
            for plan in plans:
                act = values[plan.activation]
                real = _real_rows(plan, act, token)
                for rows, x in _input_rows(plan, act):
                    if real is not None:
                        x = x[:, real[rows]]
                    sums = all_sums[i]
                    if sums is None:
                        sums = all_sums[i] = _Sums(x.shape[0], x.shape[2], [])
                    sums.add(x, [])
    return all_sums


def dense_stats(sums: _Sums, weight: Array, bias: Array | None, plan: _Plan) -> _Stats:
    """The refit statistics against the dense layer's own output on dense inputs.

    The target is ``Y = [X, 1] [W; b]`` (what the dense node computes, less any fixed
    offset), so ``G = H [W; b]`` and ``ΣY² = tr([W; b]ᵀ G)`` need no pass over the outputs.
    """
    size = sums.width + (1 if bias is not None else 0)
    hessian = sums.hessian[:, :size, :size]
    dense = _effective_with_bias(weight, bias, plan)
    cross = hessian @ dense
    return _Stats(hessian, cross, float(np.sum(dense * cross)), sums.rows)


def _solve_layer(ctx: _Context, item: _Todo, stats: _Stats) -> _Refit:
    plan = item.plans[0]
    width = stats.hessian.shape[1]
    d = width - (1 if item.bias is not None else 0)
    _warn_few_rows(item.name, stats.rows, width)
    factors = Factors(_damped(stats.hessian, ctx.damping, d), stats.cross)
    if ctx.select:
        return select_refit(
            item.name,
            plan,
            item.dense,
            item.masked,
            item.bias,
            stats,
            ctx.solver,
            factors,
            refits=ctx.select_refits,
        )
    return _refit_masked(item.name, plan, item.masked, item.bias, stats, ctx.solver, factors)


def select_refit(
    name: str,
    plan: _Plan,
    dense: Array,
    masked: Array,
    bias: Array | None,
    stats: _Stats,
    solver: str,
    factors: Factors,
    refits: bool = True,
) -> _Refit:
    """SparseGPT selection at the zero count of ``masked`` (see :func:`reconstruct`).

    Three candidates are scored on ``stats``: the given mask's refit (``solver``; or the
    plain given mask when that refit does not help), the selected mask with SparseGPT's
    own updated weights, and the selected mask refit by ``solver`` (the exact solver is
    optimal for a fixed mask, SparseGPT's sweep only approximately so). The lowest error
    wins; ``reason`` says what was kept when it is not SparseGPT's own result.
    ``refits=False`` skips both solves (SparseGPT alone, O(d³ + r d²)): SparseGPT's
    weights are then kept unless worse than the plain given mask.
    """
    if refits:
        given = _refit_masked(name, plan, masked, bias, stats, solver, factors)
    else:
        error = stats.error(_effective_with_bias(masked, bias, plan))
        given = _Refit(LayerRefit(name, "mask", error, error, 0.0))
    info = LayerRefit(name, SELECT_METHOD, given.info.error_before, given.info.error_after, 0.0)
    info.bias = given.info.bias
    kept = "the given mask" + (f" ({given.info.method} refit)" if given.weight is not None else "")
    fallback = _Refit(info, given.weight, given.bias)
    eff = _effective_with_bias(dense, bias, plan)
    width = eff.shape[1]
    d = width - (1 if bias is not None else 0)
    diagonal = np.arange(width)
    lam = factors.damped[:, diagonal, diagonal] - stats.hessian[:, diagonal, diagonal]
    try:
        solved, keep_eff = solve_sparsegpt_select(
            factors.damped,
            eff,
            int(np.count_nonzero(masked == 0)),
            cross=stats.cross + lam[:, :, None] * eff,
            prunable=diagonal < d,
            factors=factors,
        )
    except (np.linalg.LinAlgError, ValueError) as exc:
        info.reason = f"selection failed ({exc}); kept {kept}"
        return fallback
    keep = _from_effective(keep_eff[:, :d].astype(np.float64), plan, dense.shape) != 0
    weight = _cast_weight(solved[:, :d], plan, dense, keep)
    new_bias: Array | None = None
    if bias is not None:
        new_bias = _bias_from_effective(solved[:, d], plan).astype(bias.dtype)
    error = math.inf
    if np.all(np.isfinite(weight)) and (new_bias is None or np.all(np.isfinite(new_bias))):
        error = stats.error(_effective_with_bias(weight, new_bias, plan))
    selected = np.where(keep, dense, np.zeros_like(dense))
    again = _refit_masked(name, plan, selected, bias, stats, solver, factors) if refits else None
    if again is not None and again.weight is not None and again.info.error_after < error:
        weight, new_bias, error = again.weight, again.bias, again.info.error_after
        info.reason = f"selected mask, weights by the {again.info.method} refit"
    if not error < given.info.error_after:
        info.reason = f"selected mask not better (error {error:.4g}); kept {kept}"
        return fallback
    info.error_after = error
    info.bias = plan.bias
    return _Refit(info, weight, new_bias)


def _warn_few_rows(name: str, rows: int, width: int) -> None:
    if rows < width:
        log.warning(
            "%s: %d calibration rows for %d inputs; the refit may fit the calibration data "
            "rather than the layer (use more samples or a larger damping)",
            name,
            rows,
            width,
        )


def _keep_mask(masked: Array, plan: _Plan, bias: bool) -> Array:
    """The ``(g, D, r)`` keep-mask of a masked weight (zeros = pruned), bias row kept."""
    mask = _to_effective(masked != 0, plan) != 0
    if bias:
        groups, _d, r = mask.shape
        mask = np.concatenate([mask, np.ones((groups, 1, r), dtype=bool)], axis=1)
    return mask


def _refit_masked(
    name: str,
    plan: _Plan,
    masked: Array,
    bias: Array | None,
    stats: _Stats,
    solver: str,
    factors: Factors,
) -> _Refit:
    """Refit ``masked`` (and ``bias``) on ``stats`` with the damped Hessian's ``factors``;
    the plain mask (and the original bias) when the refit does not lower the error."""
    keep = masked != 0
    mask = _keep_mask(masked, plan, bias is not None)
    d = mask.shape[1] - (1 if bias is not None else 0)
    error_before = stats.error(_effective_with_bias(masked, bias, plan))
    method = solver if solver != "auto" else choose_solver(mask)
    info = LayerRefit(name, method, error_before, error_before, 0.0)
    try:
        if method == "exact":
            solved = solve_exact(factors.damped, factors.cross, mask, factors)
        else:
            solved = solve_sparsegpt(factors.damped, factors.cross, mask, factors=factors)
    except np.linalg.LinAlgError as exc:
        info.reason = f"solver failed ({exc}); kept mask"
        return _Refit(info)
    weight = _cast_weight(solved[:, :d], plan, masked, keep)
    new_bias: Array | None = None
    if bias is not None:
        new_bias = _bias_from_effective(solved[:, d], plan).astype(bias.dtype)
    if not np.all(np.isfinite(weight)) or (
        new_bias is not None and not np.all(np.isfinite(new_bias))
    ):
        info.reason = "refit overflows the weight dtype; kept mask"
        return _Refit(info)
    error_after = stats.error(_effective_with_bias(weight, new_bias, plan))
    if not error_after < error_before:
        info.reason = "refit did not help; kept mask"
        return _Refit(info)
    info.error_after = error_after
    info.bias = plan.bias
    return _Refit(info, weight, new_bias)
