"""rdprune-onnx: rate-distortion layer-adaptive weight pruning for ONNX models."""

from rdprune_onnx.errors import InfeasibleError, InternalError, UserError
from rdprune_onnx.inspect import ModelSummary, inspect_model
from rdprune_onnx.pipeline import measure, prune, prune_from_curves
from rdprune_onnx.result import LayerResult, PruneResult
from rdprune_onnx.search import QualityTarget
from rdprune_onnx.settings import CalibrationSpec, EvalSpec, OutputSpec, PruneSettings
from rdprune_onnx.sweep import sweep

__version__ = "0.1.0"

__all__ = [
    "CalibrationSpec",
    "EvalSpec",
    "InfeasibleError",
    "InternalError",
    "LayerResult",
    "ModelSummary",
    "OutputSpec",
    "PruneResult",
    "PruneSettings",
    "QualityTarget",
    "UserError",
    "__version__",
    "inspect_model",
    "measure",
    "prune",
    "prune_from_curves",
    "sweep",
]
