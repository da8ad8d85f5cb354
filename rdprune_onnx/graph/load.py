"""Loading ONNX models safely, and writing them atomically."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper

from rdprune_onnx import files
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.external import (
    LAZY_MIN_BYTES,
    check_data,
    is_external,
    is_lazy,
    make_lazy,
    materialize,
    nbytes,
    write_external,
)
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.graph.walk import constant_value, iter_graphs

log = logging.getLogger(__name__)

# Protobuf refuses to serialise a single message over 2 GiB; models larger than this are
# written with their tensors in an external data file.
_PROTOBUF_LIMIT = 2**31 - 1


def iter_all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every initializer and Constant-node tensor in the model, subgraphs included."""
    tensors: list[onnx.TensorProto] = []
    for graph in iter_graphs(model.graph):
        tensors.extend(graph.initializer)
        tensors.extend(t for t in map(constant_value, graph.node) if t is not None)
    return tensors


def data_bytes(model: onnx.ModelProto, *, in_memory: bool = False) -> int:
    """Bytes of tensor data in the model, from shapes and types (never ``ByteSize()``, which
    encodes the whole message and raises over 2 GiB). ``in_memory`` counts only what the
    message itself holds (tensors still on disk excluded)."""
    return sum(
        nbytes(tensor)
        for tensor in iter_all_tensors(model)
        if not (in_memory and is_external(tensor))
    )


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in iter_all_tensors(model))


def has_lazy(model: onnx.ModelProto) -> bool:
    """Some tensor's data is still on disk (see :mod:`rdprune_onnx.graph.external`)."""
    return any(is_lazy(t) for t in iter_all_tensors(model))


def external_files(model: onnx.ModelProto, folder: str | os.PathLike[str]) -> list[Path]:
    """The external data files the model's tensors point to (relative to ``folder``)."""
    found: dict[Path, None] = {}
    for tensor in iter_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            found[Path(folder) / location] = None
    return list(found)


def _bad_text(message: Any) -> bool:
    """Whether some text field holds invalid UTF-8 (protobuf then hands out ``bytes``, and
    copying the field raises far from here). Tensor contents are not read, only names and
    external-data entries."""
    if isinstance(message, onnx.TensorProto):
        texts = [message.name, message.doc_string]
        texts += [t for e in message.external_data for t in (e.key, e.value)]
        return any(isinstance(t, bytes) for t in texts)
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            items = [value] if hasattr(value, "ListFields") else list(value)
            if any(_bad_text(item) for item in items):
                return True
        elif field.type == field.TYPE_STRING:
            items = [value] if isinstance(value, str | bytes) else list(value)
            if any(isinstance(item, bytes) for item in items):
                return True
    return False


def _check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in iter_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = _check_external_fields(tensor)
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise UserError(
                f"tensor {tensor.name!r} points to external data outside the model's folder "
                f"({location!r})",
                "external data must sit in the model's folder; move it there and fix the path",
            )
        if not target.is_file():
            raise UserError(
                f"external data file {location!r} for tensor {tensor.name!r} is missing",
                f"put it next to the model in {folder}",
            )
        _check_external_extent(tensor, target, location)


_T = onnx.TensorProto
# Element types stored one whole number of bytes each (sub-byte types are packed).
_WHOLE_BYTE_TYPES = frozenset(
    {
        _T.FLOAT, _T.DOUBLE, _T.FLOAT16, _T.BFLOAT16, _T.INT8, _T.INT16, _T.INT32, _T.INT64,
        _T.UINT8, _T.UINT16, _T.UINT32, _T.UINT64, _T.BOOL, _T.COMPLEX64, _T.COMPLEX128,
    }
)  # fmt: skip


# Element type -> (typed field holding the values, values per element).
_TYPED_FIELDS: dict[int, tuple[str, int]] = {
    _T.FLOAT: ("float_data", 1), _T.COMPLEX64: ("float_data", 2),
    _T.DOUBLE: ("double_data", 1), _T.COMPLEX128: ("double_data", 2),
    _T.INT64: ("int64_data", 1), _T.UINT32: ("uint64_data", 1), _T.UINT64: ("uint64_data", 1),
    _T.INT32: ("int32_data", 1), _T.INT16: ("int32_data", 1), _T.INT8: ("int32_data", 1),
    _T.UINT16: ("int32_data", 1), _T.UINT8: ("int32_data", 1), _T.BOOL: ("int32_data", 1),
    _T.FLOAT16: ("int32_data", 1), _T.BFLOAT16: ("int32_data", 1),
}  # fmt: skip


def _check_inline_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Every tensor stored in the file holds as many values as its shape says (the
    checker does not look; reading it would fail far from here)."""
    for tensor in iter_all_tensors(model):
        try:
            onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        except (KeyError, ValueError):
            raise UserError(
                f"tensor {tensor.name!r} in {str(path)!r} has an unknown element type "
                f"{tensor.data_type}",
                "the file is corrupt, or needs a newer onnx; re-export it",
            ) from None
        if is_external(tensor) or tensor.data_type not in _WHOLE_BYTE_TYPES:
            continue
        if any(d < 0 for d in tensor.dims):
            raise UserError(
                f"tensor {tensor.name!r} in {str(path)!r} has a negative dimension",
                "the file is corrupt; re-export it",
            )
        expected = nbytes(tensor)
        if tensor.HasField("raw_data"):
            held, unit = len(tensor.raw_data), "bytes"
        else:
            field, per = _TYPED_FIELDS[tensor.data_type]
            held, unit = len(getattr(tensor, field)), "values"
            expected = math.prod(tensor.dims) * per
        if held != expected:
            raise UserError(
                f"tensor {tensor.name!r} in {str(path)!r} holds {held} {unit} but its type and "
                f"shape {list(tensor.dims)} need {expected}",
                "the file is corrupt; re-export it",
            )


def _bad_external(tensor: onnx.TensorProto, why: str) -> UserError:
    return UserError(
        f"tensor {tensor.name!r} has invalid external data: {why}",
        "the model file is corrupt or was edited by hand; re-export it",
    )


def _check_external_fields(tensor: onnx.TensorProto) -> str:
    """The location, after checking offset and length are whole numbers >= 0 and the
    length is the tensor's size (before anything is read or allocated from them)."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not location or "\x00" in location:
        raise _bad_external(tensor, f"location {location[:40]!r} is not a file name")
    for key in ("offset", "length"):
        text = entries.get(key)
        if text is None:
            continue
        if not (text.isascii() and text.isdigit()):
            raise _bad_external(tensor, f"{key} {text[:30]!r} is not a whole number >= 0")
    length = entries.get("length")
    if length is not None and tensor.data_type in _WHOLE_BYTE_TYPES:
        expected = nbytes(tensor)
        if int(length) != expected:
            raise _bad_external(
                tensor, f"length {length} bytes, but its type and shape need {expected}"
            )
    if any(d < 0 for d in tensor.dims):
        raise _bad_external(tensor, f"negative dimension in {list(tensor.dims)}")
    return location


def _check_external_extent(tensor: onnx.TensorProto, target: Path, location: str) -> None:
    entries = {e.key: e.value for e in tensor.external_data}
    offset = int(entries.get("offset") or 0)
    length = int(entries["length"]) if entries.get("length") else nbytes(tensor)
    size = target.stat().st_size
    if offset + length > size:
        raise UserError(
            f"the external data of tensor {tensor.name!r} ({length} bytes at offset {offset}) "
            f"is missing or truncated: it runs past the end of {location!r} ({size} bytes)",
            "the data file is truncated or belongs to another model; copy it again, whole",
        )


def load_model(path: str | os.PathLike[str], *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from a path and run onnx's checker (see :func:`read_model`)."""
    return read_model(path, check=check)[0]


def read_model(
    path: str | os.PathLike[str],
    *,
    check: bool = True,
    data_files: list[Path] | None = None,
) -> tuple[onnx.ModelProto, bool]:
    """:func:`load_model`, also telling whether the file kept its tensors in external data.

    External data must live in the model's folder (no absolute paths, no escapes through
    ``..`` or symbolic links). Tensors of :data:`~rdprune_onnx.graph.external.LAZY_MIN_BYTES`
    or more stay on disk (see :mod:`rdprune_onnx.graph.external`): read them with
    :func:`~rdprune_onnx.graph.external.tensor_array`, write the model with
    :func:`save_model`. Smaller ones are read in. ``data_files``, when given, receives the
    external data files the model reads (inputs no output may overwrite).
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"model file {str(p)!r} does not exist", "check the path")
    if p.is_dir():
        raise UserError(f"{str(p)!r} is a directory, not an ONNX file", "pass the .onnx file")
    if p.stat().st_size == 0:
        raise UserError(f"model file {str(p)!r} is empty", "re-export or re-download the model")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise UserError(
            f"cannot parse {str(p)!r} as an ONNX model ({type(exc).__name__})",
            "the file is corrupt, truncated or not ONNX; re-export it",
        ) from None
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise UserError(
            f"{str(p)!r} holds no ONNX graph", "the file is not an ONNX model; re-export it"
        )
    if _bad_text(model):
        raise UserError(
            f"{str(p)!r} holds text that is not valid UTF-8 (a corrupt name or attribute)",
            "the file is corrupt; re-export it",
        )
    _check_inline_sizes(model, p)
    _check_external_locations(model, p.parent)
    if data_files is not None:
        data_files.extend(external_files(model, p.parent))
    external = uses_external_data(model)
    if check:
        try:
            # With external data, check the file (the checker reads the data next to it):
            # the loaded message may be over protobuf's 2 GiB limit.
            onnx.checker.check_model(str(p) if external else model)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
            raise UserError(
                f"{str(p)!r} fails the ONNX checker: {first}", "fix or re-export the model"
            ) from None
    if external:
        _attach_external_data(model, p.parent)
    return model, external


def _attach_external_data(model: onnx.ModelProto, folder: Path) -> None:
    for tensor in iter_all_tensors(model):
        if not is_external(tensor):
            continue
        make_lazy(tensor, folder)
        try:
            if nbytes(tensor) < LAZY_MIN_BYTES:
                materialize(tensor)
            else:
                check_data(tensor)
        except (OSError, ValueError, KeyError):
            raise UserError(
                f"the external data of tensor {tensor.name!r} is missing or truncated",
                "copy the model's data file(s) again, whole",
            ) from None


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    force: bool = False,
    protect: Sequence[str | os.PathLike[str] | files.Identity] = (),
    weights: Mapping[str, np.ndarray] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically and return the files written.

    Everything is written into a temporary folder beside the target and moved into place
    only when complete, so an interrupted or failed write leaves no partial output. With
    external data (chosen automatically for models over 2 GiB, or forced by
    ``external_data``) a fresh data file ``<name>.data`` is written beside the output.
    ``protect`` lists paths that must never be overwritten (the input model and its data),
    compared by resolved path and by inode (see :mod:`rdprune_onnx.files`). An existing
    target that is not a regular file is refused even with ``force``; without ``force``
    the final step cannot replace a file that appeared meanwhile.
    ``weights`` replaces the named constants as they are written (see
    :func:`~rdprune_onnx.graph.external.write_external`).
    """
    out = Path(path)
    folder = _output_folder(out)
    data_name = out.name + ".data"
    if external_data is None:
        external_data = data_bytes(model) >= _PROTOBUF_LIMIT // 2
    # External references (lazy tensors among them) are only resolved by writing the data.
    external_data = external_data or uses_external_data(model)
    targets = [out] + ([folder / data_name] if external_data else [])
    guard = _check_targets(targets, protect, force)
    published: list[Path] = []
    try:
        with files.staging(folder) as tmp:
            _write_staged(model, tmp, out.name, external_data, weights)
            for target in reversed(targets):  # data file first, the model last
                files.publish(tmp / target.name, target, force=force, protect=guard)
                published.append(target)
    except OSError as exc:
        _unpublish(published)
        raise UserError(
            f"could not write {str(out)!r}: {exc.strerror or exc}",
            "free disk space or choose another -o",
        ) from None
    except BaseException:
        _unpublish(published)
        raise
    log.info("wrote %s", ", ".join(str(t) for t in targets))
    return targets


def _output_folder(out: Path) -> Path:
    """The folder ``out`` is written to, refused unless it exists and is writable (a name
    not ending in .onnx is only warned about)."""
    folder = out.parent if str(out.parent) else Path()
    if not folder.is_dir():
        raise UserError(
            f"output folder {str(folder)!r} does not exist", "create it or choose another -o"
        )
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {str(folder)!r} is not writable", "choose another -o")
    if out.suffix.lower() != ".onnx":
        log.warning("writing an ONNX model (protobuf) to %s, whose name does not end in .onnx", out)
    return folder


def _write_staged(
    model: onnx.ModelProto,
    tmp: Path,
    name: str,
    external_data: bool,
    weights: Mapping[str, np.ndarray] | None,
) -> None:
    """Write ``model`` as ``tmp/name`` (and with ``external_data`` its ``name.data``),
    ``weights`` replacing the named constants; the caller's model is only read."""
    if external_data:
        # Streams tensor by tensor (lazy ones copied from their files) into one fresh
        # data file; the caller's model is only read.
        write_external(model, tmp, weights, name=name, durable=True)
        return
    if weights:
        model = replace_weights(model, weights)
    # Protobuf whatever the suffix (onnx would write out.json as JSON text).
    onnx.save_model(model, str(tmp / name), format="protobuf")


def _check_targets(
    targets: Sequence[Path],
    protect: Sequence[str | os.PathLike[str] | files.Identity],
    force: bool,
) -> list[files.Identity]:
    """Refuse targets that are protected files or (without ``force``) exist; returns the
    protected files' identities, which the final move checks again."""
    guard = [p if isinstance(p, files.Identity) else files.identity(p, "input") for p in protect]
    for target, label in zip(targets, ("output", "output data file"), strict=False):
        for other in guard:
            if files.same(files.identity(target, label), other):
                raise UserError(
                    f"refusing to overwrite the {other.label} {str(target)!r}",
                    "choose another -o",
                )
        files.check_existing(target, label, force=force, force_hint=files.FORCE_HINT)
    return guard


def _unpublish(paths: list[Path]) -> None:
    """All or nothing: remove the files of a write that failed part way."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()
