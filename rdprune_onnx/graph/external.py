"""Tensor data that stays on disk, and writing models with one external data file.

A model loaded from a file with external data keeps its large tensors on disk: each keeps
its ``external_data`` reference, with one extra entry, ``basepath``, the folder the
reference is relative to (checked to lie inside the model's folder when it was loaded).
Such a tensor is *lazy*: :func:`tensor_array` reads it from its file when asked, one tensor
at a time, so that a 2.5 GB model costs a few megabytes of graph in memory, not 2.5 GB.

Lazy references only make sense inside this process. Models holding them are written with
:func:`write_external` (every tensor's bytes copied into one fresh data file), never by
``onnx.save_model``, and reach ONNX Runtime the same way (:mod:`rdprune_onnx.runtime`).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

BASE_KEY = "basepath"
# Tensors at least this large stay on disk when a model with external data is loaded;
# smaller ones (biases, shape constants) are read in, so shape inference sees their values.
LAZY_MIN_BYTES = 1024**2
# In a written data file, tensors of at least this many bytes go to the data file.
TENSOR_MIN_BYTES = 1024
# Offsets of tensors of this size or more in a written data file are aligned to it (the
# largest allocation granularity, Windows'), so that ONNX Runtime can map them.
ALIGNMENT = 64 * 1024
_DATA_FIELDS = frozenset(
    {
        "raw_data",
        "float_data",
        "int32_data",
        "string_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "external_data",
        "data_location",
    }
)
# Element types whose typed (non-raw) storage numpy_helper turns into the raw layout.
_TYPED_OK = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.UINT64,
        onnx.TensorProto.BOOL,
        onnx.TensorProto.COMPLEX64,
        onnx.TensorProto.COMPLEX128,
    }
)
# Element types numpy reads straight from the file (the same layout as numpy's).
_PLAIN_NUMPY = _TYPED_OK - {onnx.TensorProto.BFLOAT16}


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def is_lazy(tensor: onnx.TensorProto) -> bool:
    """The tensor's data is on disk and this process knows where (see the module doc)."""
    return is_external(tensor) and any(e.key == BASE_KEY for e in tensor.external_data)


def nbytes(tensor: onnx.TensorProto) -> int:
    """The size of a tensor's data in the raw layout, from its type and shape.

    Never ``ByteSize()``: upb computes it by encoding the message (a transient copy of up to
    twice its size) and refuses messages over 2 GiB; nor ``raw_data``, which copies it.
    Strings count 0 (they stay inline).
    """
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # an element type this onnx does not know
        itemsize = 1
    return math.prod(tensor.dims) * itemsize


def external_file(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    entries = _entries(tensor)
    path = Path(entries[BASE_KEY]) / entries["location"]
    offset = int(entries.get("offset", "0") or 0)
    length = int(entries["length"]) if entries.get("length") else nbytes(tensor)
    return path, offset, length


def check_data(tensor: onnx.TensorProto) -> None:
    """Raise OSError unless a lazy tensor's bytes are all in its file."""
    path, offset, length = external_file(tensor)
    if offset < 0 or offset + length > path.stat().st_size:
        raise OSError(f"external data for {tensor.name!r} in {str(path)!r} is truncated")


def make_lazy(tensor: onnx.TensorProto, folder: Path) -> None:
    """Mark an external tensor as relative to ``folder`` (already checked by the caller)."""
    item = tensor.external_data.add()
    item.key = BASE_KEY
    item.value = str(folder.resolve())


def read_bytes(tensor: onnx.TensorProto) -> bytes:
    """A lazy tensor's bytes, read from its file."""
    path, offset, length = external_file(tensor)
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(length)
    if len(data) != length:
        raise OSError(f"external data for {tensor.name!r} in {str(path)!r} is truncated")
    return data


def _inline_copy(tensor: onnx.TensorProto, data: bytes) -> onnx.TensorProto:
    out = onnx.TensorProto()
    copy_metadata(tensor, out)
    out.raw_data = data
    return out


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values as a numpy array (read from disk for lazy tensors)."""
    if not is_lazy(tensor):
        return numpy_helper.to_array(tensor)
    if tensor.data_type in _PLAIN_NUMPY and sys.byteorder == "little":
        path, offset, length = external_file(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = math.prod(tensor.dims)
        if length != count * dtype.itemsize:
            raise OSError(f"external data for {tensor.name!r} has the wrong length")
        array = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if array.size != count:
            raise OSError(f"external data for {tensor.name!r} in {str(path)!r} is truncated")
        return array.reshape(tuple(tensor.dims))
    return numpy_helper.to_array(_inline_copy(tensor, read_bytes(tensor)))


def materialize(tensor: onnx.TensorProto) -> None:
    """Read a lazy tensor's data into the message (it is then an ordinary tensor)."""
    data = read_bytes(tensor)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


# --- writing a model as a small graph plus one external data file, field by field ---

# ``field`` below is a protobuf FieldDescriptor (typed Any: protobuf ships no stubs here).


def _is_repeated(field: Any) -> bool:
    repeated = getattr(field, "is_repeated", None)  # newer protobuf; ``label`` before
    if repeated is not None:
        return bool(repeated)
    return bool(field.label == field.LABEL_REPEATED)


def _copy_field(dst: Any, field: Any, value: Any) -> None:
    if _is_repeated(field):
        getattr(dst, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(dst, field.name).CopyFrom(value)
    else:
        setattr(dst, field.name, value)


def copy_metadata(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
    """Every field but the data (``ListFields`` would copy ``raw_data`` out)."""
    for field in src.DESCRIPTOR.fields:
        if field.name in _DATA_FIELDS:
            continue
        value = getattr(src, field.name)
        if _is_repeated(field):
            if len(value):
                getattr(dst, field.name).extend(value)
        elif src.HasField(field.name):
            _copy_field(dst, field, value)


def _raw(tensor: onnx.TensorProto) -> bytes | None:
    """The tensor's data in the raw (external data) layout, or None to copy it as it is."""
    if is_lazy(tensor):
        return read_bytes(tensor)
    if is_external(tensor):
        raise ValueError(
            f"tensor {tensor.name!r} refers to external data of unknown location "
            "(load the model with rdprune_onnx.graph.load.load_model)"
        )
    size = nbytes(tensor)
    if size < TENSOR_MIN_BYTES:
        return None
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type not in _TYPED_OK or sys.byteorder != "little":
        return None  # numpy_helper gives another layout, or the host's byte order
    return np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()


class ExternalWriter:
    """Copies a model without its tensors' data, which goes to one file as it is met."""

    def __init__(
        self, data: BinaryIO, location: str, weights: Mapping[str, np.ndarray] | None = None
    ) -> None:
        self.data = data
        self.location = location
        self.weights = weights or {}
        self.replaced: set[str] = set()
        self.moved = 0

    def model(self, src: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        for field, value in src.ListFields():
            if field.name == "graph":
                self.graph(value, out.graph)
            else:
                _copy_field(out, field, value)
        return out

    def graph(self, src: onnx.GraphProto, dst: onnx.GraphProto) -> None:
        for field, value in src.ListFields():
            if field.name == "initializer":
                for tensor in value:
                    self.tensor(tensor, dst.initializer.add(), tensor.name)
            elif field.name == "node":
                for node in value:
                    self.node(node, dst.node.add())
            else:
                _copy_field(dst, field, value)

    def node(self, src: onnx.NodeProto, dst: onnx.NodeProto) -> None:
        constant = src.op_type == "Constant" and src.domain in ("", "ai.onnx")
        for field, value in src.ListFields():
            if field.name != "attribute":
                _copy_field(dst, field, value)
                continue
            for attr in value:
                new = dst.attribute.add()
                for afield, avalue in attr.ListFields():
                    if afield.name == "g":
                        self.graph(avalue, new.g)
                    elif afield.name == "graphs":
                        for sub in avalue:
                            self.graph(sub, new.graphs.add())
                    elif afield.name == "t" and constant and attr.name == "value":
                        self.tensor(avalue, new.t, src.output[0] if src.output else None)
                    else:
                        _copy_field(new, afield, avalue)

    def tensor(self, src: onnx.TensorProto, dst: onnx.TensorProto, slot: str | None) -> None:
        data: bytes | memoryview | None
        if slot is not None and slot in self.weights:
            data = self._replacement(src, slot)
        else:
            data = _raw(src)
            if data is None:
                dst.CopyFrom(src)
                return
        copy_metadata(src, dst)
        if len(data) < TENSOR_MIN_BYTES:
            dst.raw_data = bytes(data)
            return
        offset = self.data.tell()
        if len(data) >= ALIGNMENT and offset % ALIGNMENT:
            offset += ALIGNMENT - offset % ALIGNMENT
            self.data.seek(offset)
        self.data.write(data)
        dst.data_location = onnx.TensorProto.EXTERNAL
        for key, entry in (
            ("location", self.location),
            ("offset", str(offset)),
            ("length", str(len(data))),
        ):
            item = dst.external_data.add()
            item.key = key
            item.value = entry
        self.moved += 1

    def _replacement(self, src: onnx.TensorProto, slot: str) -> bytes | memoryview:
        array = np.asarray(self.weights[slot])
        if helper.np_dtype_to_tensor_dtype(array.dtype) != src.data_type or tuple(
            array.shape
        ) != tuple(src.dims):
            raise ValueError(f"replacement for {slot} changes its type or shape")
        self.replaced.add(slot)
        if sys.byteorder != "little":
            return numpy_helper.from_array(array).raw_data
        return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def write_external(
    model: onnx.ModelProto,
    folder: str | os.PathLike[str],
    weights: Mapping[str, np.ndarray] | None = None,
    *,
    name: str = "model.onnx",
    durable: bool = False,
) -> Path:
    """Write ``model`` into ``folder`` as ``name`` plus one fresh data file ``name.data``.

    Never serialises the whole model: each large tensor's bytes (read from disk for lazy
    tensors) are written to the data file in turn, and only a small copy of the graph is
    serialised. ``model`` is read only (``onnx.save_model(save_as_external_data=True)``
    rewrites the caller's tensors as external references). ``weights`` replaces the named
    constants (initializer names, or the output names of Constant nodes, in every scope) as
    they are written, like :func:`rdprune_onnx.graph.surgery.replace_weights` without the
    copy of the model; it may be any mapping, read one name at a time. ``durable`` syncs
    both files to disk before returning.
    """
    target = Path(folder)
    data_name = name + ".data"
    names = set(weights or {})
    with open(target / data_name, "wb") as data:
        writer = ExternalWriter(data, data_name, weights)
        small = writer.model(model)
        if durable:
            data.flush()
            os.fsync(data.fileno())
    missing = names - writer.replaced
    if missing:
        raise KeyError(f"no constant named {sorted(missing)[0]!r} to replace")
    path = target / name
    with open(path, "wb") as fh:
        fh.write(small.SerializeToString())
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    log.debug("wrote %s with %d external tensors", path, writer.moved)
    return path
