"""Rate-distortion curves: the output distortion of pruning one layer at a time.

For every prunable layer and every level of the grid, only that layer is pruned by
magnitude and the whole model is run on the calibration data; the distortion of its float
outputs against the dense model's is recorded. One ONNX Runtime session per layer serves
every level of that layer: the layer's weight becomes a graph input, so each candidate is
fed at run time instead of building a session per point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm import tqdm

from rdprune_onnx.allocate import Curve
from rdprune_onnx.calibration import batches
from rdprune_onnx.distortion import DistortionMeter
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import Layer, read_weight
from rdprune_onnx.graph.surgery import expose_as_inputs
from rdprune_onnx.masks import apply_mask, magnitude_order, prune_count
from rdprune_onnx.runtime import Session, SessionConfig

log = logging.getLogger(__name__)


def grid(levels: int) -> np.ndarray:
    """``levels`` evenly spaced pruning ratios from 0 to 1 (101 gives 0, 0.01, ..., 1)."""
    if levels < 2:
        raise UserError(f"--levels must be at least 2, got {levels}", "the paper uses 101")
    return np.linspace(0.0, 1.0, levels)


def float_outputs(model: onnx.ModelProto) -> list[str]:
    names = []
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type if out.type.HasField("tensor_type") else 0
        if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            names.append(out.name)
    if not names:
        raise UserError(
            "the model has no float output to measure distortion on",
            "rdprune-onnx compares float outputs (logits, embeddings, features)",
        )
    return names


@dataclass
class Reference:
    """The dense model's float outputs on the calibration batches."""

    outputs: list[str]
    batches: list[dict[str, np.ndarray]]
    values: list[list[np.ndarray]]


def run_reference(
    model: onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    batch_size: int,
    config: SessionConfig,
) -> Reference:
    outputs = float_outputs(model)
    session = Session(model, config)
    cut = list(batches(data, batch_size))
    values = [session.run(feeds, outputs) for feeds in cut]
    for name, position in zip(outputs, range(len(outputs)), strict=True):
        for value in values:
            if not np.all(np.isfinite(value[position])):
                raise UserError(
                    f"the dense model's output {name!r} has NaN or Inf on the calibration data",
                    "check the calibration data (value ranges, normalisation)",
                )
    return Reference(outputs, cut, values)


def measure_distortion(
    session: Session,
    reference: Reference,
    metric: str,
    extra_feeds: Mapping[str, np.ndarray] | None = None,
) -> float:
    meter = DistortionMeter(metric)
    for feeds, ref in zip(reference.batches, reference.values, strict=True):
        run_feeds = dict(feeds)
        if extra_feeds:
            run_feeds.update(extra_feeds)
        meter.add(ref, session.run(run_feeds, reference.outputs))
    return meter.value()


ProgressHook = Callable[[str, Curve], None]


def measure_curves(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    reference: Reference,
    *,
    ratios: np.ndarray,
    metric: str = "mse",
    config: SessionConfig | None = None,
    progress: bool = False,
    done: Mapping[str, Curve] | None = None,
    on_curve: ProgressHook | None = None,
) -> dict[str, Curve]:
    """Measure each layer's curve at ``ratios``.

    ``done`` holds curves already measured (from a cache); they are not measured again.
    ``on_curve`` is called after each new curve, e.g. to save progress.
    """
    config = config or SessionConfig()
    done = dict(done or {})
    curves: dict[str, Curve] = {}
    todo = [layer for layer in layers if layer.name not in done]
    total = len(todo) * len(ratios)
    started = time.perf_counter()
    with tqdm(
        total=total, disable=not progress, unit="pt", desc="curves", leave=False, delay=0.5
    ) as bar:
        for layer in layers:
            if layer.name in done:
                curves[layer.name] = done[layer.name]
                continue
            weight = read_weight(model, layer.name)
            order = magnitude_order(weight)
            session = Session(expose_as_inputs(model, [layer.name]), config)
            distortion = np.empty(len(ratios), dtype=np.float64)
            for i, ratio in enumerate(ratios):
                pruned = apply_mask(weight, prune_count(float(ratio), weight.size), order)
                distortion[i] = measure_distortion(session, reference, metric, {layer.name: pruned})
                bar.update(1)
            curve = Curve(layer.name, np.asarray(ratios, dtype=np.float64), distortion)
            curves[layer.name] = curve
            if on_curve is not None:
                on_curve(layer.name, curve)
    log.info("measured %d curve points in %.1f s", total, time.perf_counter() - started)
    return curves
