"""Loading ONNX models safely, and writing them atomically."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

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


def _check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in iter_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
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


def load_model(path: str | os.PathLike[str], *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from a path and run onnx's checker (see :func:`read_model`)."""
    return read_model(path, check=check)[0]


def read_model(path: str | os.PathLike[str], *, check: bool = True) -> tuple[onnx.ModelProto, bool]:
    """:func:`load_model`, also telling whether the file kept its tensors in external data.

    External data must live in the model's folder (no absolute paths, no escapes through
    ``..`` or symbolic links). Tensors of :data:`~rdprune_onnx.graph.external.LAZY_MIN_BYTES`
    or more stay on disk (see :mod:`rdprune_onnx.graph.external`): read them with
    :func:`~rdprune_onnx.graph.external.tensor_array`, write the model with
    :func:`save_model`. Smaller ones are read in.
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
    _check_external_locations(model, p.parent)
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
    protect: tuple[str | os.PathLike[str], ...] = (),
    weights: Mapping[str, np.ndarray] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically and return the files written.

    Everything is written into a temporary folder beside the target and moved into place
    only when complete, so an interrupted or failed write leaves no partial output. With
    external data (chosen automatically for models over 2 GiB, or forced by
    ``external_data``) a fresh data file ``<name>.data`` is written beside the output.
    ``protect`` lists paths that must never be overwritten (the input model and its data).
    ``weights`` replaces the named constants as they are written (see
    :func:`~rdprune_onnx.graph.external.write_external`).
    """
    out = Path(path)
    folder = out.parent if str(out.parent) else Path()
    if not folder.is_dir():
        raise UserError(
            f"output folder {str(folder)!r} does not exist", "create it or choose another -o"
        )
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {str(folder)!r} is not writable", "choose another -o")
    data_name = out.name + ".data"
    if external_data is None:
        external_data = data_bytes(model) >= _PROTOBUF_LIMIT // 2
    # External references (lazy tensors among them) are only resolved by writing the data.
    external_data = external_data or uses_external_data(model)
    targets = [out] + ([folder / data_name] if external_data else [])
    protected = {Path(p).resolve() for p in protect}
    for target in targets:
        if target.resolve() in protected:
            raise UserError(
                f"refusing to overwrite the input file {str(target)!r}", "choose another -o"
            )
        if target.exists() and not force:
            raise UserError(f"output {str(target)!r} already exists", "pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=".rdprune-", dir=folder))
    try:
        tmp_model = tmp / out.name
        if external_data:
            # Streams tensor by tensor (lazy ones copied from their files) into one fresh
            # data file; the caller's model is only read.
            write_external(model, tmp, weights, name=out.name, durable=True)
        else:
            if weights:
                model = replace_weights(model, weights)
            onnx.save_model(model, str(tmp_model))
        for target in reversed(targets):  # data file first, the model last
            src = tmp / target.name
            with open(src, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(src, target)
    except OSError as exc:
        raise UserError(
            f"could not write {str(out)!r}: {exc.strerror or exc}",
            "free disk space or choose another -o",
        ) from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    log.info("wrote %s", ", ".join(str(t) for t in targets))
    return targets
