"""ONNX Runtime: the only module that imports onnxruntime.

Sessions are built from in-memory models; the provider is chosen once (``auto`` takes the
CUDA execution provider when onnxruntime-gpu sees a GPU).

Small models reach ONNX Runtime as one serialised protobuf. A model whose tensors hold at
least :data:`EXTERNAL_DATA_THRESHOLD` bytes (protobuf cannot serialise a message over 2 GiB)
is written to a temporary folder instead: its tensors one at a time into a single data
file, and a small copy of the graph that points at them. The caller's model is never
modified, copied whole or serialised whole. ONNX Runtime reads (or maps) the files while the
session is created and the folder is removed straight away (see ``docs/large_models.md``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.load import iter_all_tensors
from rdprune_onnx.graph.surgery import replace_weights

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")
_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# Models whose tensors hold at least this many bytes reach ONNX Runtime through a
# temporary folder with external data rather than as one serialised message. Protobuf's
# limit is 2 GiB; below it the file route is still the leaner one (ONNX Runtime keeps no
# copy of the initializers it pre-packs from a file), so it starts well before the limit.
EXTERNAL_DATA_THRESHOLD = 512 * 1024**2
# On that route, tensors whose data is at least this large (bytes) go to the data file.
TENSOR_MIN_BYTES = 1024
# Offsets of tensors of this size or more in the data file are aligned to it (the largest
# allocation granularity, Windows'), so that ONNX Runtime can map them instead of reading.
_ALIGNMENT = 64 * 1024
_MODEL_FILE = "model.onnx"
# Staging folders are named ``rdprune-ort-<pid>-<random>``; one whose process is gone and
# that has not changed for this long (seconds) was left by a killed run and is removed.
_PREFIX = "rdprune-ort-"
_STALE_AFTER = 3600
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


def resolve_provider(provider: str) -> str:
    """Turn ``auto|cpu|cuda`` into the provider that will be used (``cpu`` or ``cuda``)."""
    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r}", f"choose one of {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if provider == "cpu":
        return "cpu"
    if _NAMES["cuda"] in available:
        _preload_cuda_libraries()
        return "cuda"
    if provider == "cuda":
        raise UserError(
            "the CUDA execution provider is not available",
            "install onnxruntime-gpu (pip install 'rdprune-onnx[gpu]') on a machine with a GPU,"
            " or use --provider cpu",
        )
    return "cpu"


def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip packages (e.g. PyTorch's) ship, if any."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # best effort: the system libraries may do
            log.info("onnxruntime.preload_dlls failed: %s", exc)


def versions() -> dict[str, str]:
    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__}


@dataclass
class SessionConfig:
    provider: str = "cpu"  # resolved: "cpu" or "cuda"
    intra_op_threads: int = 0  # 0: ORT's default (all cores)
    optimize: bool = True


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


def _data_bytes(tensor: onnx.TensorProto) -> int:
    """The size of a tensor's data in the raw layout, from its type and shape.

    Never ``ByteSize()``: upb computes it by encoding the message (a transient copy of up to
    twice its size) and refuses messages over 2 GiB; nor ``raw_data``, which copies it.
    """
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        return 0
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0  # kept inline (external string tensors are not a thing)
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # an element type this onnx does not know
        itemsize = 1
    return math.prod(tensor.dims) * itemsize


def _model_data_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every tensor in the model (initializers, Constants, all scopes)."""
    return sum(_data_bytes(t) for t in iter_all_tensors(model))


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes | None:
    """The tensor's data in the raw (external data) layout, or None to keep it inline."""
    size = _data_bytes(tensor)
    if size == 0 or size < TENSOR_MIN_BYTES:
        return None
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type not in _TYPED_OK or sys.byteorder != "little":
        return None  # numpy_helper gives another layout, or the host's byte order
    return np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes()


def _copy_tensor_metadata(src: onnx.TensorProto, dst: onnx.TensorProto) -> None:
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


class _ExternalWriter:
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
            _copy_tensor_metadata(src, dst)
            if len(data) < TENSOR_MIN_BYTES:
                dst.raw_data = bytes(data)
                return
        else:
            data = _tensor_bytes(src)
            if data is None:
                dst.CopyFrom(src)
                return
            _copy_tensor_metadata(src, dst)
        offset = self.data.tell()
        if len(data) >= _ALIGNMENT and offset % _ALIGNMENT:
            offset += _ALIGNMENT - offset % _ALIGNMENT
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


def write_for_runtime(
    model: onnx.ModelProto,
    folder: str | os.PathLike[str],
    weights: Mapping[str, np.ndarray] | None = None,
    *,
    name: str = _MODEL_FILE,
) -> Path:
    """Write ``model`` into ``folder`` as ``name`` plus one fresh data file ``name.data``.

    Never serialises the whole model: each large tensor's bytes are written to the data
    file in turn, and only a small copy of the graph is serialised. ``model`` is read only
    (``onnx.save_model(save_as_external_data=True)`` rewrites the caller's tensors as
    external references). ``weights`` replaces the named constants (initializer names, or
    the output names of Constant nodes, in every scope) as they are written, like
    :func:`rdprune_onnx.graph.surgery.replace_weights` without the copy of the model.
    """
    target = Path(folder)
    data_name = name + ".data"
    with open(target / data_name, "wb") as data:
        writer = _ExternalWriter(data, data_name, weights)
        small = writer.model(model)
    missing = set(weights or {}) - writer.replaced
    if missing:
        raise KeyError(f"no constant named {sorted(missing)[0]!r} to replace")
    path = target / name
    path.write_bytes(small.SerializeToString())
    log.debug("wrote %s with %d external tensors", path, writer.moved)
    return path


class Session:
    """A thin wrapper over ``onnxruntime.InferenceSession`` built from a ModelProto.

    Models over :data:`EXTERNAL_DATA_THRESHOLD` go through a temporary folder (removed once
    the session exists, or by :meth:`close` where the platform keeps it open).
    ``weights`` runs the model with the named constants replaced (see
    :func:`write_for_runtime`): for large models without building a pruned copy.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        config: SessionConfig | None = None,
        *,
        weights: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        self._folder: Path | None = None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = self.config.intra_op_threads
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.config.optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        providers = [_NAMES["cpu"]]
        if self.config.provider == "cuda":
            providers = [_NAMES["cuda"], _NAMES["cpu"]]
        if _model_data_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            self._session = self._from_folder(model, options, providers, weights)
        else:
            if weights:
                model = replace_weights(model, weights)
            self._session = _create(model.SerializeToString(), options, providers)
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.input_names = [i.name for i in self._session.get_inputs()]

    def _from_folder(
        self,
        model: onnx.ModelProto,
        options: ort.SessionOptions,
        providers: list[str],
        weights: Mapping[str, np.ndarray] | None,
    ) -> ort.InferenceSession:
        _sweep_stale(Path(tempfile.gettempdir()))
        folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        try:
            try:
                path = write_for_runtime(model, folder, weights)
            except OSError as exc:
                raise UserError(
                    f"cannot write the model for ONNX Runtime to {str(folder)!r}: "
                    f"{exc.strerror or exc}",
                    "large models are staged in the temporary folder; free space there or "
                    "point TMPDIR at a disk with room for a copy of the model",
                ) from None
            return _create(str(path), options, providers)
        finally:
            try:
                shutil.rmtree(folder)
            except OSError:  # still open (Windows maps the data file): remove on close
                self._folder = folder

    def close(self) -> None:
        """Release the ONNX Runtime session and any temporary files it still holds."""
        self._session = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if getattr(self, "_folder", None) is not None:
                self.close()

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> list[np.ndarray]:
        if self._session is None:
            raise ValueError("the session is closed")
        try:
            result = self._session.run(list(outputs) if outputs else None, dict(feeds))
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UserError(
                f"ONNX Runtime failed to run the model: {message[:300]}",
                "check that the calibration data fits the model's inputs",
            ) from None
        return [np.asarray(r) for r in result]


def _sweep_stale(parent: Path) -> None:
    """Remove staging folders of processes that died while creating a session.

    A run killed for memory (likely with models this size) cannot clean up after itself and
    would leave a copy of the model behind. POSIX only (``os.kill(pid, 0)`` probes there).
    """
    if os.name != "posix":
        return
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith(_PREFIX) and e.is_dir()]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        pid = entry.name[len(_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            newest = max([entry.stat().st_mtime] + [f.stat().st_mtime for f in entry.iterdir()])
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if now - newest > _STALE_AFTER:
                log.info("removing %s, left by a process that is gone", entry)
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # gone meanwhile, or alive under another user
            continue


def _create(
    model: bytes | str, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise UserError(
            f"ONNX Runtime cannot load the model: {message[:300]}",
            "the graph uses an operator or type this onnxruntime does not support",
        ) from None
