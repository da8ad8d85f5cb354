"""Allocation methods: choose how many weights each layer loses.

A registry maps method names to allocator classes; adding a method is one module in this
package plus one line here.
"""

from __future__ import annotations

import importlib

from rdprune_onnx.allocate.base import (
    Allocation,
    AllocationProblem,
    Allocator,
    Curve,
    LayerSpec,
)
from rdprune_onnx.errors import UserError

# name -> "module:Class", imported on first use.
_REGISTRY: dict[str, str] = {
    "rd": "rdprune_onnx.allocate.rd:RateDistortionAllocator",
    "uniform": "rdprune_onnx.allocate.uniform:UniformAllocator",
    "uniform-plus": "rdprune_onnx.allocate.uniform:UniformPlusAllocator",
    "global": "rdprune_onnx.allocate.global_magnitude:GlobalMagnitudeAllocator",
    "lamp": "rdprune_onnx.allocate.lamp:LampAllocator",
    "erk": "rdprune_onnx.allocate.erk:ErkAllocator",
}

METHODS: tuple[str, ...] = tuple(_REGISTRY)


def get_allocator(name: str) -> Allocator:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown allocation method {name!r}", f"choose one of: {', '.join(METHODS)}"
        ) from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    allocator: Allocator = cls()
    return allocator


__all__ = [
    "METHODS",
    "Allocation",
    "AllocationProblem",
    "Allocator",
    "Curve",
    "LayerSpec",
    "get_allocator",
]
