"""What every allocator sees and returns.

This package is pure numpy: no onnx, no onnxruntime. An allocator receives an
:class:`AllocationProblem` (the prunable layers, the target ratio, and, when it needs them,
the measured rate-distortion curves or the weight magnitudes) and returns the number of
weights to prune in each layer, keyed by the layer's weight (initializer) name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LayerSpec:
    """One prunable weight tensor as the allocators see it."""

    name: str
    shape: tuple[int, ...]
    # Cost of one weight of this layer in the budget: 1 for a parameter budget, the
    # multiply-accumulates each weight takes part in for a FLOPs budget.
    unit_cost: int = 1
    # Bounds on this layer's pruning ratio (constraints); 0 and 1 mean unconstrained.
    min_ratio: float = 0.0
    max_ratio: float = 1.0

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class Curve:
    """Measured rate-distortion curve of one layer: distortion[i] when pruning ratios[i]."""

    name: str
    ratios: FloatArray  # ascending, in [0, 1]
    distortion: FloatArray  # same length; need not be monotone or convex

    def __post_init__(self) -> None:
        if self.ratios.shape != self.distortion.shape or self.ratios.ndim != 1:
            raise ValueError(f"curve {self.name}: ratios and distortion must be 1-D, same length")


@dataclass(frozen=True)
class AllocationProblem:
    layers: Sequence[LayerSpec]
    target_ratio: float  # fraction of the total budget (sum size*unit_cost) to remove
    curves: Mapping[str, Curve] | None = None
    # Flattened absolute weight values per layer (for magnitude-based baselines).
    magnitudes: Mapping[str, FloatArray] | None = None
    options: Mapping[str, object] = field(default_factory=dict)

    @property
    def total_cost(self) -> int:
        return int(sum(layer.size * layer.unit_cost for layer in self.layers))

    @property
    def required_cost(self) -> int:
        """Budget units that must be removed: ceil(target * total), in whole weights."""
        return int(np.ceil(self.target_ratio * self.total_cost - 1e-9))


@dataclass(frozen=True)
class Allocation:
    """Weights to prune per layer, and what the allocator knows about its choice."""

    counts: Mapping[str, int]
    # Predicted distortion per layer (rd only; from the curves at the chosen counts).
    predicted: Mapping[str, float] | None = None
    info: Mapping[str, object] = field(default_factory=dict)

    def ratios(self, layers: Sequence[LayerSpec]) -> dict[str, float]:
        return {layer.name: self.counts[layer.name] / layer.size for layer in layers}


class Allocator(Protocol):
    """Chooses per-layer pruning counts for a problem."""

    name: str

    def allocate(self, problem: AllocationProblem) -> Allocation: ...
