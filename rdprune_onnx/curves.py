"""Rate-distortion curves: the output distortion of pruning one layer at a time.

For every prunable layer and every level of the grid, only that layer is pruned by
magnitude and the whole model is run on the calibration data; the distortion of its float
outputs against the dense model's is recorded. One ONNX Runtime session per layer serves
every level of that layer: the layer's weight becomes a graph input, so each candidate is
fed at run time instead of building a session per point. Where the graph can be cut below
the layer, only the downstream part runs for each candidate (see
:mod:`rdprune_onnx.graph.cut`).
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
from rdprune_onnx.graph.cut import Cut, downstream, with_outputs
from rdprune_onnx.graph.layers import Layer, read_weight
from rdprune_onnx.graph.load import data_bytes
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
    """The dense model's float outputs on the calibration batches (the distortion targets).

    ``base`` holds the outputs of the model being measured when it is not the dense one
    (iterative pruning measures a partly pruned model against the dense outputs).
    """

    outputs: list[str]
    batches: list[dict[str, np.ndarray]]
    values: list[list[np.ndarray]]
    base: list[list[np.ndarray]] | None = None

    def rebased(self, model: onnx.ModelProto, config: SessionConfig) -> Reference:
        """The same targets, with ``base`` from running ``model`` on the same batches."""
        session = Session(model, config)
        base = [session.run(feeds, self.outputs) for feeds in self.batches]
        return Reference(self.outputs, self.batches, self.values, base)


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
ENGINES = ("auto", "downstream", "full")
# Crossing tensors kept in memory at once, per layer; above this, calibration batches are
# processed in chunks (one extra dense pass per chunk).
DEFAULT_MEMORY_BUDGET = 2 * 1024**3


def infer_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value types (needed to cut it); unchanged if inference fails."""
    try:
        if data_bytes(model) < 2**31 - 1:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # inference is best effort: fall back to whole-model runs
        log.info("shape inference failed (%s); measuring on the whole model", exc)
    return model


class _LayerMeasurer:
    """Measures one layer's curve, on the downstream cut when it can, else the whole model."""

    def __init__(
        self,
        model: onnx.ModelProto,
        typed: onnx.ModelProto,
        layer: Layer,
        reference: Reference,
        config: SessionConfig,
        engine: str,
    ) -> None:
        self.reference = reference
        self.layer = layer
        self._first: dict[str, np.ndarray] = {}
        self.cut: Cut | None = None
        if engine != "full":
            self.cut = downstream(expose_as_inputs(typed, [layer.name]), layer.name)
            if self.cut is not None:
                # Only the float outputs are measured (integer ones, e.g. argmax, are not).
                self.cut.outputs = [o for o in self.cut.outputs if o in reference.outputs]
            if self.cut is None and engine == "downstream":
                log.info("%s: cannot cut the graph below it; running the whole model", layer.name)
        if self.cut is None:
            self.session = Session(expose_as_inputs(model, [layer.name]), config)
            self.upstream: Session | None = None
        else:
            self.session = Session(self.cut.model, config)
            inputs = set(reference.batches[0]) if reference.batches else set()
            self.internal = [n for n in self.cut.crossing if n not in inputs]
            self.upstream = (
                Session(with_outputs(typed, self.internal), config) if self.internal else None
            )

    def _crossing(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.cut is not None
        values = {n: feeds[n] for n in self.cut.crossing if n in feeds}
        if self.upstream is not None:
            got = self.upstream.run(feeds, self.internal)
            values.update(zip(self.internal, got, strict=True))
        return values

    def _chunks(self, budget: int) -> list[list[int]]:
        """Batch indices grouped so that one group's crossing tensors fit the budget."""
        count = len(self.reference.batches)
        if self.cut is None or count == 0:
            return [list(range(count))]
        sample = self._crossing(self.reference.batches[0])
        self._first = sample  # reused by measure(): the first batch's pass is not repeated
        per_batch = max(1, sum(v.nbytes for v in sample.values()))
        size = max(1, budget // per_batch)
        return [list(range(i, min(count, i + size))) for i in range(0, count, size)]

    def measure(
        self, weight: np.ndarray, ratios: np.ndarray, metric: str, budget: int, bar: tqdm
    ) -> np.ndarray:
        order = magnitude_order(weight)
        meters = [DistortionMeter(metric) for _ in ratios]
        ref = self.reference
        chunks = self._chunks(budget)
        for chunk in chunks:
            if self.cut is not None:
                crossing = [
                    self._first if b == 0 and self._first else self._crossing(ref.batches[b])
                    for b in chunk
                ]
                positions = [ref.outputs.index(o) for o in self.cut.outputs]
            for i, ratio in enumerate(ratios):
                pruned = apply_mask(weight, prune_count(float(ratio), weight.size), order)
                for j, b in enumerate(chunk):
                    if self.cut is None:
                        feeds = dict(ref.batches[b])
                        feeds[self.layer.name] = pruned
                        outs = self.session.run(feeds, ref.outputs)
                    else:
                        feeds = dict(crossing[j])
                        feeds[self.layer.name] = pruned
                        got = self.session.run(feeds, self.cut.outputs)
                        # Outputs the layer cannot affect keep the measured model's values.
                        outs = list((ref.base or ref.values)[b])
                        for position, value in zip(positions, got, strict=True):
                            outs[position] = value
                    meters[i].add(ref.values[b], outs)
                if len(chunks) == 1 or chunk is chunks[-1]:
                    bar.update(1)
        return np.array([m.value() for m in meters], dtype=np.float64)


def measure_curves(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    reference: Reference,
    *,
    ratios: np.ndarray,
    metric: str = "mse",
    config: SessionConfig | None = None,
    engine: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    done: Mapping[str, Curve] | None = None,
    on_curve: ProgressHook | None = None,
) -> dict[str, Curve]:
    """Measure each layer's curve at ``ratios``.

    ``engine`` ``downstream`` (``auto``) runs, for each candidate, only the part of the
    graph below the layer, fed with the dense model's tensors that cross the cut; ``full``
    runs the whole model with the layer's weight as a graph input. Both give the same
    values to float tolerance. ``done`` holds curves already measured (from a cache); they
    are not measured again. ``on_curve`` is called after each new curve, e.g. to save it.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}", f"choose one of {', '.join(ENGINES)}")
    config = config or SessionConfig()
    done = dict(done or {})
    curves: dict[str, Curve] = {}
    todo = [layer for layer in layers if layer.name not in done]
    total = len(todo) * len(ratios)
    typed = infer_types(model) if engine != "full" and todo else model
    started = time.perf_counter()
    with tqdm(
        total=total, disable=not progress, unit="pt", desc="curves", leave=False, delay=0.5
    ) as bar:
        for layer in layers:
            if layer.name in done:
                curves[layer.name] = done[layer.name]
                continue
            measurer = _LayerMeasurer(model, typed, layer, reference, config, engine)
            weight = read_weight(model, layer.name)
            distortion = measurer.measure(weight, ratios, metric, memory_budget, bar)
            curve = Curve(layer.name, np.asarray(ratios, dtype=np.float64), distortion)
            curves[layer.name] = curve
            if on_curve is not None:
                on_curve(layer.name, curve)
    log.info("measured %d curve points in %.1f s", total, time.perf_counter() - started)
    return curves
