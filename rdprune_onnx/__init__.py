"""rdprune-onnx: rate-distortion layer-adaptive weight pruning for ONNX models."""

from rdprune_onnx.errors import InfeasibleError, InternalError, UserError
from rdprune_onnx.inspect import ModelSummary, inspect_model
from rdprune_onnx.pipeline import (
    CalibrationSpec,
    PruneResult,
    PruneSettings,
    prune,
)

__version__ = "0.1.0"

__all__ = [
    "CalibrationSpec",
    "InfeasibleError",
    "InternalError",
    "ModelSummary",
    "PruneResult",
    "PruneSettings",
    "UserError",
    "__version__",
    "inspect_model",
    "prune",
]
