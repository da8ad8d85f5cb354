"""Rate-distortion curves: the output distortion of pruning one layer at a time.

For every prunable layer and every level of the grid, only that layer is pruned by
magnitude and the whole model is run on the calibration data; the distortion of its float
outputs against the dense model's is recorded. One ONNX Runtime session per layer serves
every level of that layer: the layer's weight becomes a graph input, so each candidate is
fed at run time instead of building a session per point.

What makes it fast, each shortcut giving the values a full-model run gives (to float
rounding; tests/test_curves_engine.py checks them against such runs):

* Where the graph can be cut below the layer, only the downstream part runs for each
  candidate (:mod:`rdprune_onnx.graph.cut`); the weight is its only new input, so ONNX
  Runtime still folds and fuses everything else. The cut is built straight from the model
  (no whole-model copy per layer), and a BatchNormalization right after the layer's Conv is
  folded into the fed weight (the mask still chosen on the original weight).
* One dense pass keeps the tensors that cross every layer's cut, within a memory budget:
  above it layers are grouped (one pass per group) and a layer whose tensors alone do not
  fit streams over chunks of batches.
* Masks: one stable sort per layer, then each level zeroes only the positions the previous
  level kept. Levels that prune no more than the zeros already there are the measured
  model's own distortion and are not run; levels with the same count are run once.
* On the CPU two candidates run at once on one session (:func:`worker_layout`); the next
  layer's session is built on another thread meanwhile. On CUDA the dense tensors, inputs
  and candidates stay on the GPU between runs (IOBinding).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from rdprune_onnx.allocate import Curve
from rdprune_onnx.calibration import batches
from rdprune_onnx.distortion import DistortionMeter
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.batchnorm import fold_batchnorm
from rdprune_onnx.graph.cut import Cut, build_cut, downstream, with_outputs
from rdprune_onnx.graph.layers import Layer, read_weight
from rdprune_onnx.graph.load import data_bytes
from rdprune_onnx.graph.surgery import expose_as_inputs
from rdprune_onnx.graph.types import elem_bytes, infer_types, value_types
from rdprune_onnx.masks import magnitude_order, prune_count
from rdprune_onnx.memory import DEFAULT_MEMORY_BUDGET
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
        zipmap = any(n.op_type == "ZipMap" for n in model.graph.node)
        raise UserError(
            "the model has no float output to measure distortion on"
            + (" (its probabilities go through a ZipMap into a list of maps)" if zipmap else ""),
            "convert it again with skl2onnx's options={'zipmap': False} to get a float "
            "probability tensor"
            if zipmap
            else "rdprune-onnx compares float outputs (logits, embeddings, features)",
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
# DEFAULT_MEMORY_BUDGET (rdprune_onnx.memory): dense crossing tensors kept in memory at once
# (over all the layers measured from them, on the session's device); above it, layers are
# measured in groups (one dense pass each) and a layer whose own tensors do not fit streams
# over chunks of calibration batches.
# The next layer's session is built while this one runs only for models up to this size
# (their tensors' bytes): it holds a second cut of the model meanwhile.
PREFETCH_MAX_BYTES = 512 * 1024**2
# Tests set this to run the IOBinding route (the CUDA one) on the CPU provider.
_FORCE_BINDING = False


@dataclass
class LayerCandidates:
    """What to feed for one layer's candidates instead of the plain masked weight.

    ``names[0]`` is the layer's weight; the others are further tensors of the model (e.g.
    the layer's bias initializer) fed together with it. ``make`` receives the masked weight
    (a fresh array, pruned positions zero) and the level's ratio and returns an array for
    every name in ``names``.
    """

    names: list[str]
    make: Callable[[np.ndarray, float], dict[str, np.ndarray]]


# Called once per measured layer with the layer and its dense weight; None: plain masking.
CandidateFactory = Callable[[Layer, np.ndarray], LayerCandidates | None]
# The mask order of a layer (flat indices, first pruned first; see rdprune_onnx.masks), from
# the layer and its weight as measured; None: magnitude order.
MaskOrder = Callable[[Layer, np.ndarray], np.ndarray]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def worker_layout(config: SessionConfig, workers: int | None = None) -> tuple[int, SessionConfig]:
    """How many candidates run at once, and the session settings of each.

    On the CPU the thread budget (``config.intra_op_threads``, 0 = every core) is split
    over ``workers`` concurrent runs of one shared session (default: 2 when the budget
    allows it; measured faster than one run on two intra-op threads, see
    ``docs/benchmark.md``). On CUDA one run at a time.
    """
    if config.provider != "cpu":
        return 1, config
    total = config.intra_op_threads or _cpu_count()
    count = max(1, workers) if workers is not None else min(2, total)
    per = max(1, total // count)
    return count, replace(config, intra_op_threads=per)


class _Schedule:
    """Which levels of a layer need a run; the others copy a run's value or the base's.

    A level that prunes no more weights than are zero already leaves the weight as it is:
    its distortion is the measured model's own (0 when it is the dense one), known without
    running. Levels with the same count share one mask, hence one value.
    """

    def __init__(self, ratios: np.ndarray, size: int, zeros: int, plain: bool) -> None:
        self.counts = [prune_count(float(r), size) for r in ratios]
        self.base: list[int] = []
        self.copies: dict[int, int] = {}
        self.runs: list[int] = []
        first: dict[int, int] = {}
        for index in sorted(range(len(ratios)), key=lambda i: (self.counts[i], i)):
            count = self.counts[index]
            if plain and count <= zeros:
                self.base.append(index)
            elif plain and count in first:
                self.copies[index] = first[count]
            else:
                first.setdefault(count, index)
                self.runs.append(index)

    def segments(self, parts: int) -> list[list[int]]:
        """The levels to run in ``parts`` contiguous runs of increasing count."""
        parts = max(1, min(parts, len(self.runs)))
        bounds = np.linspace(0, len(self.runs), parts + 1).round().astype(int)
        return [self.runs[a:b] for a, b in itertools.pairwise(bounds) if b > a]


class _Context:
    """What every layer's measurement shares: the model, the targets, the workers."""

    def __init__(
        self,
        model: onnx.ModelProto,
        typed: onnx.ModelProto,
        reference: Reference,
        config: SessionConfig,
        engine: str,
        metric: str,
        budget: int,
        workers: int,
        pool: ThreadPoolExecutor | None,
        bar: tqdm,
    ) -> None:
        self.model = model
        self.typed = typed
        self.reference = reference
        self.config = config
        self.engine = engine
        self.metric = metric
        self.budget = budget
        self.workers = workers
        self.pool = pool
        self.bar = bar
        self.binding = config.provider == "cuda" or _FORCE_BINDING
        self.inputs = set(reference.batches[0]) if reference.batches else set()
        self._types: dict[str, onnx.ValueInfoProto] | None = None
        self.sample: dict[str, Any] | None = None
        self.sample_session: Session | None = None
        self._last_session: Session | None = None
        self._capture = False
        # crossing_values edits ``typed`` for a moment while the next layer's measurer
        # reads it on the builder thread: both hold this lock.
        self.lock = threading.Lock()

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``fn`` over ``items`` on the workers (in order of the items)."""
        if self.pool is None or len(items) < 2:
            return [fn(item) for item in items]
        return list(self.pool.map(fn, items))

    @property
    def types(self) -> dict[str, onnx.ValueInfoProto]:
        if self._types is None:
            self._types = value_types(self.typed)
        return self._types

    def batch_bytes(self, names: Sequence[str]) -> dict[str, int | None]:
        """Bytes of each named tensor over all calibration batches, from the inferred
        shapes with the inputs' symbolic dimensions bound to the batches' sizes (None where
        a dimension stays unknown)."""
        bindings: list[dict[str, int]] = []
        graph_inputs = {i.name: i for i in self.typed.graph.input}
        for feeds in self.reference.batches:
            bound: dict[str, int] = {}
            for name, array in feeds.items():
                spec = graph_inputs.get(name)
                if spec is None or not spec.type.HasField("tensor_type"):
                    continue
                for dim, size in zip(spec.type.tensor_type.shape.dim, array.shape, strict=False):
                    if dim.dim_param:
                        bound[dim.dim_param] = int(size)
            bindings.append(bound)
        out: dict[str, int | None] = {}
        for name in names:
            value = self.types.get(name)
            if value is None or not value.type.tensor_type.HasField("shape"):
                out[name] = None
                continue
            total: int | None = 0
            for bound in bindings:
                size = elem_bytes(value)
                for dim in value.type.tensor_type.shape.dim:
                    if dim.HasField("dim_value"):
                        size *= dim.dim_value
                    elif dim.dim_param in bound:
                        size *= bound[dim.dim_param]
                    else:
                        total = None
                        break
                if total is None:
                    break
                total += size
            out[name] = total
        return out

    def crossing_values(self, names: Sequence[str], batch_ids: Sequence[int]) -> _Store:
        """The dense model's values of ``names`` (crossing tensors) on the given batches,
        from one pass (graph inputs are taken from the batches as they are). Batch 0's
        values kept by :meth:`keep_sample` are used, and then let go."""
        internal = [n for n in names if n not in self.inputs]
        store: _Store = {b: {} for b in batch_ids}
        batches = self.reference.batches
        for b in batch_ids:
            for name in names:
                if name in self.inputs:
                    store[b][name] = batches[b][name]
        todo = list(batch_ids)
        reuse: Session | None = None
        if self.sample is not None and not self._capture:
            # The first pass after the sample uses it if it can; either way it is let go.
            if all(n in self.sample for n in internal):
                reuse = self.sample_session
                if 0 in store:
                    store[0].update({n: self.sample[n] for n in internal})
                    todo.remove(0)
            self.sample = self.sample_session = None
        if not internal or not todo:
            return store
        if reuse is not None:
            session = reuse  # it outputs these tensors already (and more)
        elif self.typed is not self.model:
            # Our own typed copy: add the outputs for the session, then take them off.
            graph = self.typed.graph
            before = len(graph.output)
            existing = {o.name for o in graph.output}
            with self.lock:
                graph.output.extend(self.types[n] for n in internal if n not in existing)
                try:
                    session = Session(self.typed, self.config)
                finally:
                    del graph.output[before:]
        else:
            session = Session(with_outputs(self.typed, internal), self.config)

        if self._capture:
            self._last_session = session

        def dense(b: int) -> list[Any]:
            if self.binding:
                return session.run_bound(batches[b], internal, on_device=True)
            return session.run(batches[b], internal)

        for b, got in zip(todo, self.map(dense, todo), strict=True):
            store[b].update(zip(internal, got, strict=True))
        return store

    def keep_sample(self, names: Sequence[str]) -> dict[str, Any]:
        """Batch 0's values of ``names``, kept (with the session that made them) for the
        first dense pass that needs no other tensors."""
        self.sample = self.sample_session = None
        self._capture = True
        try:
            sample = self.crossing_values(names, [0])[0]
        finally:
            self._capture = False
        self.sample, self.sample_session = sample, self._last_session
        self._last_session = None
        return sample


_Store = dict[int, dict[str, Any]]


class _LayerMeasurer:
    """Measures one layer's curve, on the downstream cut when it can, else the whole model.

    Built once per measured layer (after its dense crossing tensors, if any, are known).
    """

    def __init__(
        self,
        context: _Context,
        layer: Layer,
        weight: np.ndarray,
        plan: Cut | None,
        factory: CandidateFactory | None,
        mask_order: MaskOrder | None = None,
    ) -> None:
        self.context = context
        self.layer = layer
        self.weight = weight
        # The mask order (magnitude unless a mask criterion gives one), once per layer.
        # Measurers are built on the builder thread while the previous layer runs, so this
        # sort costs no wall time there.
        self.order = magnitude_order(weight) if mask_order is None else mask_order(layer, weight)
        self.candidates = factory(layer, weight) if factory is not None else None
        # The state of the chunk being measured (set by measure, read by the workers).
        self.current: _Store | None = None
        self.chunk: list[int] = []
        self.last = True
        names = [layer.name]
        if self.candidates is not None:
            names = list(dict.fromkeys(self.candidates.names))
            if not names or names[0] != layer.name:
                raise ValueError(f"candidate names for {layer.name} must start with it")
            if plan is not None and names != [layer.name]:
                with context.lock:
                    plan = downstream(context.typed, names, build=False)
        self.names = names
        self.cut = plan
        self.scale: Callable[[np.ndarray], np.ndarray] | None = None
        config = context.config
        if self.cut is not None and not set(self.cut.outputs) & set(context.reference.outputs):
            self.cut = None  # it reaches no float output: the whole model says so
        if self.cut is not None:
            with context.lock:
                cut_model = build_cut(context.typed, self.cut)
            # Only the float outputs are measured (integer ones, e.g. argmax, are not).
            self.cut.outputs = [o for o in self.cut.outputs if o in context.reference.outputs]
            keep = set(self.cut.outputs)
            if len(keep) != len(cut_model.graph.output):
                outs = [o for o in cut_model.graph.output if o.name in keep]
                del cut_model.graph.output[:]
                cut_model.graph.output.extend(outs)
            if self.candidates is None:
                self.scale = fold_batchnorm(cut_model, layer.name)
            self.session = Session(cut_model, config)
            self.nbytes = data_bytes(cut_model)
            del cut_model
            ref = context.reference
            self.positions = [ref.outputs.index(o) for o in self.cut.outputs]
        else:
            self.session = Session(expose_as_inputs(context.model, names), config)
            self.nbytes = data_bytes(context.model)

    def close(self) -> None:
        self.session.close()
        self.current = None

    def _feeds(self, masked: np.ndarray, ratio: float) -> dict[str, np.ndarray]:
        if self.candidates is not None:
            made = self.candidates.make(masked.copy(), ratio)
            missing = set(self.names) - set(made)
            if missing:
                raise ValueError(f"candidates for {self.layer.name} lack {sorted(missing)}")
            return {n: made[n] for n in self.names}
        if self.scale is not None:
            return {self.layer.name: self.scale(masked)}
        return {self.layer.name: masked}

    def measure(
        self, ratios: np.ndarray, store: _Store | None, chunks: list[list[int]]
    ) -> np.ndarray:
        """The curve at ``ratios``; ``store`` holds the crossing tensors of the batches of
        the first chunk (None: the layer computes its own, chunk by chunk)."""
        context = self.context
        ref = context.reference
        plain = self.candidates is None
        zeros = int(np.count_nonzero(self.weight == 0)) if plain else 0
        schedule = _Schedule(ratios, self.weight.size, zeros, plain)
        self.meters = {i: DistortionMeter(context.metric) for i in schedule.runs}
        self.schedule = schedule
        self.ratios = ratios
        segments = schedule.segments(context.workers)
        for position, chunk in enumerate(chunks):
            if self.cut is not None:
                if store is None or position > 0:
                    store = context.crossing_values(self.cut.crossing, chunk)
                else:
                    missing = [n for n in self.cut.crossing if n not in store[chunk[0]]]
                    if missing:  # candidates widened the cut
                        extra = context.crossing_values(missing, chunk)
                        store = {b: {**store[b], **extra[b]} for b in chunk}
                current = {b: {n: store[b][n] for n in self.cut.crossing} for b in chunk}
            else:
                current = {b: dict(ref.batches[b]) for b in chunk}
            if context.binding:
                # Calibration inputs go to the device once per layer and chunk.
                for b in chunk:
                    current[b] = {
                        n: self.session.to_device(v) if isinstance(v, np.ndarray) else v
                        for n, v in current[b].items()
                    }
            self.chunk = chunk
            self.current = current
            self.last = position == len(chunks) - 1
            context.map(self._run_segment, segments)
        values = np.zeros(len(ratios), dtype=np.float64)
        for level, meter in self.meters.items():
            values[level] = meter.value()
        for level, source in schedule.copies.items():
            values[level] = values[source]
        if schedule.base:
            meter = DistortionMeter(context.metric)
            for b, target in enumerate(ref.values):
                meter.add(target, (ref.base or ref.values)[b])
            values[schedule.base] = meter.value()
        context.bar.update(len(schedule.copies) + len(schedule.base))
        return values

    def _run_segment(self, levels: list[int]) -> None:
        """Run ``levels`` (increasing counts) on the current chunk, masking incrementally:
        each level zeroes only the positions the previous one kept."""
        ref = self.context.reference
        buffer = np.array(self.weight, copy=True)
        flat = buffer.reshape(-1)
        done = 0
        device_weights: dict[str, Any] = {}
        for level in levels:
            count = self.schedule.counts[level]
            flat[self.order[done:count]] = 0
            done = count
            feeds: Mapping[str, Any] = self._feeds(buffer, float(self.ratios[level]))
            if self.context.binding:
                for name, array in feeds.items():
                    if name in device_weights:
                        self.session.update_device(device_weights[name], array)
                    else:
                        device_weights[name] = self.session.to_device(array)
                feeds = device_weights
            for b in self.chunk:
                self.meters[level].add(ref.values[b], self._outputs(b, feeds, self.current))
            if self.last:
                self.context.bar.update(1)

    def _outputs(self, b: int, weights: Mapping[str, Any], store: _Store | None) -> list[Any]:
        context = self.context
        ref = context.reference
        assert store is not None
        feeds = dict(store[b])
        feeds.update(weights)
        names = ref.outputs if self.cut is None else self.cut.outputs
        if context.binding:
            got = self.session.run_bound(feeds, names)
        else:
            got = self.session.run(feeds, names)
        if self.cut is None:
            return got
        # Outputs the layer cannot affect keep the measured model's values.
        outs = list((ref.base or ref.values)[b])
        for position, value in zip(self.positions, got, strict=True):
            outs[position] = value
        return outs


class LayerSessions:
    """Layer measurers kept from one :func:`measure_curves` call to the next.

    The adaptive grid (:mod:`rdprune_onnx.grid`) measures a few levels of each layer per
    round; without this every round would cut the graph, build an ONNX Runtime session and
    sort the weight again for each layer. Pass one instance to every call on the same model
    and reference; it keeps measurers while their cut models' tensors total at most
    ``max_bytes`` (a layer beyond that is built again when measured again), the dense
    tensors crossing the cuts within the same budget (so a round needs no dense pass for
    them), the typed model and the cut plans. :meth:`close` releases everything.
    """

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self.measurers: dict[str, _LayerMeasurer] = {}
        self.typed: onnx.ModelProto | None = None
        self.plans: dict[str, Cut | None] = {}
        self._key: tuple[int, int, str, str] | None = None
        self._lock = threading.Lock()  # take runs on the builder thread
        self.crossing: _Store = {}
        self.crossing_bytes = 0

    def bind(self, model: onnx.ModelProto, reference: Reference, engine: str, metric: str) -> None:
        """Forget what was kept for another model, reference or setting."""
        key = (id(model), id(reference), engine, metric)
        if key != self._key:
            self.close()
            self._key = key

    def take(self, name: str, context: _Context) -> _LayerMeasurer | None:
        with self._lock:
            measurer = self.measurers.pop(name, None)
            if measurer is not None:
                self.held -= measurer.nbytes
                measurer.context = context
        return measurer

    def keep(self, name: str, measurer: _LayerMeasurer) -> bool:
        with self._lock:
            if self.held + measurer.nbytes > self.max_bytes:
                return False
            measurer.current = None
            self.measurers[name] = measurer
            self.held += measurer.nbytes
        return True

    def close(self) -> None:
        for measurer in self.measurers.values():
            measurer.close()
        self.measurers.clear()
        self.crossing = {}
        self.crossing_bytes = 0
        self.plans.clear()
        self.typed = None
        self.held = 0
        self._key = None


def _crossing(
    context: _Context, sessions: LayerSessions | None, names: list[str], chunk: list[int]
) -> _Store:
    """The dense crossing tensors ``names`` on the batches of ``chunk``: from ``sessions``
    where kept there, the others from a dense pass (and kept, within its budget)."""
    if sessions is None or len(chunk) != len(context.reference.batches):
        return context.crossing_values(names, chunk)
    kept = sessions.crossing
    missing = [n for n in names if any(n not in kept.get(b, {}) for b in chunk)]
    if missing:
        got = context.crossing_values(missing, chunk)
        size = sum(
            v.nbytes if isinstance(v, np.ndarray) else _value_bytes(v)
            for b in chunk
            for n, v in got[b].items()
            if n not in context.inputs
        )
        if sessions.crossing_bytes + size > sessions.max_bytes:
            have = {b: {n: kept[b][n] for n in names if n not in got[b]} for b in chunk}
            return {b: {**have[b], **got[b]} for b in chunk}
        sessions.crossing_bytes += size
        for b in chunk:
            kept.setdefault(b, {}).update(got[b])
    return {b: {n: kept[b][n] for n in names} for b in chunk}


def _groups(
    context: _Context, plans: list[tuple[Layer, Cut | None]]
) -> list[tuple[list[tuple[Layer, Cut | None]], list[list[int]]]]:
    """Layers in order, grouped so that each group's dense crossing tensors (over all
    batches) fit the budget: one dense pass per group. A layer whose own tensors do not fit
    is alone, with its batches in chunks that do."""
    count = len(context.reference.batches)
    everything = [list(range(count))]
    names = sorted({n for _, cut in plans if cut is not None for n in cut.crossing})
    internal = [n for n in names if n not in context.inputs]
    sizes = context.batch_bytes(internal)
    unknown = [n for n, s in sizes.items() if s is None]
    if unknown and count:
        # Sizes from one batch's dense pass; when the rest looks small it samples every
        # tensor, kept for the first group's pass (which then skips that batch).
        known = sum(size or 0 for size in sizes.values())
        sample = context.keep_sample(internal if known <= context.budget else unknown)
        for name in unknown:
            value = sample[name]
            nbytes = value.nbytes if isinstance(value, np.ndarray) else _value_bytes(value)
            sizes[name] = nbytes * count
    groups: list[tuple[list[tuple[Layer, Cut | None]], list[list[int]]]] = []
    current: list[tuple[Layer, Cut | None]] = []
    held: set[str] = set()
    held_bytes = 0
    for layer, cut in plans:
        own = {n for n in cut.crossing if n not in context.inputs} if cut is not None else set()
        own_bytes = sum(sizes[n] or 0 for n in own)
        if (cut is None or own_bytes > context.budget) and current:  # keep the order
            groups.append((current, everything))
            current, held, held_bytes = [], set(), 0
        if cut is None:
            groups.append(([(layer, None)], everything))
            continue
        if own_bytes > context.budget:
            per_batch = max(1, own_bytes // max(1, count))
            size = max(1, context.budget // per_batch)
            chunks = [list(range(i, min(count, i + size))) for i in range(0, count, size)]
            groups.append(([(layer, cut)], chunks))
            continue
        extra = own - held
        extra_bytes = sum(sizes[n] or 0 for n in extra)
        if current and held_bytes + extra_bytes > context.budget:
            groups.append((current, everything))
            current, held, held_bytes = [], set(), 0
            extra, extra_bytes = own, own_bytes
        current.append((layer, cut))
        held |= extra
        held_bytes += extra_bytes
    if current:
        groups.append((current, everything))
    return groups


def _value_bytes(value: Any) -> int:
    """Bytes of an ONNX Runtime value left on the device (from its shape and type)."""
    kinds = {"tensor(float)": 4, "tensor(double)": 8, "tensor(float16)": 2, "tensor(int64)": 8}
    itemsize = kinds.get(value.data_type(), 4)
    return int(np.prod(value.shape(), dtype=np.int64)) * itemsize


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
    candidates: CandidateFactory | None = None,
    workers: int | None = None,
    mask_order: MaskOrder | None = None,
    layer_ratios: Mapping[str, np.ndarray] | None = None,
    desc: str = "curves",
    sessions: LayerSessions | None = None,
) -> dict[str, Curve]:
    """Measure each layer's curve at ``ratios``.

    ``engine`` ``downstream`` (``auto``) runs, for each candidate, only the part of the
    graph below the layer, fed with the dense model's tensors that cross the cut (from one
    dense pass shared by all layers, within ``memory_budget``); ``full`` runs the whole
    model with the layer's weight as a graph input. Both give the same values to float
    tolerance. ``done`` holds curves already measured (from a cache); they are not measured
    again. ``on_curve`` is called after each new curve, e.g. to save it. ``candidates``
    makes, per layer, what is fed for each level instead of the masked weight (see
    :class:`LayerCandidates`). ``workers``: candidates run at once on the CPU (default from
    :func:`worker_layout`). ``mask_order`` gives each layer's mask order (default: magnitude),
    e.g. a Wanda order; it must put the weights already zero first. ``layer_ratios``
    replaces ``ratios`` for the layers it names (the adaptive grid measures a different
    subset per layer); ``desc`` labels the bar. ``sessions`` keeps the layers' measurers for
    the next call (see :class:`LayerSessions`).
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}", f"choose one of {', '.join(ENGINES)}")
    done = dict(done or {})
    todo = [layer for layer in layers if layer.name not in done]
    run = _CurveRun(
        model,
        reference,
        todo,
        levels=_layer_levels(todo, ratios, layer_ratios),
        engine=engine,
        metric=metric,
        config=config or SessionConfig(),
        workers=workers,
        memory_budget=memory_budget,
        progress=progress,
        desc=desc,
        sessions=sessions,
        candidates=candidates,
        mask_order=mask_order,
        on_curve=on_curve,
    )
    found = done | run.measure()  # disjoint: only the layers not done are measured
    return {layer.name: found[layer.name] for layer in layers}


def _layer_levels(
    todo: Sequence[Layer], ratios: np.ndarray, layer_ratios: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """The ratios measured for each layer of ``todo``: its own from ``layer_ratios``, else
    ``ratios``."""
    ratios = np.asarray(ratios, dtype=np.float64)
    own = {name: np.asarray(v, dtype=np.float64) for name, v in (layer_ratios or {}).items()}
    return {layer.name: own.get(layer.name, ratios) for layer in todo}


@dataclass
class _CurveRun:
    """One :func:`measure_curves` call: its arguments, and the steps that measure ``todo``."""

    model: onnx.ModelProto
    reference: Reference
    todo: list[Layer]
    levels: dict[str, np.ndarray]  # the ratios measured for each layer of ``todo``
    engine: str
    metric: str
    config: SessionConfig
    workers: int | None
    memory_budget: int
    progress: bool
    desc: str
    sessions: LayerSessions | None
    candidates: CandidateFactory | None
    mask_order: MaskOrder | None
    on_curve: ProgressHook | None

    def measure(self) -> dict[str, Curve]:
        """The new curves of ``todo``, each passed to ``on_curve`` as soon as it is measured."""
        count, run_config = worker_layout(self.config, self.workers)
        total = sum(len(levels) for levels in self.levels.values())
        typed = self._typed_model()
        started = time.perf_counter()
        pool = ThreadPoolExecutor(count) if count > 1 else None
        try:
            with tqdm(
                total=total,
                disable=not self.progress,
                unit="pt",
                desc=self.desc,
                leave=False,
                delay=0.5,
            ) as bar:
                context = _Context(
                    self.model,
                    typed,
                    self.reference,
                    run_config,
                    self.engine,
                    self.metric,
                    self.memory_budget,
                    count,
                    pool,
                    bar,
                )
                measured = self._measure_groups(context, _groups(context, self._plans(typed)))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)  # Ctrl-C: queued points are dropped
        log.info("measured %d curve points in %.1f s", total, time.perf_counter() - started)
        return measured

    def _typed_model(self) -> onnx.ModelProto:
        """The model with inferred value types (the full engine needs none), shared through
        ``sessions`` by every call on the same model."""
        sessions = self.sessions
        if sessions is not None:
            sessions.bind(self.model, self.reference, self.engine, self.metric)
        if sessions is not None and sessions.typed is not None:
            return sessions.typed
        typed = infer_types(self.model) if self.engine != "full" and self.todo else self.model
        if sessions is not None and self.todo:
            sessions.typed = typed
        return typed

    def _plans(self, typed: onnx.ModelProto) -> list[tuple[Layer, Cut | None]]:
        """Each layer with the plan of its downstream cut (None: the whole model runs)."""
        plans: list[tuple[Layer, Cut | None]] = []
        for layer in self.todo:
            if self.sessions is not None and layer.name in self.sessions.plans:
                plans.append((layer, self.sessions.plans[layer.name]))
                continue
            plan = downstream(typed, layer.name, build=False) if self.engine != "full" else None
            if self.sessions is not None:
                self.sessions.plans[layer.name] = plan
            if plan is None and self.engine == "downstream":
                log.info("%s: cannot cut the graph below it; running the whole model", layer.name)
            plans.append((layer, plan))
        return plans

    def _measure_groups(
        self,
        context: _Context,
        groups: list[tuple[list[tuple[Layer, Cut | None]], list[list[int]]]],
    ) -> dict[str, Curve]:
        """Every layer of ``groups`` in order, one dense pass (or chunk) per group."""
        queue = [(layer, plan) for group, _ in groups for layer, plan in group]
        # Builds the next layer's measurer (cut, session, sort) while this one runs; not for
        # large models, where two layers' sessions at once would cost too much memory.
        builder = ThreadPoolExecutor(1)
        prefetch = data_bytes(self.model) <= PREFETCH_MAX_BYTES
        measured: dict[str, Curve] = {}
        index = 0
        ahead: Future[_LayerMeasurer] | None = None
        try:
            for group, chunks in groups:
                names = sorted({n for _, cut in group if cut is not None for n in cut.crossing})
                store = _crossing(context, self.sessions, names, chunks[0]) if names else None
                for layer, _plan in group:
                    measurer = (
                        ahead.result() if ahead is not None else self._build(context, queue[index])
                    )
                    ahead = None
                    if prefetch and index + 1 < len(queue):
                        ahead = builder.submit(self._build, context, queue[index + 1])
                    index += 1
                    measured[layer.name] = self._measure_layer(measurer, layer, store, chunks)
                    del measurer  # its weight and session go before the next one is built
                del store
        finally:
            builder.shutdown(cancel_futures=True)
        return measured

    def _build(self, context: _Context, item: tuple[Layer, Cut | None]) -> _LayerMeasurer:
        layer, plan = item
        kept = self.sessions.take(layer.name, context) if self.sessions is not None else None
        if kept is not None:
            return kept
        weight = read_weight(self.model, layer.name)
        return _LayerMeasurer(context, layer, weight, plan, self.candidates, self.mask_order)

    def _measure_layer(
        self,
        measurer: _LayerMeasurer,
        layer: Layer,
        store: _Store | None,
        chunks: list[list[int]],
    ) -> Curve:
        levels = self.levels[layer.name]
        distortion = measurer.measure(levels, store, chunks)
        if self.sessions is None or not self.sessions.keep(layer.name, measurer):
            measurer.close()
        curve = Curve(layer.name, levels.copy(), distortion)
        if self.on_curve is not None:
            self.on_curve(layer.name, curve)
        return curve
