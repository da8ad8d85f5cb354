"""ONNX Runtime: the only module that imports onnxruntime.

Sessions are built from in-memory models; the provider is chosen once (``auto`` takes the
CUDA execution provider when onnxruntime-gpu sees a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from rdprune_onnx.errors import UserError

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda")
_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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


class Session:
    """A thin wrapper over ``onnxruntime.InferenceSession`` built from a ModelProto."""

    def __init__(self, model: onnx.ModelProto, config: SessionConfig | None = None) -> None:
        self.config = config or SessionConfig()
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
        try:
            self._session = ort.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=providers
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UserError(
                f"ONNX Runtime cannot load the model: {message[:300]}",
                "the graph uses an operator or type this onnxruntime does not support",
            ) from None
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> list[np.ndarray]:
        try:
            result = self._session.run(list(outputs) if outputs else None, dict(feeds))
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise UserError(
                f"ONNX Runtime failed to run the model: {message[:300]}",
                "check that the calibration data fits the model's inputs",
            ) from None
        return [np.asarray(r) for r in result]
