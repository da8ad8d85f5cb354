"""Compact storage of pruned weights: a file that shrinks with sparsity.

``compact_weights`` replaces each named weight initializer by a few small ordinary
initializers plus standard ONNX nodes that rebuild the dense tensor under the weight's
original name, so every consumer of the weight is unchanged. Three encodings, chosen per
weight (the smallest wins):

``bitmask``
    the kept values (in the weight's dtype, after one leading zero) and a bit mask packed
    eight positions to a uint8 byte, most significant bit first (``numpy.packbits``).
    Rebuild: ``BitShift`` left by 0..7 then right by 7 unpacks the bits,
    ``Reshape``/``Slice`` flatten them to the weight's length, ``CumSum`` of the mask times
    the mask gives each kept position the 1-based rank of its value and every other
    position 0, and ``Gather`` from the values (whose entry 0 is the zero) builds the flat
    weight; a last ``Reshape`` gives it its shape. Costs one bit per weight plus the values.
``delta``
    the kept values and the gaps between their flat positions as uint8 (a gap over 255 is
    bridged by extra entries of gap 255 and value 0, which land on zero positions).
    Rebuild: ``Cast`` to int64, ``CumSum``, ``Reshape`` to ``[k, 1]`` and ``ScatterND`` into
    ``ConstantOfShape`` zeros, then ``Reshape``. Costs one byte per kept weight plus the
    values: smaller than ``bitmask`` above about 87.5 % sparsity.
``zeros``
    an all-zero weight is just ``ConstantOfShape``.

"Zero" means all bits zero: a ``-0.0`` (or NaN) weight is kept as a value, so the rebuilt
tensor equals the dense one bit for bit.

Why these ops (measured with onnxruntime 1.32, CPU):

* Every intermediate has a shape that ONNX shape inference derives from the initializers,
  and ONNX Runtime's constant folding (an ``ORT_ENABLE_BASIC`` optimisation, so on by
  default) folds the whole rebuild once at session load: the optimised model holds the
  weight as an initializer and none of the rebuild nodes. A ``NonZero``-based rebuild
  does *not* fold: since onnxruntime 1.27 constant folding skips any node whose output size
  cannot be estimated before it runs ("output size could not be estimated before
  execution"), and ``NonZero``'s output size depends on the data, so the rebuild would run
  on every inference.
* Folding also refuses nodes whose output exceeds 1 GiB (onnxruntime's default
  ``optimization.constant_folding_max_output_size_in_bytes``), so a weight whose rebuild
  has an intermediate over 1 GiB is left dense (with a warning).
* All ops exist from opset 11 on, with unchanged semantics through opset 21+; models with a
  lower ``ai.onnx`` opset are left unchanged (with a warning), the opset is never changed.
* ONNX sparse initializers are smaller to describe but fail ``onnx.checker`` when they feed
  Conv/Gemm and need int64 indices (see ``scripts/bench_storage.py``).

Scope: only initializers of the main graph are compacted (a main-graph initializer that a
subgraph reads from the outer scope is fine: the rebuilt value is visible there too).
Constant-node weights, initializers declared inside subgraphs, initializers that are also
graph inputs (overridable, so not foldable), tensors in external data that was not loaded,
non-float tensors and models with IR version < 4 (whose initializers must all be graph
inputs) stay dense. Sessions built with graph optimisations disabled
(``ORT_DISABLE_ALL``) run the rebuild on every inference.

``densify`` reverses ``compact_weights`` by evaluating the rebuild nodes in numpy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx.graph.external import is_external, is_lazy, nbytes, tensor_array
from rdprune_onnx.graph.walk import iter_graphs

log = logging.getLogger(__name__)

STORAGES = ("dense", "compact")
ENCODINGS = ("bitmask", "delta", "zeros")
MIN_OPSET = 11
# The model metadata key listing the compacted weights and their encodings (JSON object).
METADATA_KEY = "rdprune_onnx.compact"
# onnxruntime's default cap on one constant-folded output (PR #28055: 1 GiB).
FOLD_LIMIT_BYTES = 2**30
_SUPPORTED_TYPES = (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE)
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_MAX_GAP = 255  # the largest position gap one uint8 delta holds
_SEP = "::compact/"  # joins a weight name and the name of one part of its rebuild


@dataclass
class _Shared:
    """Small constants shared by every rebuild in a model, created on first use."""

    names: dict[str, str]
    tensors: list[onnx.TensorProto]
    taken: set[str]

    def get(self, key: str, array: np.ndarray) -> str:
        if key not in self.names:
            name = _unique(f"rdprune_compact/{key}", self.taken)
            self.names[key] = name
            self.tensors.append(numpy_helper.from_array(array, name))
        return self.names[key]


@dataclass
class _Rebuild:
    """The initializers and nodes that rebuild one weight."""

    encoding: str
    initializers: list[onnx.TensorProto]
    nodes: list[onnx.NodeProto]
    peak_bytes: int  # the largest tensor the rebuild computes (the folding cap applies)

    @property
    def byte_size(self) -> int:
        return sum(t.ByteSize() for t in self.initializers) + sum(n.ByteSize() for n in self.nodes)


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        candidate = f"{name}_{k}"
        k += 1
    taken.add(candidate)
    return candidate


def _all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name used anywhere in the model (all scopes)."""
    names: set[str] = set()
    for graph in iter_graphs(model.graph):
        names.update(t.name for t in graph.initializer)
        names.update(t.values.name for t in graph.sparse_initializer)
        names.update(v.name for v in graph.input)
        names.update(v.name for v in graph.output)
        names.update(v.name for v in graph.value_info)
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def _used_names(model: onnx.ModelProto) -> set[str]:
    """Names read by a node (any scope) or exposed as a graph output."""
    used: set[str] = set()
    for graph in iter_graphs(model.graph):
        for node in graph.node:
            used.update(node.input)
        used.update(v.name for v in graph.output)
    return used


def default_opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            data = json.loads(prop.value)
            if isinstance(data, dict):
                return {str(k): str(v) for k, v in data.items()}
    return {}


def _write_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if entries:
        model.metadata_props.append(
            onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(entries))
        )


def compacted_weights(model: onnx.ModelProto) -> dict[str, str]:
    """The weights ``compact_weights`` rebuilt in this model, with their encodings."""
    return _read_metadata(model)


def _nonzero_mask(array: np.ndarray) -> np.ndarray:
    """True where the element's bits are not all zero (so -0.0 and NaN are kept)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return np.asarray(flat.view(_UNSIGNED[flat.dtype.itemsize]) != 0)


def _delta_encode(positions: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 position gaps, with extra (255, 0) entries bridging gaps over 255."""
    gaps = np.diff(positions, prepend=0).astype(np.int64)
    if gaps.size:
        gaps[0] = positions[0]
    bridges = np.where(gaps > 0, (gaps - 1) // _MAX_GAP, 0)
    ends = np.cumsum(bridges + 1) - 1
    total = int(ends[-1]) + 1 if ends.size else 0
    deltas = np.full(total, _MAX_GAP, np.uint8)
    deltas[ends] = (gaps - bridges * _MAX_GAP).astype(np.uint8)
    stored = np.zeros(total, values.dtype)
    stored[ends] = values
    return deltas, stored


def _shape_tensor(dims: Sequence[int], name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(list(dims), np.int64), name)


def _build(
    name: str,
    array: np.ndarray,
    shared: _Shared,
    taken: set[str],
    encoding: str | None = None,
) -> _Rebuild:
    """The rebuild of one weight: the smallest encoding, or the one asked for."""
    size = int(array.size)
    itemsize = array.dtype.itemsize
    mask = _nonzero_mask(array)
    positions = np.flatnonzero(mask)
    values = np.ascontiguousarray(array).reshape(-1)[positions]
    kept = int(positions.size)

    def part(label: str) -> str:
        return _unique(f"{name}{_SEP}{label}", taken)

    if kept == 0:  # whatever the encoding asked for
        shape = part("shape")
        zero = numpy_helper.from_array(np.zeros(1, array.dtype), "value")
        fill = helper.make_node("ConstantOfShape", [shape], [name], name=part("zeros"), value=zero)
        return _Rebuild("zeros", [_shape_tensor(array.shape, shape)], [fill], size * itemsize)

    packed = (size + 7) // 8
    bitmask_bytes = packed + (kept + 1) * itemsize
    deltas, stored = _delta_encode(positions, values)
    delta_bytes = int(deltas.size) * (1 + itemsize)
    if encoding is None:
        encoding = "delta" if delta_bytes < bitmask_bytes else "bitmask"
    final_shape = part("shape")
    initializers = [_shape_tensor(array.shape, final_shape)]
    flat = part("flat")
    if encoding == "delta":
        parts, nodes, peak = _delta_rebuild(deltas, stored, size, shared, part, flat)
    elif encoding == "bitmask":
        parts, nodes, peak = _bitmask_rebuild(mask, values, shared, part, flat)
    else:
        raise ValueError(f"unknown encoding {encoding!r} (or it does not fit this weight)")
    initializers += parts
    nodes.append(helper.make_node("Reshape", [flat, final_shape], [name], name=part("rebuild")))
    return _Rebuild(encoding, initializers, nodes, peak)


_Part = Callable[[str], str]  # a unique name for one part of a weight's rebuild
_Nodes = tuple[list[onnx.TensorProto], list[onnx.NodeProto], int]  # parts, nodes, peak bytes


def _delta_rebuild(
    deltas: np.ndarray, stored: np.ndarray, size: int, shared: _Shared, part: _Part, flat: str
) -> _Nodes:
    """``delta``: ScatterND of the stored values at the cumulated gaps into zeros."""
    delta_name, values_name, length, offsets = (
        part("deltas"),
        part("values"),
        part("length"),
        part("offsets"),
    )
    positions64, index, zeros = part("positions"), part("indices"), part("zeros")
    initializers = [
        numpy_helper.from_array(deltas, delta_name),
        numpy_helper.from_array(stored, values_name),
        _shape_tensor([size], length),
    ]
    zero = numpy_helper.from_array(np.zeros(1, stored.dtype), "value")
    axis = shared.get("axis0", np.array(0, np.int32))
    column = shared.get("column", np.array([-1, 1], np.int64))
    nodes = [
        helper.make_node("Cast", [delta_name], [offsets], name=offsets, to=TensorProto.INT64),
        helper.make_node("CumSum", [offsets, axis], [positions64], name=positions64),
        helper.make_node("Reshape", [positions64, column], [index], name=index),
        helper.make_node("ConstantOfShape", [length], [zeros], name=zeros, value=zero),
        helper.make_node("ScatterND", [zeros, index, values_name], [flat], name=flat),
    ]
    return initializers, nodes, max(8 * int(deltas.size), size * stored.dtype.itemsize)


def _bitmask_rebuild(
    mask: np.ndarray, values: np.ndarray, shared: _Shared, part: _Part, flat: str
) -> _Nodes:
    """``bitmask``: the unpacked bits' running count gathers from the values (0 first)."""
    size = int(mask.size)
    packed = (size + 7) // 8
    bits_name, values_name = part("bits"), part("values")
    bits = np.packbits(mask).reshape(packed, 1)
    padded = np.concatenate([np.zeros(1, values.dtype), values])
    initializers = [
        numpy_helper.from_array(bits, bits_name),
        numpy_helper.from_array(padded, values_name),
    ]
    shifts = shared.get("shifts", np.arange(8, dtype=np.uint8))
    seven = shared.get("seven", np.array(7, np.uint8))
    minus_one = shared.get("minus_one", np.array([-1], np.int64))
    axis = shared.get("axis0", np.array(0, np.int32))
    moved, unpacked, bitvector = part("shifted"), part("unpacked"), part("bitvector")
    nodes = [
        helper.make_node("BitShift", [bits_name, shifts], [moved], name=moved, direction="LEFT"),
        helper.make_node("BitShift", [moved, seven], [unpacked], name=unpacked, direction="RIGHT"),
        helper.make_node("Reshape", [unpacked, minus_one], [bitvector], name=bitvector),
    ]
    if size != 8 * packed:
        start = shared.get("zero_start", np.array([0], np.int64))
        end, trimmed = part("length"), part("trimmed")
        initializers.append(_shape_tensor([size], end))
        nodes.append(helper.make_node("Slice", [bitvector, start, end], [trimmed], name=trimmed))
        bitvector = trimmed
    ones, ranks, index = part("mask"), part("ranks"), part("indices")
    nodes += [
        helper.make_node("Cast", [bitvector], [ones], name=ones, to=TensorProto.INT32),
        helper.make_node("CumSum", [ones, axis], [ranks], name=ranks),
        helper.make_node("Mul", [ranks, ones], [index], name=index),
        helper.make_node("Gather", [values_name, index], [flat], name=flat, axis=0),
    ]
    return initializers, nodes, max(8 * packed, 4 * size, size * values.dtype.itemsize)


def compact_weights(
    model: onnx.ModelProto,
    names: Sequence[str],
    *,
    min_size: int = 1024,
    force: bool = False,
    encoding: str | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` in which the named weights are stored compactly.

    Each named weight that is an initializer of the main graph with at least ``min_size``
    elements, and whose rebuild (its initializers and nodes, as serialised) is smaller
    than the dense initializer, is replaced by that rebuild; everything else stays as it
    is (see the module docstring for what is never compacted, and why). ``force``
    compacts every eligible weight even when that does not make it smaller, and
    ``encoding`` (``bitmask``, ``delta`` or ``zeros``) forces one encoding; both exist
    for tests. The input model is not modified.
    """
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return out
    if not _supported(out):
        return out

    shared = _Shared({}, [], _all_names(out))
    entries = _read_metadata(out)
    replaced = _rebuilds(out.graph, wanted, entries, shared, min_size, encoding, force)
    if not replaced:
        return out

    _install(out.graph, replaced, shared)
    _write_metadata(out, entries)
    return out


def _rebuilds(
    graph: onnx.GraphProto,
    wanted: Sequence[str],
    entries: dict[str, str],
    shared: _Shared,
    min_size: int,
    encoding: str | None,
    force: bool,
) -> dict[int, _Rebuild]:
    """The compact rebuild of each ``wanted`` weight worth one, by initializer index
    (``entries``, the metadata of compacted weights, gains their encodings)."""
    main = {t.name: i for i, t in enumerate(graph.initializer)}
    elsewhere = _other_constants(graph)
    inputs = {v.name for v in graph.input}
    replaced: dict[int, _Rebuild] = {}
    for name in wanted:
        if name not in main:
            if name in entries:
                continue  # compacted already
            if name in elsewhere:
                log.info("%s: not a main-graph initializer, left dense", name)
                continue
            raise ValueError(f"no tensor named {name!r} in the model")
        tensor = graph.initializer[main[name]]
        reason = _ineligible(tensor, name in inputs, min_size)
        if reason:
            log.info("%s: %s, left dense", name, reason)
            continue
        rebuild = _smaller(name, tensor, shared, shared.taken, encoding, force)
        if rebuild is None:
            continue
        replaced[main[name]] = rebuild
        entries[name] = rebuild.encoding
    return replaced


def _other_constants(graph: onnx.GraphProto) -> set[str]:
    """Names of constants that are not main-graph initializers: subgraphs' initializers
    and every Constant node's output."""
    elsewhere: set[str] = set()
    for sub in list(iter_graphs(graph))[1:]:
        elsewhere.update(t.name for t in sub.initializer)
    for sub in iter_graphs(graph):
        elsewhere.update(n.output[0] for n in sub.node if n.op_type == "Constant" and n.output)
    return elsewhere


def _supported(model: onnx.ModelProto) -> bool:
    """Whether the model's opset and IR version allow a compact rebuild (else warned)."""
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        log.warning(
            "compact storage needs ai.onnx opset >= %d (the model has %s); weights stay dense",
            MIN_OPSET,
            opset,
        )
        return False
    if model.ir_version < 4:
        log.warning(
            "compact storage needs IR version >= 4 (the model has %d, so its initializers "
            "are graph inputs and cannot be folded); weights stay dense",
            model.ir_version,
        )
        return False
    return True


def _smaller(
    name: str,
    tensor: onnx.TensorProto,
    shared: _Shared,
    taken: set[str],
    encoding: str | None,
    force: bool,
) -> _Rebuild | None:
    """The rebuild of an eligible weight, or None (logged) when it would not fold at load
    or (unless ``force``) would not be smaller than the dense initializer."""
    array = tensor_array(tensor)
    if array.size >= 2**31 - 1:
        log.warning("%s: over 2**31 elements, left dense", name)
        return None
    rebuild = _build(name, array, shared, taken, encoding)
    if rebuild.peak_bytes > FOLD_LIMIT_BYTES:
        log.warning(
            "%s: its rebuild needs a %d-byte tensor, over onnxruntime's constant folding "
            "limit (%d), so it would run at every inference; left dense",
            name,
            rebuild.peak_bytes,
            FOLD_LIMIT_BYTES,
        )
        return None
    if not force and rebuild.byte_size >= tensor.ByteSize():
        log.info("%s: compact form is not smaller, left dense", name)
        return None
    return rebuild


def _install(graph: onnx.GraphProto, replaced: dict[int, _Rebuild], shared: _Shared) -> None:
    """Each replaced initializer (by index) becomes its rebuild's initializers, in place;
    the shared constants the rebuilds read follow, and the rebuild nodes go first."""
    new_inits: list[onnx.TensorProto] = []
    new_nodes: list[onnx.NodeProto] = []
    for index, tensor in enumerate(graph.initializer):
        found = replaced.get(index)
        if found is None:
            new_inits.append(tensor)
        else:
            new_inits.extend(found.initializers)
            new_nodes.extend(found.nodes)
    read = {inp for node in new_nodes for inp in node.input}
    new_inits.extend(t for t in shared.tensors if t.name in read)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    # The rebuilds read initializers only, so they go first (topological order holds).
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _ineligible(tensor: onnx.TensorProto, is_input: bool, min_size: int) -> str | None:
    if is_input:
        return "also a graph input (overridable at run time)"
    if tensor.data_type not in _SUPPORTED_TYPES:
        return f"type {TensorProto.DataType.Name(tensor.data_type)} not supported"
    if is_external(tensor) and not is_lazy(tensor):
        return "external data not loaded"
    size = int(np.prod(tensor.dims, dtype=np.int64))
    if size == 0:
        return "empty"
    if size < min_size:
        return f"{size} elements < min_size {min_size}"
    return None


# --- densify: evaluate the rebuild nodes in numpy ---------------------------------------

_Op = Callable[[onnx.NodeProto, list[np.ndarray]], np.ndarray]


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    attr = _attr(node, name)
    return int(attr.i) if attr is not None else default


def _str_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    attr = _attr(node, name)
    return attr.s.decode() if attr is not None else default


def _op_bitshift(node: onnx.NodeProto, x: list[np.ndarray]) -> np.ndarray:
    if _str_attr(node, "direction", "") == "LEFT":
        return np.left_shift(x[0], x[1].astype(x[0].dtype))
    return np.right_shift(x[0], x[1].astype(x[0].dtype))


def _op_reshape(node: onnx.NodeProto, x: list[np.ndarray]) -> np.ndarray:
    dims = [int(d) for d in x[1]]
    if not _int_attr(node, "allowzero", 0):
        dims = [x[0].shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x[0].reshape(dims)


def _op_slice(node: onnx.NodeProto, x: list[np.ndarray]) -> np.ndarray:
    data, starts, ends = x[0], x[1], x[2]
    axes = x[3] if len(x) > 3 and x[3].size else np.arange(len(starts))
    steps = x[4] if len(x) > 4 and x[4].size else np.ones(len(starts), np.int64)
    index = [slice(None)] * data.ndim
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        index[int(a)] = slice(int(s), int(e), int(st))
    return data[tuple(index)]


def _op_cast(node: onnx.NodeProto, x: list[np.ndarray]) -> np.ndarray:
    return x[0].astype(helper.tensor_dtype_to_np_dtype(_int_attr(node, "to", 0)))


def _op_cumsum(node: onnx.NodeProto, x: list[np.ndarray]) -> np.ndarray:
    if _int_attr(node, "exclusive", 0) or _int_attr(node, "reverse", 0):
        raise ValueError("CumSum with exclusive/reverse is not part of a compact rebuild")
    return np.cumsum(x[0], axis=int(x[1]), dtype=x[0].dtype)


def _op_gather(node: onnx.NodeProto, x: list[np.ndarray]) -> np.ndarray:
    return np.take(x[0], x[1].astype(np.int64), axis=_int_attr(node, "axis", 0))


def _op_constant_of_shape(node: onnx.NodeProto, x: list[np.ndarray]) -> np.ndarray:
    value = _attr(node, "value")
    fill = numpy_helper.to_array(value.t) if value is not None else np.zeros(1, np.float32)
    return np.full([int(d) for d in x[0]], fill.reshape(-1)[0], dtype=fill.dtype)


def _op_scatter_nd(node: onnx.NodeProto, x: list[np.ndarray]) -> np.ndarray:
    if _str_attr(node, "reduction", "none") != "none":
        raise ValueError("ScatterND with a reduction is not part of a compact rebuild")
    out = np.array(x[0], copy=True)
    index = tuple(np.moveaxis(x[1].astype(np.int64), -1, 0))
    out[index] = x[2]
    return out


_OPS: dict[str, _Op] = {
    "BitShift": _op_bitshift,
    "Reshape": _op_reshape,
    "Slice": _op_slice,
    "Cast": _op_cast,
    "CumSum": _op_cumsum,
    "Mul": lambda node, x: np.multiply(x[0], x[1]),
    "Gather": _op_gather,
    "ConstantOfShape": _op_constant_of_shape,
    "ScatterND": _op_scatter_nd,
}


def _cone(
    graph: onnx.GraphProto, name: str, producers: dict[str, onnx.NodeProto]
) -> list[onnx.NodeProto]:
    """The nodes that compute ``name`` from initializers, in topological order."""
    order: list[onnx.NodeProto] = []
    seen: set[str] = set()

    def visit(tensor: str) -> None:
        node = producers.get(tensor)
        if node is None or node.output[0] in seen:
            return
        seen.add(node.output[0])
        for inp in node.input:
            if inp:
                visit(inp)
        order.append(node)

    visit(name)
    return order


def _evaluate(
    nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], name: str
) -> np.ndarray:
    values = dict(constants)
    for node in nodes:
        op = _OPS.get(node.op_type)
        if op is None or node.domain not in ("", "ai.onnx"):
            raise ValueError(f"{node.op_type} node {node.name!r} is not part of a compact rebuild")
        args = []
        for inp in node.input:
            if inp not in values:
                raise ValueError(f"the rebuild of {name!r} reads {inp!r}, not a constant")
            args.append(values[inp])
        values[node.output[0]] = op(node, args)
    return values[name]


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every compacted weight turned back into a plain initializer.

    The rebuild nodes are evaluated in numpy, so this reads back exactly what onnxruntime
    computes at load time. A model without compact weights comes back unchanged.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    entries = _read_metadata(out)
    if not entries:
        return out
    graph = out.graph
    producers = {o: n for n in graph.node for o in n.output if o}
    init_by_name = {t.name: t for t in graph.initializer}
    dense: dict[str, onnx.TensorProto] = {}
    dropped: set[int] = set()
    constants: dict[str, np.ndarray] = {}
    for name in entries:
        if name in init_by_name or name not in producers:
            continue  # already dense (e.g. folded by another tool)
        nodes = _cone(graph, name, producers)
        for node in nodes:
            for inp in node.input:
                if inp and inp not in constants and inp not in producers:
                    if inp not in init_by_name:
                        raise ValueError(f"the rebuild of {name!r} reads {inp!r}, not a constant")
                    constants[inp] = tensor_array(init_by_name[inp])
        array = _evaluate(nodes, constants, name)
        dense[name] = numpy_helper.from_array(np.ascontiguousarray(array), name)
        dropped.update(id(n) for n in nodes)
    kept_nodes = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    _write_metadata(out, {})
    used = _used_names(out)
    inits = [t for t in graph.initializer if t.name in used or t.name not in constants]
    del graph.initializer[:]
    graph.initializer.extend(inits + list(dense.values()))
    return out


def weight_storage_bytes(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, int]:
    """Bytes of tensor data that store each named weight in ``model``.

    A dense weight counts its initializer's data; a compacted one counts the initializers
    only its rebuild reads (the values, mask or gaps and the small shape tensors; the few
    constants shared by all rebuilds, under 100 bytes, are not counted).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output if o}
    sizes: dict[str, int] = {}
    for name in names:
        if name in inits:
            sizes[name] = nbytes(inits[name])
            continue
        if name not in producers:
            raise ValueError(f"no initializer or rebuild named {name!r}")
        parts = {
            inp for node in _cone(graph, name, producers) for inp in node.input if inp in inits
        }
        sizes[name] = sum(nbytes(inits[p]) for p in parts if p.startswith(name + _SEP))
    return sizes
