"""ONNX Runtime: the only module that imports onnxruntime.

Sessions are built from in-memory models; the provider is chosen once (``auto`` takes the
CUDA execution provider when onnxruntime-gpu sees a GPU).

Small models reach ONNX Runtime as one serialised protobuf. A model whose tensors hold at
least :data:`EXTERNAL_DATA_THRESHOLD` bytes (protobuf cannot serialise a message over 2 GiB),
or that keeps tensors on disk (loaded from external data, see
:mod:`rdprune_onnx.graph.external`), is written to a temporary folder instead: its tensors
one at a time into a single data file, and a small copy of the graph that points at them.
The caller's model is never modified, copied whole or serialised whole. ONNX Runtime reads
(or maps) the files while the session is created and the folder is removed straight away
(see ``docs/large_models.md``). A model known to be a file as it was loaded is opened by
ONNX Runtime directly (``Session(..., path=...)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from rdprune_onnx.errors import InternalError, UserError
from rdprune_onnx.graph.external import write_external
from rdprune_onnx.graph.load import data_bytes, has_lazy
from rdprune_onnx.graph.surgery import replace_weights

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")
_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}

# Models whose tensors hold at least this many bytes reach ONNX Runtime through a
# temporary folder with external data rather than as one serialised message. Protobuf's
# limit is 2 GiB; below it the file route is still the leaner one (ONNX Runtime keeps no
# copy of the initializers it pre-packs from a file), so it starts well before the limit.
EXTERNAL_DATA_THRESHOLD = 512 * 1024**2
_MODEL_FILE = "model.onnx"
# Staging folders are named ``rdprune-ort-<pid>-<random>``; one whose process is gone and
# that has not changed for this long (seconds) was left by a killed run and is removed.
_PREFIX = "rdprune-ort-"
_STALE_AFTER = 3600


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


def write_for_runtime(
    model: onnx.ModelProto,
    folder: str | os.PathLike[str],
    weights: Mapping[str, np.ndarray] | None = None,
    *,
    name: str = _MODEL_FILE,
) -> Path:
    """:func:`rdprune_onnx.graph.external.write_external` (``model.onnx`` by default)."""
    return write_external(model, folder, weights, name=name)


class Session:
    """A thin wrapper over ``onnxruntime.InferenceSession`` built from a ModelProto.

    Models over :data:`EXTERNAL_DATA_THRESHOLD` go through a temporary folder (removed once
    the session exists, or by :meth:`close` where the platform keeps it open).
    ``weights`` runs the model with the named constants replaced (see
    :func:`write_for_runtime`): for large models without building a pruned copy.
    ``path`` says that ``model`` is exactly that file as loaded (unchanged): ONNX Runtime
    then reads the file itself instead of a staged copy.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        config: SessionConfig | None = None,
        *,
        weights: Mapping[str, np.ndarray] | None = None,
        path: str | os.PathLike[str] | None = None,
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
        if path is not None and not weights:
            # ``model`` is this file as loaded: ONNX Runtime opens it (and its data) itself.
            self._session = _create(str(path), options, providers)
        elif has_lazy(model) or data_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
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
            with _run_options() as options:
                result = self._session.run(list(outputs) if outputs else None, dict(feeds), options)
        except Exception as exc:
            raise _run_error(exc) from None
        return [np.asarray(r) for r in result]

    # --- IOBinding: values kept on the session's device between runs (the CUDA path) ---

    @property
    def device(self) -> str:
        """Where :meth:`to_device` puts values: ``cuda`` or ``cpu``."""
        return "cuda" if self.config.provider == "cuda" else "cpu"

    def to_device(self, array: np.ndarray) -> Any:
        """An ONNX Runtime value (``OrtValue``) holding a copy of ``array`` on the device."""
        copy = np.array(array, order="C", copy=True)
        return ort.OrtValue.ortvalue_from_numpy(copy, self.device, 0)

    @staticmethod
    def update_device(value: Any, array: np.ndarray) -> None:
        """Copy ``array`` (same shape and type) into a value made by :meth:`to_device`."""
        value.update_inplace(np.ascontiguousarray(array))

    def run_bound(
        self, feeds: Mapping[str, Any], outputs: Sequence[str], *, on_device: bool = False
    ) -> list[Any]:
        """Run through IOBinding. ``feeds`` are values from :meth:`to_device` (or numpy
        arrays, copied in); the outputs come back as numpy arrays, or with ``on_device`` as
        ``OrtValue`` objects left on the device (feed them to later runs without copies)."""
        if self._session is None:
            raise ValueError("the session is closed")
        binding = self._session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.device if on_device else "cpu", 0)
        try:
            with _run_options() as options:
                self._session.run_with_iobinding(binding, options)
        except Exception as exc:
            raise _run_error(exc) from None
        if on_device:
            return list(binding.get_outputs())
        return [np.asarray(v) for v in binding.copy_outputs_to_cpu()]


# --- stopping at once (Ctrl-C, SIGTERM) ----------------------------------------------------

_TERMINATED = threading.Event()
_ACTIVE: dict[int, Any] = {}  # id -> RunOptions of every run in progress
_ACTIVE_LOCK = threading.Lock()


def terminate_runs() -> None:
    """Stop every ONNX Runtime run in progress now (``RunOptions.terminate``) and refuse
    new ones (they raise ``KeyboardInterrupt``), so queued work drains at once. Safe to
    call from any thread (the command line calls it when SIGINT or SIGTERM arrives)."""
    _TERMINATED.set()
    with _ACTIVE_LOCK:
        for options in _ACTIVE.values():
            options.terminate = True


def reset_terminate() -> None:
    """Allow runs again after :func:`terminate_runs` (for a process that goes on)."""
    _TERMINATED.clear()


@contextlib.contextmanager
def _run_options() -> Iterator[Any]:
    if _TERMINATED.is_set():
        raise KeyboardInterrupt
    options = ort.RunOptions()
    with _ACTIVE_LOCK:
        _ACTIVE[id(options)] = options
    try:
        yield options
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.pop(id(options), None)


_USER_MODEL: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rdprune_user_model", default=None
)


@contextlib.contextmanager
def user_model(what: str = "the model") -> Iterator[None]:
    """Sessions created and run inside this block are on the user's own model and data: an
    ONNX Runtime failure there is the user's to fix (:class:`UserError`). Everywhere else
    the graphs are the library's (cut graphs, pruned copies) and a failure is a bug
    (:class:`InternalError`). Worker threads never inherit the block."""
    token = _USER_MODEL.set(what)
    try:
        yield
    finally:
        _USER_MODEL.reset(token)


def _failure(exc: Exception, doing: str, hint: str) -> Exception:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    what = _USER_MODEL.get()
    if what is not None:
        return UserError(f"ONNX Runtime {doing} {what}: {message[:300]}", hint)
    return InternalError(f"ONNX Runtime {doing} a graph rdprune-onnx built: {message[:300]}")


def _run_error(exc: Exception) -> BaseException:
    if _TERMINATED.is_set():  # terminated on purpose: not a failure of the model
        return KeyboardInterrupt()
    return _failure(exc, "failed to run", "check that the calibration data fits the model's inputs")


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
        raise _failure(
            exc,
            "cannot load",
            "the graph uses an operator or type this onnxruntime does not support",
        ) from None
