"""What a prune did: per-layer choices, distortions, files (:class:`PruneResult`), and the
JSON report made from it (:meth:`PruneResult.to_dict`; its keys are a stable interface)."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any

import onnx

from rdprune_onnx.allocate import Curve
from rdprune_onnx.evaluate import Evaluation
from rdprune_onnx.graph.layers import Skipped
from rdprune_onnx.runtime import versions
from rdprune_onnx.settings import PruneSettings


@dataclass
class LayerResult:
    name: str
    op_types: tuple[str, ...]
    shape: tuple[int, ...]
    size: int
    pruned: int
    ratio: float
    sparsity_before: float
    predicted: float | None
    refit: dict[str, Any] | None = None  # solver, layer output error before/after refit


@dataclass
class PruneResult:
    """What :func:`prune` did: the per-layer choices, the distortions and the files."""

    input: str
    output: str | None
    settings: PruneSettings
    provider: str
    samples: int
    layers: list[LayerResult]
    skipped: list[Skipped]
    target_ratio: float
    achieved_ratio: float
    predicted_distortion: float | None
    measured_distortion: float | None
    timings: dict[str, float]
    allocation_info: dict[str, Any]
    curves: dict[str, Curve] | None = None
    evaluation: Evaluation | None = None
    model: onnx.ModelProto | None = field(default=None, repr=False)
    # prune to a quality target (rdprune_onnx.search): the target, every probe, the choice
    search: dict[str, Any] | None = None
    # Each output's resolved kind (rdprune_onnx.distortion.OutputKind), when measured.
    output_kinds: dict[str, Any] | None = None
    # Every file this run wrote (the model, its data file, the report).
    files: list[str] = field(default_factory=list)
    # How the curve points were scheduled (rd only): see GridResult.summary.
    curve_points: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "settings": self.settings.to_dict(),
            "provider": self.provider,
            "calibration_samples": self.samples,
            "target_ratio": self.target_ratio,
            "achieved_ratio": self.achieved_ratio,
            "distortion": {
                "metric": self.settings.metric,
                "predicted": self.predicted_distortion,
                "measured": self.measured_distortion,
                "predicted_over_measured": (
                    self.predicted_distortion / self.measured_distortion
                    if self.predicted_distortion is not None and self.measured_distortion
                    else None
                ),
                "output_kinds": self.output_kinds,
            },
            "layers": [vars(layer) | {"shape": list(layer.shape)} for layer in self.layers],
            "skipped": [vars(s) for s in self.skipped],
            "allocation": self.allocation_info,
            "curves": (
                {
                    name: {"ratios": c.ratios.tolist(), "distortion": c.distortion.tolist()}
                    for name, c in self.curves.items()
                }
                if self.curves
                else None
            ),
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
            "search": self.search,
            "curve_points_measured": (
                self.curve_points["curve_points_measured"] if self.curve_points else None
            ),
            "curve_points_full_grid": (
                self.curve_points["curve_points_full_grid"] if self.curve_points else None
            ),
            "curve_grid": self.curve_points,
            "timings_s": self.timings,
            "versions": versions() | {"python": platform.python_version()},
        }


__all__ = ["LayerResult", "PruneResult"]
