"""Masks: which weights of a layer are pruned at a given count.

A registry maps mask names to criteria (one small class per criterion behind the
:class:`~rdprune_onnx.masks.base.MaskCriterion` protocol, as Torch-Pruning's importance
criteria); adding a mask is one module in this package plus one line in ``_REGISTRY``.
Every criterion gives a nested, exact-count order (``order[:k]`` is the mask at count k).

- ``magnitude`` (default): smallest |w| first.
- ``wanda``: |W| x the L2 norm of the matching input feature over the calibration data,
  compared per output row; needs statistics (:mod:`rdprune_onnx.activations`).
- ``sparsegpt``: chosen by OBS saliency from each layer's Hessian and the kept weights
  updated in the same sweep, by the refit (:mod:`rdprune_onnx.reconstruct`, which the
  pipeline then always runs); magnitude order before it.

This package is pure numpy.
"""

from __future__ import annotations

from rdprune_onnx.errors import UserError
from rdprune_onnx.masks.base import LayerStats, MaskCriterion, interleaved_order
from rdprune_onnx.masks.magnitude import (
    MagnitudeMask,
    apply_mask,
    magnitude_order,
    prune_count,
    sparsity,
)
from rdprune_onnx.masks.sparsegpt import SparseGPTMask
from rdprune_onnx.masks.wanda import WandaMask

_REGISTRY: dict[str, MaskCriterion] = {
    "magnitude": MagnitudeMask(),
    "wanda": WandaMask(),
    "sparsegpt": SparseGPTMask(),
}

MASKS: tuple[str, ...] = tuple(_REGISTRY)
# Where a data-aware mask takes its statistics in the final prune: the dense model's
# activations (one pass), or each layer's inputs in the model pruned so far.
MASK_INPUTS: tuple[str, ...] = ("dense", "sequential")


def get_mask(name: str) -> MaskCriterion:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown mask {name!r}", f"choose one of {', '.join(MASKS)}") from None


__all__ = [
    "MASKS",
    "MASK_INPUTS",
    "LayerStats",
    "MagnitudeMask",
    "MaskCriterion",
    "SparseGPTMask",
    "WandaMask",
    "apply_mask",
    "get_mask",
    "interleaved_order",
    "magnitude_order",
    "prune_count",
    "sparsity",
]
