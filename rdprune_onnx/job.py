"""A loaded model and everything prepared for pruning it: the first stages of the flow
(load -> layers -> calibrate) and the plumbing every entry point shares (output checks,
the allocation problem's layers, mask statistics, staging of large models).

:func:`rdprune_onnx.pipeline.prune`, :class:`rdprune_onnx.probe.Prober`,
:mod:`rdprune_onnx.search` and :mod:`rdprune_onnx.sweep` all build a :class:`Job` through
these functions; the later stages are in :mod:`rdprune_onnx.stages`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rdprune_onnx import calibration as calib
from rdprune_onnx.activations import Statistics, input_statistics, sequential_masks
from rdprune_onnx.allocate import LayerSpec
from rdprune_onnx.curves import MaskOrder, Reference, run_reference
from rdprune_onnx.distortion import resolve_metric
from rdprune_onnx.errors import UserError
from rdprune_onnx.files import RunFiles, staging
from rdprune_onnx.graph.activation import output_activations
from rdprune_onnx.graph.layers import Layer, LayerScan, find_layers, read_weight
from rdprune_onnx.graph.load import has_lazy, read_model
from rdprune_onnx.grid import GridResult
from rdprune_onnx.macs import macs_per_weight
from rdprune_onnx.masks import apply_mask, get_mask, magnitude_order
from rdprune_onnx.plot import check_plot_target
from rdprune_onnx.runtime import SessionConfig, resolve_provider, user_model
from rdprune_onnx.sanity import check_finite_weights, warn_constant_outputs, zero_values
from rdprune_onnx.settings import CalibrationSpec, EvalSpec, OutputSpec, PruneSettings
from rdprune_onnx.weights import ModelWeights

log = logging.getLogger(__name__)

NO_CALIBRATION_HINT = "pass --data FILE.npz or --synthetic N (random inputs)"


@dataclass
class Job:
    """A loaded model and everything prepared for pruning it."""

    path: str
    model: onnx.ModelProto
    scan: LayerScan
    layers: list[Layer]
    had_external: bool
    config: SessionConfig
    # Large tensors still on disk (external data): weights are read and masked one layer at
    # a time, and the pruned model is written before it is verified (see staging_folder).
    lazy: bool = False
    data: dict[str, np.ndarray] | None = None
    batch_size: int = 32
    reference: Reference | None = None
    eval_arrays: dict[str, np.ndarray] | None = None
    eval_labels: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    metric: str = "mse"  # the settings' metric, resolved to a Metric once outputs are known
    files: RunFiles = field(default_factory=RunFiles)
    # Curve points measured (summed over --steps) and the full grid's count.
    curve_points: dict[str, Any] | None = None

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the block's wall time to ``timings[key]`` (several calls add up)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def dense_weights(self) -> Mapping[str, np.ndarray]:
        """The layers' weights: read on demand for a lazy job, else as arrays."""
        if self.lazy:
            return ModelWeights(self.model, self.names)
        return {name: read_weight(self.model, name) for name in self.names}

    def count_points(self, result: GridResult) -> None:
        """Add one measurement's point counts to the job's (several with --steps)."""
        summary = result.summary()
        if self.curve_points is None:
            self.curve_points = summary
            return
        for key in ("curve_points_measured", "curve_points_full_grid"):
            self.curve_points[key] += summary[key]
        self.curve_points["rounds"] = [*self.curve_points["rounds"], *summary["rounds"]]
        self.curve_points["converged"] = self.curve_points["converged"] and summary["converged"]


# --- before any work: the run's files ---------------------------------------------------------


def check_outputs(
    model_path: str | os.PathLike[str],
    output: OutputSpec,
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> RunFiles:
    """Refuse bad output paths before any expensive work (see :mod:`rdprune_onnx.files`):
    an input of the run, another output of it, a non-regular file, or (without ``force``)
    any existing file. The model's external data files are added when it is loaded."""
    files = RunFiles(force=output.force)
    files.add_input(model_path, "input model")
    for label, path in (inputs or {}).items():
        files.add_input(path, label)
    for out in output.models(model_path):
        files.claim(out, "output")
    if output.report is not None:
        files.claim(output.report, "report")
    if output.plot is not None:
        check_plot_target(output.plot, force=output.force)
        files.claim(output.plot, "plot")
    return files


def check_targets(
    model_path: str | os.PathLike[str],
    targets: Sequence[OutputSpec],
    *,
    force: bool = False,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """Check several runs' (model, report) targets together, before the first one runs
    (``allocate`` with several ratios): no two share a path, none is an input."""
    files = RunFiles(force=force)
    files.add_input(model_path, "input model")
    for label, path in (inputs or {}).items():
        files.add_input(path, label)
    for target in targets:
        files.claim(target.target(model_path), "output")
        if target.report is not None:
            files.claim(target.report, "report")


def require_calibration(calibration: CalibrationSpec | None, needed: bool = True) -> None:
    """Refuse a run that measures (``needed``) without calibration data."""
    if needed and (calibration is None or not calibration.given):
        raise UserError("no calibration data", NO_CALIBRATION_HINT)


# --- load -> layers -> calibrate --------------------------------------------------------------


def open_model(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    *,
    files: RunFiles | None = None,
    outputs: Sequence[Path] = (),
) -> Job:
    """Load the model and find the layers to prune (``settings.exclude``; layers that are
    all zeros already are left as they are). ``files`` are the run's checked outputs: the
    model's external data files join its inputs, and each output claims its ``.data``."""
    start = time.perf_counter()
    data_files: list[Path] = []
    model, had_external = read_model(model_path, data_files=data_files)
    scan = find_layers(model)
    job = Job(
        path=str(model_path),
        model=model,
        scan=scan,
        layers=prunable_layers(model, scan, settings),
        had_external=had_external,
        config=SessionConfig(provider=resolve_provider(settings.provider)),
        lazy=has_lazy(model),
    )
    if files is None:
        job.files.add_input(model_path, "input model")
    else:
        job.files = files
    job.files.add_inputs(data_files, "input model's data file")
    if had_external:
        for out in outputs:
            job.files.claim(out.with_name(out.name + ".data"), "output data file")
    job.timings["load"] = time.perf_counter() - start
    return job


def prunable_layers(
    model: onnx.ModelProto, scan: LayerScan, settings: PruneSettings
) -> list[Layer]:
    """The scan's layers that this run prunes: not excluded, finite, not all zeros."""
    layers = select_layers(scan, settings.exclude)
    for pattern in settings.overrides:
        if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in layers):
            log.warning("--overrides pattern %r matches no pruned layer", pattern)
    check_finite_weights(model, layers)
    empty = [layer.name for layer in layers if layer.size and layer.zeros == layer.size]
    if empty and len(empty) < len(layers):
        log.warning(
            "%d layer(s) are all zeros already and are left as they are: %s",
            len(empty),
            ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""),
        )
        return [layer for layer in layers if layer.name not in empty]
    if empty:
        raise UserError(
            "every prunable weight of the model is already zero", "there is nothing to prune"
        )
    return layers


def select_layers(scan: LayerScan, exclude: Sequence[str]) -> list[Layer]:
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(layer.name, pattern) for layer in scan.layers):
            log.warning(
                "--exclude %r matches no prunable layer (see `rdprune-onnx inspect`)", pattern
            )
    layers = [
        layer
        for layer in scan.layers
        if not any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in exclude)
    ]
    if not layers:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in scan.skipped[:3])
        raise UserError(
            "the model has no prunable layer"
            + (f" (skipped: {reasons})" if reasons else "")
            + (" after --exclude" if scan.layers else ""),
            "rdprune-onnx prunes Conv, ConvTranspose, Gemm and MatMul with constant float "
            "weights; see `rdprune-onnx inspect`",
        )
    return layers


def calibrate(job: Job, settings: PruneSettings, calibration: CalibrationSpec | None) -> None:
    """Load the calibration data (when given), run the dense model on it once (the reference
    every distortion is measured against) and resolve the metric on its outputs."""
    if calibration is None or not calibration.given:
        return
    with job.timed("load"):
        job.data, job.batch_size = load_calibration(job.model, calibration)
    with job.timed("reference"):
        with user_model("the model on its calibration data"):
            job.reference = run_reference(job.model, job.data, job.batch_size, job.config)
        warn_constant_outputs(job.reference)
        job.metric = resolve_metric(
            settings.metric,
            job.reference.outputs,
            job.reference.values[0],
            graph=output_activations(job.model),
            override=settings.output_kind,
        )


def load_calibration(
    model: onnx.ModelProto, spec: CalibrationSpec
) -> tuple[dict[str, np.ndarray], int]:
    """The calibration arrays and the batch size to run them with."""
    specs = calib.model_inputs(model)
    if spec.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {spec.batch_size}", "e.g. 32")
    if spec.data is not None and spec.synthetic is not None:
        raise UserError("give either --data or --synthetic, not both", "pick one source")
    if spec.data is not None:
        data = calib.check_data(calib.load_npz(spec.data), specs, str(spec.data))
    elif spec.synthetic is not None:
        data = calib.synthesize(
            specs,
            spec.synthetic,
            shapes=spec.input_shapes,
            ranges=spec.input_ranges,
            seed=spec.seed,
            values=spec.input_values,
        )
    else:
        raise UserError("no calibration data", NO_CALIBRATION_HINT)
    if spec.input_values and spec.data is not None:
        raise UserError("--input-value fixes synthetic inputs", "use it with --synthetic")
    source = str(spec.data) if spec.data is not None else "synthetic data"
    calib.check_informative(data, source, fixed=list(spec.input_values))
    return calib.fit_fixed_batch(data, specs, spec.batch_size)


def load_evaluation(job: Job, evaluation: EvalSpec | None) -> None:
    """The held-out arrays (and labels) the dense and pruned models are compared on."""
    with job.timed("load"):
        job.eval_arrays, job.eval_labels = load_eval(job.model, evaluation or EvalSpec())


def load_eval(
    model: onnx.ModelProto, evaluation: EvalSpec
) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None]:
    """The arrays of ``evaluation.data`` checked against the model's inputs, and the array
    named ``evaluation.labels`` taken out of them (None, None without data)."""
    path, labels = evaluation.data, evaluation.labels
    if path is None:
        if labels is not None:
            raise UserError("--labels needs --eval-data", "pass the labelled test set")
        return None, None
    raw, label_array = calib.load_labelled(path, labels)
    arrays = calib.check_data(raw, calib.model_inputs(model), str(path))
    return arrays, label_array


def load_job(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    calibration: CalibrationSpec | None,
    evaluation: EvalSpec | None = None,
    *,
    files: RunFiles | None = None,
) -> Job:
    """load -> layers -> calibrate (and the held-out data) in one call."""
    job = open_model(model_path, settings, files=files)
    calibrate(job, settings, calibration)
    load_evaluation(job, evaluation)
    return job


# --- the allocation problem -------------------------------------------------------------------


def layer_specs(
    job: Job, settings: PruneSettings, weights: Mapping[str, np.ndarray]
) -> list[LayerSpec]:
    """The allocation problem's layers: sizes, budget costs and ratio bounds."""
    costs = _budget_costs(job) if settings.budget == "flops" else {}
    specs = []
    for layer in job.layers:
        # Weights already zero stay zero: a layer's ratio never decreases (between
        # iterative steps, or below its sparsity before pruning).
        current = float(np.count_nonzero(weights[layer.name] == 0)) / layer.size
        low = settings.min_layer_ratio or 0.0
        high = 1.0 if settings.max_layer_ratio is None else settings.max_layer_ratio
        for pattern, bounds in settings.overrides.items():
            if fnmatch.fnmatchcase(layer.name, pattern):
                low = bounds.min_ratio if bounds.min_ratio is not None else low
                high = bounds.max_ratio if bounds.max_ratio is not None else high
        if low > high:
            raise UserError(
                f"layer {layer.name!r}: minimum ratio {low} is above its maximum {high}",
                "fix --min-layer-ratio / --max-layer-ratio / --overrides",
            )
        specs.append(
            LayerSpec(
                layer.name,
                layer.shape,
                unit_cost=int(costs.get(layer.name, 1)),
                min_ratio=max(low, current),
                max_ratio=max(high, current),
            )
        )
    return specs


def _budget_costs(job: Job) -> Mapping[str, int]:
    """Multiply-accumulates per weight of each layer, for a FLOPs budget."""
    if job.data is None:
        try:  # MACs per sample need shapes only: one sample of zeros, batch 1
            sample = calib.synthesize(
                calib.model_inputs(job.model), 1, seed=0, values=zero_values(job.model)
            )
        except UserError:
            raise UserError(
                "a FLOPs budget needs calibration inputs to infer shapes (the model has "
                "dynamic dimensions other than the batch)",
                "pass --data or --synthetic",
            ) from None
    else:
        sample = {k: v[:1] if v.ndim else v for k, v in job.data.items()}
    with user_model("the model (shape inference for --budget flops)"):
        return macs_per_weight(job.model, job.layers, sample)


# --- masks ------------------------------------------------------------------------------------


def mask_statistics(
    job: Job, settings: PruneSettings, weights: Mapping[str, np.ndarray] | None
) -> Statistics | None:
    """The data-aware mask's layer statistics on the model with ``weights`` (None: the
    dense model); None for masks that need none."""
    if not settings.data_aware_mask:
        return None
    if job.data is None:
        raise UserError(
            f"--mask {settings.mask} needs calibration data (input statistics)",
            "pass --data FILE.npz or --synthetic N, or use --mask magnitude",
        )
    with job.timed("mask_statistics"):
        stats = input_statistics(
            job.model,
            job.layers,
            job.data,
            batch_size=job.batch_size,
            config=job.config,
            weights=weights,
        )
    stats.warn_missing()
    return stats


def mask_order(settings: PruneSettings, stats: Statistics | None) -> MaskOrder | None:
    """Each layer's order under the chosen mask (None: magnitude, the curve default)."""
    if stats is None:
        return None
    criterion = get_mask(settings.mask)

    def order(layer: Layer, weight: np.ndarray) -> np.ndarray:
        found = stats.layers.get(layer.name)
        if found is None:
            return magnitude_order(weight)
        return criterion.order(weight, found)

    return order


def mask_scores(
    settings: PruneSettings, stats: Statistics | None, weights: Mapping[str, np.ndarray]
) -> Mapping[str, np.ndarray]:
    """What global and LAMP rank: |w|, or the data-aware mask's scores (|w| where a layer
    has no statistics)."""
    if stats is None:
        return weights
    criterion = get_mask(settings.mask)
    return {
        name: criterion.scores(w, stats.layers[name]) if name in stats.layers else w
        for name, w in weights.items()
    }


def apply_masks(
    job: Job,
    settings: PruneSettings,
    weights: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    stats: Statistics | None,
) -> Mapping[str, np.ndarray]:
    """The layers masked at ``counts`` by the chosen mask."""
    names = job.names
    if stats is None:
        if job.lazy:
            return ModelWeights(job.model, names, counts)
        return {n: apply_mask(w, int(counts[n])) for n, w in weights.items()}
    if settings.mask_inputs == "sequential":
        assert job.data is not None
        with job.timed("mask_statistics"):
            masked, _found = sequential_masks(
                job.model,
                job.layers,
                {n: weights[n] for n in names},
                counts,
                job.data,
                mask=settings.mask,
                batch_size=job.batch_size,
                config=job.config,
            )
        return masked
    order = mask_order(settings, stats)
    assert order is not None
    out = {}
    for layer in job.layers:
        weight = weights[layer.name]
        out[layer.name] = apply_mask(weight, int(counts[layer.name]), order(layer, weight))
    return out


# --- large models -----------------------------------------------------------------------------


@contextlib.contextmanager
def staging_folder(job: Job, output: OutputSpec) -> Iterator[Path | None]:
    """Where a lazy job's pruned model is written before it is verified (beside the
    output, so that nothing big lands in the temporary folder); None for other jobs."""
    if not job.lazy:
        yield None
        return
    parent = output.target(job.path).parent if output.write else Path(tempfile.gettempdir())
    with staging(parent) as folder:
        yield folder


__all__ = [
    "Job",
    "apply_masks",
    "calibrate",
    "check_outputs",
    "check_targets",
    "layer_specs",
    "load_calibration",
    "load_eval",
    "load_evaluation",
    "load_job",
    "mask_order",
    "mask_scores",
    "mask_statistics",
    "open_model",
    "prunable_layers",
    "require_calibration",
    "select_layers",
    "staging_folder",
]
