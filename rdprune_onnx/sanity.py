"""Calibration and model sanity (issue 12): what cannot be measured is refused or named.

Weights holding NaN or Inf are the model's fault; a dense output that is the same for
every calibration sample says nothing; layers whose whole curve is zero never reached the
output on this data and are held at the median ratio of the others (see
:func:`keep_unused`) unless the user asks to prune them freely.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from rdprune_onnx import calibration as calib
from rdprune_onnx.allocate import Allocation, Curve, LayerSpec
from rdprune_onnx.curves import Reference
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import Layer, read_weight

log = logging.getLogger(__name__)


def zero_values(model: onnx.ModelProto) -> dict[str, float]:
    return {spec.name: 0.0 for spec in calib.model_inputs(model)}


def check_finite_weights(model: onnx.ModelProto, layers: Sequence[Layer]) -> None:
    """NaN or Inf in a weight is the model's fault, not the calibration data's."""
    for layer in layers:
        weight = read_weight(model, layer.name)
        if weight.dtype.kind == "f" and not np.all(np.isfinite(weight)):
            bad = int(np.count_nonzero(~np.isfinite(weight)))
            raise UserError(
                f"weight {layer.name!r} holds {bad} NaN or Inf value(s)",
                "the model itself is broken; re-export it from a healthy checkpoint",
            )
        del weight


def warn_constant_outputs(reference: Reference) -> None:
    """Warn loudly when a dense output is the same for every calibration sample."""
    for position, name in enumerate(reference.outputs):
        values = [batch[position] for batch in reference.values]
        if sum(v.shape[0] if v.ndim else 1 for v in values) < 2:
            continue
        if values[0].ndim == 0 or not values[0].size:
            continue
        first = values[0][:1]  # the first sample's output
        if all(np.array_equal(v, np.broadcast_to(first, v.shape)) for v in values):
            log.warning(
                "the dense model's output %r is one constant value on every calibration "
                "sample: distortion measured on it says nothing about the other inputs; "
                "use more varied calibration data",
                name,
            )


def unused_layers(curves: Mapping[str, Curve], names: Sequence[str]) -> list[str]:
    """Layers whose whole curve is zero: pruning them never changed the output on the
    calibration data (e.g. a branch for another input mode)."""
    return [
        name
        for name in names
        if name in curves
        and len(curves[name].distortion) > 1
        and not np.any(curves[name].distortion[1:])
    ]


def keep_unused(
    specs: list[LayerSpec], allocation: Allocation, unused: Sequence[str]
) -> list[LayerSpec] | None:
    """The specs with every unused layer fixed at the median ratio the others got, or
    None when there is nothing to hold back (no unused layer, or no other layer)."""
    others = [s for s in specs if s.name not in unused]
    if not unused or not others:
        return None
    ratios = allocation.ratios(specs)
    median = float(np.median([ratios[s.name] for s in others]))
    out = []
    for spec in specs:
        if spec.name in unused:
            keep = min(max(median, spec.min_ratio), spec.max_ratio)
            spec = dataclasses.replace(spec, min_ratio=spec.min_ratio, max_ratio=keep)
        out.append(spec)
    return out
