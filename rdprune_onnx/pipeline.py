"""The prune pipeline: load -> find layers -> calibrate -> curves -> allocate -> mask ->
verify -> write. :func:`prune` is the one call the command line and Python users make.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from rdprune_onnx import calibration as calib
from rdprune_onnx.activations import Statistics, input_statistics, sequential_masks
from rdprune_onnx.allocate import (
    METHODS,
    Allocation,
    AllocationProblem,
    Curve,
    LayerSpec,
    get_allocator,
)
from rdprune_onnx.allocate.refine import plan_refinement
from rdprune_onnx.cache import (
    CurveCache,
    CurveFile,
    data_fingerprint,
    model_fingerprint,
    read_curve_file,
)
from rdprune_onnx.compact import STORAGES, compact_weights
from rdprune_onnx.curves import (
    MaskOrder,
    Reference,
    grid,
    measure_distortion,
    run_reference,
)
from rdprune_onnx.distortion import METRICS, OUTPUT_KINDS, Metric, resolve_metric
from rdprune_onnx.errors import UserError
from rdprune_onnx.evaluate import Evaluation, compare
from rdprune_onnx.files import RunFiles, staging
from rdprune_onnx.graph.activation import output_activations
from rdprune_onnx.graph.external import write_external
from rdprune_onnx.graph.layers import Layer, LayerScan, Skipped, find_layers, read_weight
from rdprune_onnx.graph.load import has_lazy, read_model, save_model
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.grid import GridResult, check_grid, measure_grid, on_grid
from rdprune_onnx.macs import macs_per_weight
from rdprune_onnx.masks import MASK_INPUTS, MASKS, apply_mask, get_mask, magnitude_order
from rdprune_onnx.plot import check_plot_target
from rdprune_onnx.reconstruct import INPUTS as REFIT_INPUTS
from rdprune_onnx.reconstruct import REFIT_DAMPING, SOLVERS, RefitCandidates, reconstruct
from rdprune_onnx.report import write_json
from rdprune_onnx.runtime import (
    Session,
    SessionConfig,
    resolve_provider,
    user_model,
    versions,
)
from rdprune_onnx.sanity import (
    check_finite_weights,
    keep_unused,
    unused_layers,
    warn_constant_outputs,
    zero_values,
)
from rdprune_onnx.weights import ModelWeights

if TYPE_CHECKING:
    from rdprune_onnx.search import QualityTarget

log = logging.getLogger(__name__)


@dataclass
class CalibrationSpec:
    """Where calibration inputs come from: an .npz file, or synthetic samples."""

    data: str | os.PathLike[str] | None = None
    synthetic: int | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    batch_size: int = 32
    seed: int = 0
    # Synthetic inputs fixed to one value (``--input-value sr=16000``).
    input_values: Mapping[str, float] = field(default_factory=dict)

    @property
    def given(self) -> bool:
        return self.data is not None or self.synthetic is not None


@dataclass
class LayerBounds:
    """Per-layer constraints: glob patterns on weight names -> ratio bounds."""

    min_ratio: float | None = None
    max_ratio: float | None = None


BUDGETS = ("params", "flops")


@dataclass
class PruneSettings:
    ratio: float
    method: str = "rd"
    metric: str = "mse"
    levels: int = 101
    provider: str = "auto"
    allow_layer_removal: bool = False
    exclude: Sequence[str] = ()
    steps: int = 1  # iterative rd: reach the target in this many re-measured steps
    budget: str = "params"  # what the ratio counts: weights, or multiply-accumulates
    min_layer_ratio: float | None = None
    max_layer_ratio: float | None = None
    overrides: Mapping[str, LayerBounds] = field(default_factory=dict)
    reconstruct: bool = False  # refit the kept weights of each layer after masking
    refit_solver: str = "auto"  # exact | sparsegpt | auto (by layer width)
    # rd curves measured with each layer pruned AND refit (rdprune_onnx.refit_curves);
    # implies ``reconstruct``: the allocation is then chosen for what will be applied.
    refit_curves: bool = False
    # Which weights go inside a layer (rdprune_onnx.masks): magnitude | wanda. Data-aware
    # masks also rank the weights of global and LAMP, and are the rd curves' masks.
    mask: str = "magnitude"
    # Where a data-aware mask's statistics come from in the final masking: the dense (or,
    # with --steps, the current step's) model, or each layer's inputs in the model pruned
    # so far (in graph order). Curves always use the measured model's own inputs.
    mask_inputs: str = "dense"
    # Where the refit's (and sparsegpt's) Hessians come from: each layer's inputs in the
    # model pruned and refit so far (sequential), or the dense model's (one pass).
    refit_inputs: str = "sequential"
    # What each output holds, for kl / prob-mse (rdprune_onnx.distortion): auto (from the
    # graph's last activation, else the data), logits, probs, log-probs, sigmoid, embedding.
    output_kind: str = "auto"
    # Layers whose whole curve is zero (they never reached the output on the calibration
    # data) are kept at the median ratio of the others unless this is set.
    prune_unused_layers: bool = False
    # Which curve points are measured: "adaptive" (those the allocation needs, refined in
    # rounds; ``levels`` is the finest resolution) or "full" (every level).
    grid: str = "adaptive"

    @property
    def data_aware_mask(self) -> bool:
        return get_mask(self.mask).needs_statistics

    @property
    def select_masks(self) -> bool:
        """The refit chooses the masks again (sparsegpt): refit is implied."""
        return self.mask in MASKS and get_mask(self.mask).rewrites_weights

    @property
    def curve_mask(self) -> str:
        """The mask the rd curves are measured with: a data-aware one, sparsegpt with
        refit-aware curves (each point selected and refit), else magnitude."""
        if self.mask in MASKS and (
            self.data_aware_mask or (self.select_masks and self.refit_curves)
        ):
            return self.mask
        return "magnitude"

    def __post_init__(self) -> None:
        if self.refit_curves or self.select_masks:
            self.reconstruct = True

    def check(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(
                f"--ratio must be strictly between 0 and 1, got {self.ratio}",
                "e.g. --ratio 0.8 zeroes 80% of the prunable weights",
            )
        for what, chosen, choices in (
            ("method", self.method, METHODS),
            ("metric", self.metric, METRICS),
            ("mask", self.mask, MASKS),
            ("mask inputs", self.mask_inputs, MASK_INPUTS),
            ("refit inputs", self.refit_inputs, REFIT_INPUTS),
            ("output kind", self.output_kind, OUTPUT_KINDS),
            ("budget", self.budget, BUDGETS),
        ):
            if chosen not in choices:
                raise UserError(f"unknown {what} {chosen!r}", f"choose one of {', '.join(choices)}")
        if self.select_masks and not self.reconstruct:
            raise UserError(
                "--mask sparsegpt rewrites the kept weights: it always refits",
                "keep reconstruct on, or use --mask magnitude / wanda",
            )
        grid(self.levels)
        check_grid(self.grid)
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}", "e.g. --steps 3")
        if self.steps > 1 and self.method != "rd":
            raise UserError(
                f"--steps applies to --method rd only (got {self.method})", "drop --steps"
            )
        if self.refit_solver not in SOLVERS:
            raise UserError(
                f"unknown refit solver {self.refit_solver!r}", f"choose one of {', '.join(SOLVERS)}"
            )
        if self.refit_curves and self.method != "rd":
            raise UserError(
                f"--refit-curves changes the rd curves; --method {self.method} uses none",
                "drop --refit-curves, or use --method rd",
            )
        if self.refit_curves and self.steps > 1:
            raise UserError(
                "--refit-curves with --steps > 1 is not supported",
                "use --steps 1 with --refit-curves, or plain curves with --steps",
            )
        for label, value in (
            ("--min-layer-ratio", self.min_layer_ratio),
            ("--max-layer-ratio", self.max_layer_ratio),
        ):
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"{label} must be in [0, 1], got {value}", "e.g. 0.95")

    def to_dict(self) -> dict[str, Any]:
        return vars(self) | {
            "exclude": list(self.exclude),
            "overrides": {k: vars(v) for k, v in self.overrides.items()},
        }


def read_overrides(path: str | os.PathLike[str]) -> dict[str, LayerBounds]:
    """Per-layer bounds from a JSON or YAML file: ``{PATTERN: {min_ratio, max_ratio}}``.

    Patterns are globs on weight names; a layer takes the last matching entry's bounds.
    A top-level ``layers`` key holding the same mapping is accepted too.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"overrides file {str(p)!r} does not exist", "check --overrides")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                raise UserError(
                    "reading YAML overrides needs PyYAML",
                    "pip install 'rdprune-onnx[yaml]', or use JSON",
                ) from None
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(
            f"cannot parse {str(p)!r}: {exc}", "write {PATTERN: {max_ratio: R}}"
        ) from None
    if isinstance(raw, dict) and isinstance(raw.get("layers"), dict):
        raw = raw["layers"]
    if not isinstance(raw, dict):
        raise UserError(f"{str(p)!r} must map layer patterns to bounds", "see the README")
    out: dict[str, LayerBounds] = {}
    for pattern, bounds in raw.items():
        if not isinstance(bounds, dict) or not set(bounds) <= {"min_ratio", "max_ratio"}:
            raise UserError(
                f"{str(p)!r}: entry {pattern!r} must hold min_ratio and/or max_ratio",
                'e.g. {"fc*": {"max_ratio": 0.5}}',
            )
        try:
            out[str(pattern)] = LayerBounds(
                min_ratio=None if bounds.get("min_ratio") is None else float(bounds["min_ratio"]),
                max_ratio=None if bounds.get("max_ratio") is None else float(bounds["max_ratio"]),
            )
        except (TypeError, ValueError):
            raise UserError(f"{str(p)!r}: bounds of {pattern!r} must be numbers", "") from None
    return out


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


def default_output(model_path: str | os.PathLike[str]) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + ".pruned.onnx")


def output_for_ratio(output: str | os.PathLike[str], ratio: float) -> Path:
    """The file name used for one ratio of several: ``out.onnx`` -> ``out.r0.7.onnx``."""
    p = Path(output)
    return p.with_name(f"{p.stem}.r{ratio:g}{p.suffix or '.onnx'}")


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
        raise UserError(
            "no calibration data", "pass --data FILE.npz or --synthetic N (random inputs)"
        )
    if spec.input_values and spec.data is not None:
        raise UserError("--input-value fixes synthetic inputs", "use it with --synthetic")
    source = str(spec.data) if spec.data is not None else "synthetic data"
    calib.check_informative(data, source, fixed=list(spec.input_values))
    return calib.fit_fixed_batch(data, specs, spec.batch_size)


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


def _interpolate(curve: Curve, ratio: float) -> float:
    return float(np.interp(ratio, curve.ratios, curve.distortion))


@dataclass
class _Job:
    """A loaded model and everything prepared for pruning it."""

    path: str
    model: onnx.ModelProto
    scan: LayerScan
    layers: list[Layer]
    had_external: bool
    config: SessionConfig
    # Large tensors still on disk (external data): weights are read and masked one layer at
    # a time, and the pruned model is written before it is verified (see _finish).
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


def _check_outputs(
    model_path: str | os.PathLike[str],
    outputs: Sequence[Path],
    report: str | os.PathLike[str] | None,
    force: bool,
    *,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
    plot: str | os.PathLike[str] | None = None,
) -> RunFiles:
    """Refuse bad output paths before any expensive work (see :mod:`rdprune_onnx.files`):
    an input of the run, another output of it, a non-regular file, or (without ``force``)
    any existing file. The model's external data files are added when it is loaded."""
    files = RunFiles(force=force)
    files.add_input(model_path, "input model")
    for label, path in (inputs or {}).items():
        files.add_input(path, label)
    for out in outputs:
        files.claim(out, "output")
    if report is not None:
        files.claim(report, "report")
    if plot is not None:
        check_plot_target(plot, force=force)
        files.claim(plot, "plot")
    return files


def check_targets(
    model_path: str | os.PathLike[str],
    targets: Sequence[tuple[str | os.PathLike[str] | None, str | os.PathLike[str] | None]],
    *,
    force: bool = False,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """Check several runs' (output, report) targets together, before the first one runs
    (``allocate`` with several ratios): no two share a path, none is an input."""
    files = RunFiles(force=force)
    files.add_input(model_path, "input model")
    for label, path in (inputs or {}).items():
        files.add_input(path, label)
    for output, report in targets:
        out = Path(output) if output is not None else default_output(model_path)
        files.claim(out, "output")
        if report is not None:
            files.claim(report, "report")


def _claim_data_files(job: _Job, data_files: Sequence[Path], outputs: Sequence[Path]) -> None:
    """Once the model is loaded: its external data files are inputs too, and an output
    written with external data claims ``<output>.data``."""
    job.files.add_inputs(data_files, "input model's data file")
    if job.had_external:
        for out in outputs:
            job.files.claim(out.with_name(out.name + ".data"), "output data file")


def _load_job(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    calibration: CalibrationSpec | None,
    eval_data: str | os.PathLike[str] | None = None,
    labels: str | None = None,
    *,
    files: RunFiles | None = None,
    outputs: Sequence[Path] = (),
) -> _Job:
    start = time.perf_counter()
    data_files: list[Path] = []
    model, had_external = read_model(model_path, data_files=data_files)
    scan = find_layers(model)
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
        layers = [layer for layer in layers if layer.name not in empty]
    elif empty:
        raise UserError(
            "every prunable weight of the model is already zero", "there is nothing to prune"
        )
    job = _Job(
        path=str(model_path),
        model=model,
        scan=scan,
        layers=layers,
        had_external=had_external,
        config=SessionConfig(provider=resolve_provider(settings.provider)),
        lazy=has_lazy(model),
    )
    if files is not None:
        job.files = files
    _claim_data_files(job, data_files, outputs)
    if calibration is not None and calibration.given:
        job.data, job.batch_size = load_calibration(model, calibration)
    job.eval_arrays, job.eval_labels = _load_eval(model, eval_data, labels)
    job.timings["load"] = time.perf_counter() - start
    if job.data is not None:
        t = time.perf_counter()
        with user_model("the model on its calibration data"):
            job.reference = run_reference(model, job.data, job.batch_size, job.config)
        warn_constant_outputs(job.reference)
        job.metric = resolve_metric(
            settings.metric,
            job.reference.outputs,
            job.reference.values[0],
            graph=output_activations(model),
            override=settings.output_kind,
        )
        job.timings["reference"] = time.perf_counter() - t
    return job


def _layer_specs(
    job: _Job, settings: PruneSettings, weights: Mapping[str, np.ndarray]
) -> list[LayerSpec]:
    """The allocation problem's layers: sizes, budget costs and ratio bounds."""
    costs: Mapping[str, int] = {}
    if settings.budget == "flops":
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
            costs = macs_per_weight(job.model, job.layers, sample)
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


@dataclass(frozen=True)
class CurveNeeds:
    """What the allocation will ask of the curves: the adaptive grid refines for it."""

    specs: Sequence[LayerSpec]
    targets: Sequence[float]
    options: Mapping[str, object]
    # The mask order of the measured layers (a data-aware mask); None: magnitude.
    order: MaskOrder | None = None


CurveSource = Callable[[onnx.ModelProto, Reference | None, CurveNeeds], dict[str, Curve]]


def _count_points(job: _Job, result: GridResult) -> None:
    """Add one measurement's point counts to the job's (several with --steps)."""
    summary = result.summary()
    if job.curve_points is None:
        job.curve_points = summary
        return
    for key in ("curve_points_measured", "curve_points_full_grid"):
        job.curve_points[key] += summary[key]
    job.curve_points["rounds"] = [*job.curve_points["rounds"], *summary["rounds"]]
    job.curve_points["converged"] = job.curve_points["converged"] and summary["converged"]


def _mask_statistics(
    job: _Job, settings: PruneSettings, weights: Mapping[str, np.ndarray] | None
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
    t = time.perf_counter()
    stats = input_statistics(
        job.model,
        job.layers,
        job.data,
        batch_size=job.batch_size,
        config=job.config,
        weights=weights,
    )
    job.timings["mask_statistics"] = (
        job.timings.get("mask_statistics", 0.0) + time.perf_counter() - t
    )
    stats.warn_missing()
    return stats


def _mask_order(settings: PruneSettings, stats: Statistics | None) -> MaskOrder | None:
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


def _mask_scores(
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


def _apply_masks(
    job: _Job,
    settings: PruneSettings,
    weights: Mapping[str, np.ndarray],
    counts: Mapping[str, int],
    stats: Statistics | None,
) -> Mapping[str, np.ndarray]:
    """The layers masked at ``counts`` by the chosen mask."""
    names = [layer.name for layer in job.layers]
    if stats is None:
        if job.lazy:
            return ModelWeights(job.model, names, counts)
        return {n: apply_mask(w, int(counts[n])) for n, w in weights.items()}
    if settings.mask_inputs == "sequential":
        assert job.data is not None
        t = time.perf_counter()
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
        job.timings["mask_statistics"] = (
            job.timings.get("mask_statistics", 0.0) + time.perf_counter() - t
        )
        return masked
    order = _mask_order(settings, stats)
    assert order is not None
    out = {}
    for layer in job.layers:
        weight = weights[layer.name]
        out[layer.name] = apply_mask(weight, int(counts[layer.name]), order(layer, weight))
    return out


def _allocate(
    job: _Job,
    settings: PruneSettings,
    curve_source: CurveSource | None,
) -> tuple[
    Mapping[str, np.ndarray],
    Allocation,
    list[LayerSpec],
    list[dict[str, Any]],
    dict[str, Curve] | None,
]:
    """Choose ratios (in ``settings.steps`` steps) and mask; returns the pruned weights.

    For a lazy job they come as a :class:`~rdprune_onnx.weights.ModelWeights` that masks
    each layer when it is read, so no step holds every layer's weight at once.
    """
    names = [layer.name for layer in job.layers]
    if settings.mask_inputs != "dense" and not settings.data_aware_mask:
        log.warning(
            "--mask-inputs %s has no effect with --mask %s (it uses no statistics)",
            settings.mask_inputs,
            settings.mask,
        )
    pruned: Mapping[str, np.ndarray]
    if job.lazy:
        pruned = ModelWeights(job.model, names)
    else:
        pruned = {name: read_weight(job.model, name) for name in names}
    current = job.model
    curves: dict[str, Curve] | None = None
    steps: list[dict[str, Any]] = []
    allocation: Allocation | None = None
    specs: list[LayerSpec] = []
    options = {"allow_layer_removal": settings.allow_layer_removal}
    for step in range(1, settings.steps + 1):
        step_ratio = settings.ratio * step / settings.steps
        # A data-aware mask's statistics, recomputed on the partly pruned model each step.
        stats = _mask_statistics(job, settings, pruned if step > 1 else None)
        t = time.perf_counter()
        specs = _layer_specs(job, settings, pruned)
        job.timings["allocate"] = job.timings.get("allocate", 0.0) + time.perf_counter() - t
        if settings.method == "rd":
            assert curve_source is not None
            t = time.perf_counter()
            reference = job.reference
            if step > 1:
                current = replace_weights(job.model, pruned)
                if reference is not None:
                    reference = reference.rebased(current, job.config)
            curves = curve_source(
                current,
                reference,
                CurveNeeds(specs, [step_ratio], options, _mask_order(settings, stats)),
            )
            job.timings["curves"] = job.timings.get("curves", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        problem = AllocationProblem(
            layers=specs,
            target_ratio=step_ratio,
            curves=curves,
            # The allocators take |w| themselves, one layer at a time (or the mask's scores).
            magnitudes=(
                _mask_scores(settings, stats, pruned)
                if settings.method in ("global", "lamp")
                else None
            ),
            options=options,
        )
        allocation = get_allocator(settings.method).allocate(problem)
        unused = unused_layers(curves, names) if curves is not None else []
        held = None if settings.prune_unused_layers else keep_unused(specs, allocation, unused)
        if held is not None:
            specs = held
            problem = dataclasses.replace(problem, layers=specs)
            allocation = get_allocator(settings.method).allocate(problem)
        if unused:
            log.warning(
                "%d layer(s) have a zero curve (they never reached the output on the "
                "calibration data): %s; %s",
                len(unused),
                ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""),
                "pruned freely"
                if held is None
                else "kept at the median ratio of the other layers "
                "(--prune-unused-layers prunes them freely)",
            )
        job.timings["allocate"] = job.timings.get("allocate", 0.0) + time.perf_counter() - t
        del problem
        pruned = _apply_masks(job, settings, pruned, allocation.counts, stats)
        steps.append(
            {
                "step": step,
                "target_ratio": step_ratio,
                "ratios": allocation.ratios(specs),
                **dict(allocation.info),
                **({"unused_layers": unused, "unused_pruned": held is None} if unused else {}),
            }
        )
    assert allocation is not None
    if settings.data_aware_mask:
        allocation = Allocation(
            allocation.counts,
            allocation.predicted,
            dict(allocation.info)
            | {
                "mask": settings.mask,
                "mask_inputs": settings.mask_inputs,
                "mask_without_statistics": sorted(stats.missing) if stats else [],
            },
        )
    return pruned, allocation, specs, steps, curves


@contextlib.contextmanager
def _staging(job: _Job, output: Path | None) -> Iterator[Path | None]:
    """Where a lazy job's pruned model is written before it is verified (beside the
    output, so that nothing big lands in the temporary folder); None for other jobs."""
    if not job.lazy:
        yield None
        return
    parent = output.parent if output is not None else Path(tempfile.gettempdir())
    with staging(parent) as folder:
        yield folder


def _finish(
    job: _Job,
    settings: PruneSettings,
    pruned: Mapping[str, np.ndarray],
    allocation: Allocation,
    specs: Sequence[LayerSpec],
    steps: list[dict[str, Any]],
    curves: dict[str, Curve] | None,
    *,
    output: Path | None,
    force: bool,
    report: str | os.PathLike[str] | None,
    started: float,
    storage: str = "dense",
    staging: Path | None = None,
) -> PruneResult:
    """Verify, compare, write the model and the report.

    A lazy job's pruned model is first written to ``staging`` (see :func:`_staging`),
    streaming one weight at a time, and verified from there: the dense weights stay on
    disk and only ONNX Runtime holds a copy of the pruned ones.
    """
    timings = dict(job.timings)
    refits: dict[str, Any] = {}
    biases: dict[str, np.ndarray] = {}
    if settings.reconstruct:
        if job.data is None:
            raise UserError("--reconstruct needs calibration data", "pass --data or --synthetic")
        t = time.perf_counter()
        refit = reconstruct(
            job.model,
            pruned,
            job.layers,
            job.data,
            batch_size=job.batch_size,
            config=job.config,
            solver=settings.refit_solver,
            select=settings.select_masks,
            inputs=settings.refit_inputs,
        )
        pruned = {name: refit.weights.get(name, w) for name, w in pruned.items()}
        biases = dict(refit.biases)
        refits = {
            r.name: {
                k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in vars(r).items()
            }
            for r in refit.layers
        }
        timings["reconstruct"] = time.perf_counter() - t
    staged: Path | None = None
    if staging is None:
        pruned_model = replace_weights(job.model, {**pruned, **biases})
    else:
        t = time.perf_counter()
        try:
            staged = write_external(
                job.model,
                staging,
                # Biases come only from --reconstruct, whose weights are a dict already.
                {**pruned, **biases} if biases else pruned,
                name="pruned.onnx",
            )
        except OSError as exc:
            raise UserError(
                f"could not write the pruned model to {str(staging)!r}: {exc.strerror or exc}",
                "free disk space next to the output (it is written there first) or choose "
                "another -o",
            ) from None
        pruned_model = read_model(staged, check=False)[0]
        pruned = ModelWeights(pruned_model, list(pruned))
        timings["stage"] = time.perf_counter() - t
    measured = None
    if job.reference is not None:
        t = time.perf_counter()
        measured = measure_distortion(
            Session(pruned_model, job.config, path=staged), job.reference, job.metric
        )
        timings["verify"] = time.perf_counter() - t
    results = []
    predicted_total = 0.0 if curves else None
    for layer in job.layers:
        ratio = int(allocation.counts[layer.name]) / layer.size
        predicted = None
        if allocation.predicted is not None:
            predicted = float(allocation.predicted[layer.name])
        elif curves is not None:
            predicted = _interpolate(curves[layer.name], ratio)
        if predicted is not None and predicted_total is not None:
            predicted_total += predicted
        results.append(
            LayerResult(
                name=layer.name,
                op_types=layer.op_types,
                shape=layer.shape,
                size=layer.size,
                pruned=int(np.count_nonzero(pruned[layer.name] == 0)),
                ratio=ratio,
                sparsity_before=layer.sparsity,
                predicted=predicted,
                refit=refits.get(layer.name),
            )
        )
    total = sum(r.size for r in results)
    achieved = sum(r.pruned for r in results) / total
    cost_total = sum(spec.size * spec.unit_cost for spec in specs)
    achieved_cost = (
        sum(r.pruned * spec.unit_cost for r, spec in zip(results, specs, strict=True)) / cost_total
    )
    evaluation = None
    if job.eval_arrays is not None:
        t = time.perf_counter()
        with user_model("the models on --eval-data"):
            evaluation = compare(
                job.model,
                pruned_model,
                job.eval_arrays,
                labels=job.eval_labels,
                batch_size=job.batch_size,
                config=job.config,
            )
        timings["evaluate"] = time.perf_counter() - t
    written = None
    files: list[Path] = []
    if output is not None:
        t = time.perf_counter()
        to_write = pruned_model
        if storage == "compact":
            to_write = compact_weights(pruned_model, [layer.name for layer in job.layers])
        files = save_model(
            to_write,
            output,
            external_data=job.had_external or None,
            force=force,
            protect=job.files.protected(),
        )
        written = str(output)
        timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    info = dict(allocation.info) | {
        "budget": settings.budget,
        "achieved_budget_ratio": achieved_cost,
    }
    if len(steps) > 1:
        info["steps"] = steps
    if steps and steps[-1].get("unused_layers"):
        info["unused_layers"] = {
            "layers": steps[-1]["unused_layers"],
            "pruned_freely": steps[-1]["unused_pruned"],
        }
    if achieved > settings.ratio + 0.005:
        log.warning(
            "the model was already sparser than --ratio %g: %.2f%% of its prunable weights "
            "are zero now (weights already zero stay zero)",
            settings.ratio,
            100 * achieved,
        )
    if settings.method == "rd" and predicted_total == 0.0 and achieved > 0:
        log.warning(
            "the predicted distortion is exactly 0 at ratio %g: on this calibration data "
            "the pruned weights never change the output; the pruned model may break on "
            "other inputs (use more varied calibration data)",
            settings.ratio,
        )
    result = PruneResult(
        input=job.path,
        output=written,
        settings=settings,
        provider=job.config.provider,
        samples=calib.sample_count(job.data) if job.data is not None else 0,
        layers=results,
        skipped=job.scan.skipped,
        target_ratio=settings.ratio,
        achieved_ratio=achieved,
        predicted_distortion=predicted_total,
        measured_distortion=measured,
        timings=timings,
        allocation_info=info,
        curves=curves,
        evaluation=evaluation,
        model=pruned_model if staging is None else _reload(written, storage),
        output_kinds=_kinds_record(job.metric),
        files=[str(path) for path in files],
        curve_points=job.curve_points,
    )
    if report is not None:
        try:
            write_json(result.to_dict(), report, force=force, protect=job.files.protected())
            result.files.append(str(report))
        except BaseException:
            # All or nothing: a model without its report is not left behind.
            for path in files:
                path.unlink(missing_ok=True)
            raise
    return result


def _kinds_record(metric: str) -> dict[str, Any] | None:
    """Each output's resolved kind, for the report (None before any output was run)."""
    if not isinstance(metric, Metric):
        return None
    return {name: vars(kind) for name, kind in metric.output_kinds().items()}


def _reload(written: str | None, storage: str) -> onnx.ModelProto | None:
    """The written dense model, loaded lazily (None when not written, or compacted)."""
    if written is None or storage != "dense":
        return None
    return read_model(written, check=False)[0]


def _allocate_and_finish(
    job: _Job,
    settings: PruneSettings,
    curve_source: CurveSource,
    *,
    output: Path | None,
    force: bool,
    report: str | os.PathLike[str] | None,
    started: float,
    storage: str,
) -> PruneResult:
    pruned, allocation, specs, steps, curves = _allocate(job, settings, curve_source)
    with _staging(job, output) as staging:
        return _finish(
            job,
            settings,
            pruned,
            allocation,
            specs,
            steps,
            curves,
            output=output,
            force=force,
            report=report,
            started=started,
            storage=storage,
            staging=staging,
        )


def prune(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    calibration: CalibrationSpec,
    *,
    output: str | os.PathLike[str] | None = None,
    write: bool = True,
    force: bool = False,
    report: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    labels: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    storage: str = "dense",
    progress: bool = False,
    target: QualityTarget | None = None,
    plot: str | os.PathLike[str] | None = None,
) -> PruneResult:
    """Prune ``model_path`` to ``settings.ratio`` and (unless ``write`` is False) write it.

    ``plot`` is only checked with the other outputs before any work (the caller draws it
    with :func:`~rdprune_onnx.plot.plot_result`).

    Curves are cached in ``cache_dir`` (resumable; ``None`` disables the cache).
    ``storage="compact"`` writes the pruned weights in a form that shrinks with sparsity
    (see :mod:`rdprune_onnx.export`). With a ``target`` (``max_drop`` or ``max_distortion``)
    the ratio is searched instead (:func:`rdprune_onnx.search.prune_to_target`;
    ``settings.ratio`` is ignored) and the result's ``search`` lists every probe.
    """
    if target is not None:
        from rdprune_onnx.search import prune_to_target

        return prune_to_target(
            model_path,
            settings,
            calibration,
            target,
            output=output,
            write=write,
            force=force,
            report=report,
            eval_data=eval_data,
            labels=labels,
            cache_dir=cache_dir,
            storage=storage,
            progress=progress,
        )
    started = time.perf_counter()
    settings.check()
    _check_storage(storage)
    out_path = Path(output) if output is not None else default_output(model_path)
    outputs = [out_path] if write else []
    files = _check_outputs(
        model_path,
        outputs,
        report,
        force,
        inputs={"calibration data": calibration.data, "evaluation data": eval_data},
        plot=plot,
    )
    if not calibration.given and settings.method == "rd":
        raise UserError(
            "no calibration data", "pass --data FILE.npz or --synthetic N (random inputs)"
        )
    job = _load_job(
        model_path, settings, calibration, eval_data, labels, files=files, outputs=outputs
    )

    def measure(
        model: onnx.ModelProto, reference: Reference | None, needs: CurveNeeds
    ) -> dict[str, Curve]:
        assert reference is not None and job.data is not None
        entry = curve_entry(
            model,
            job.layers,
            job.data,
            settings,
            job.config.provider,
            job.batch_size,
            metric=job.metric,
        )
        result = _measure_with_cache(
            model,
            job.layers,
            reference,
            settings,
            job.config,
            entry,
            cache_dir,
            progress,
            needs,
            candidates=_refit_candidates(model, job.data, job.batch_size, settings, job.config),
            timings=job.timings,
            metric=job.metric,
        )
        _count_points(job, result)
        return result.curves

    return _allocate_and_finish(
        job,
        settings,
        measure,
        output=out_path if write else None,
        force=force,
        report=report,
        started=started,
        storage=storage,
    )


# The ratios `curves --grid adaptive` refines for unless told otherwise.
DEFAULT_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)


def measure(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    calibration: CalibrationSpec,
    *,
    output: str | os.PathLike[str] | None = None,
    force: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    targets: Sequence[float] = DEFAULT_TARGETS,
) -> CurveFile:
    """Measure the rate-distortion curves of ``model_path`` and save them to ``output``.

    The file records fingerprints of the model and the data and the settings, so that
    :func:`allocate` can check that curves belong to the model they are applied to. With
    ``settings.grid == "adaptive"`` the curves are refined for the ratios ``targets`` (with
    ``settings``' bounds and budget); ``allocate`` at another ratio checks whether the
    measured points cover it.
    """
    for target in targets:
        if not 0.0 < target < 1.0:
            raise UserError(f"--ratio must be strictly between 0 and 1, got {target}", "e.g. 0.8")
    files = _check_outputs(
        model_path, [], None, force, inputs={"calibration data": calibration.data}
    )
    if output is not None:
        files.claim(output, "curves file", suffixes=(".json",))
    if not calibration.given:
        raise UserError(
            "no calibration data", "pass --data FILE.npz or --synthetic N (random inputs)"
        )
    job = _load_job(model_path, settings, calibration, files=files)
    entry, result = measure_dense(job, settings, targets, cache_dir, progress)
    entry.curves = result.curves
    entry.grid = result.summary()
    if output is not None:
        write_json(
            entry.to_dict(), output, force=force, protect=files.protected(), label="curves file"
        )
    return entry


def allocate(
    curves_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    *,
    calibration: CalibrationSpec | None = None,
    output: str | os.PathLike[str] | None = None,
    write: bool = True,
    force: bool = False,
    report: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    labels: str | None = None,
    storage: str = "dense",
    plot: str | os.PathLike[str] | None = None,
) -> PruneResult:
    """Prune ``model_path`` with curves saved by :func:`measure`, measuring nothing.

    With the same settings it writes the same bytes as :func:`prune`. Calibration data is
    optional here: with it, the pruned model's distortion is measured and reported.
    """
    started = time.perf_counter()
    settings.check()
    _check_storage(storage)
    if settings.steps > 1:
        raise UserError(
            "--steps re-measures curves on the partly pruned model", "use `prune --steps`"
        )
    out_path = Path(output) if output is not None else default_output(model_path)
    outputs = [out_path] if write else []
    files = _check_outputs(
        model_path,
        outputs,
        report,
        force,
        inputs={
            "curves file": curves_path,
            "calibration data": calibration.data if calibration is not None else None,
            "evaluation data": eval_data,
        },
        plot=plot,
    )
    saved = read_curve_file(curves_path)
    job = _load_job(
        model_path, settings, calibration, eval_data, labels, files=files, outputs=outputs
    )
    fingerprint = model_fingerprint(job.model)
    if saved.model != fingerprint:
        raise UserError(
            f"the curves in {str(curves_path)!r} were measured on another model",
            f"measure them on {str(model_path)!r} with `rdprune-onnx curves`",
        )
    missing = [layer.name for layer in job.layers if layer.name not in saved.curves]
    if missing:
        raise UserError(
            f"{str(curves_path)!r} has no curve for {len(missing)} layer(s), e.g. {missing[0]!r}",
            "measure the curves with the same --exclude",
        )
    if settings.metric != saved.settings.get("metric"):
        log.warning(
            "curves were measured with metric %s; --metric %s only affects verification",
            saved.settings.get("metric"),
            settings.metric,
        )
    if job.data is not None and saved.data != data_fingerprint(job.data):
        log.warning("the calibration data differs from the data the curves were measured on")
    if "refit" in saved.settings and not settings.reconstruct:
        log.warning(
            "the curves were measured with --refit-curves (each layer pruned and refit); "
            "without --reconstruct the allocation assumes a refit that is not applied"
        )

    saved_mask = str(saved.settings.get("mask", "magnitude"))
    if saved_mask != settings.curve_mask:
        log.warning(
            "the curves were measured with --mask %s; --mask %s allocates on %s curves "
            "(measure them with `rdprune-onnx curves --mask %s`)",
            saved_mask,
            settings.mask,
            settings.curve_mask,
            settings.mask,
        )

    def fixed(
        model: onnx.ModelProto, reference: Reference | None, needs: CurveNeeds
    ) -> dict[str, Curve]:
        curves = {layer.name: saved.curves[layer.name] for layer in job.layers}
        return _cover(job, saved, curves_path, curves, settings, needs)

    return _allocate_and_finish(
        job,
        settings,
        fixed,
        output=out_path if write else None,
        force=force,
        report=report,
        started=started,
        storage=storage,
    )


def _cover(
    job: _Job,
    saved: CurveFile,
    path: str | os.PathLike[str],
    curves: dict[str, Curve],
    settings: PruneSettings,
    needs: CurveNeeds,
) -> dict[str, Curve]:
    """The saved curves, with the points the allocation at ``needs`` lacks measured.

    Curves from the full grid cover every ratio. Adaptive ones cover the ratios whose
    allocation sits on measured points (with measured neighbours); for another ratio the
    missing points are measured when the calibration data they were measured on is given,
    else a UserError says which ratios the file was refined for.
    """
    levels = int(saved.settings.get("levels", 0))
    if levels < 2 or not on_grid(curves, levels):
        return curves  # curves from elsewhere (no grid): allocate on what is there
    plan = plan_refinement(needs.specs, curves, levels, needs.targets, options=needs.options)
    if not plan.points:
        return curves
    refined = (saved.grid or {}).get("refined_for") or []
    covered = ", ".join(f"{r:g}" for r in refined) or "unknown ratios"
    asked = ", ".join(f"{t:g}" for t in needs.targets)
    hint = f"pass the data the curves were measured on (--data), or run `curves --ratio {asked}`"
    if job.reference is None or job.data is None:
        raise UserError(
            f"ratio {asked} needs {plan.count} curve points "
            f"that {str(path)!r} lacks (its curves were refined for {covered})",
            hint,
        )
    # Measure as the file was measured: its grid, metric and refit settings.
    refit = saved.settings.get("refit")
    as_saved = replace(
        settings,
        levels=levels,
        metric=str(saved.settings.get("metric", settings.metric)),
        refit_curves=isinstance(refit, dict),
        refit_solver=str(refit.get("solver", "auto")) if isinstance(refit, dict) else "auto",
    )
    # The resolved output kinds and the mask order are the run's own (a file measured with
    # other ones has another key and is refused below).
    metric = job.metric if as_saved.metric == settings.metric else as_saved.metric
    entry = curve_entry(
        job.model,
        job.layers,
        job.data,
        as_saved,
        job.config.provider,
        job.batch_size,
        metric=metric,
    )
    if (entry.data, entry.settings) != (saved.data, saved.settings):
        raise UserError(
            f"ratio {asked} needs {plan.count} curve points "
            f"that {str(path)!r} lacks, and the calibration data or settings given differ "
            "from the ones it was measured with",
            hint,
        )
    log.info("measuring %d curve points the saved curves lack", plan.count)
    t = time.perf_counter()
    result = measure_grid(
        job.model,
        job.layers,
        job.reference,
        needs.specs,
        levels=levels,
        kind="adaptive",
        targets=needs.targets,
        options=needs.options,
        done=curves,
        metric=metric,
        config=job.config,
        candidates=_refit_candidates(job.model, job.data, job.batch_size, as_saved, job.config),
        mask_order=needs.order,
    )
    job.timings["curves"] = job.timings.get("curves", 0.0) + time.perf_counter() - t
    _count_points(job, result)
    return result.curves


def measure_dense(
    job: _Job,
    settings: PruneSettings,
    targets: Sequence[float],
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
    timings: dict[str, float] | None = None,
) -> tuple[CurveFile, GridResult]:
    """The curves of the job's dense model (through the cache), refined for ``targets``:
    with the mask that is applied and the job's resolved output kinds."""
    assert job.reference is not None and job.data is not None
    entry = curve_entry(
        job.model,
        job.layers,
        job.data,
        settings,
        job.config.provider,
        job.batch_size,
        metric=job.metric,
    )
    names = [layer.name for layer in job.layers]
    needs = CurveNeeds(
        _layer_specs(job, settings, ModelWeights(job.model, names)),
        list(targets),
        {"allow_layer_removal": settings.allow_layer_removal},
        _mask_order(settings, _mask_statistics(job, settings, None)),
    )
    result = _measure_with_cache(
        job.model,
        job.layers,
        job.reference,
        settings,
        job.config,
        entry,
        cache_dir,
        progress,
        needs,
        candidates=_refit_candidates(job.model, job.data, job.batch_size, settings, job.config),
        timings=timings,
        metric=job.metric,
    )
    return entry, result


def _check_storage(storage: str) -> None:
    if storage not in STORAGES:
        raise UserError(f"unknown storage {storage!r}", f"choose one of {', '.join(STORAGES)}")


def curve_entry(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    data: Mapping[str, np.ndarray],
    settings: PruneSettings,
    provider: str,
    batch_size: int,
    *,
    metric: str | None = None,
) -> CurveFile:
    """The identity of a set of curves: model, data and every setting that changes them.

    Refit-aware curves (``refit_curves``) add a ``refit`` entry (solver, damping), so they
    never share a key, a cache file or an ``allocate`` input with plain-mask curves; plain
    curves keep the key they always had. Curves of another mask than magnitude
    (``settings.curve_mask``) add a ``mask`` entry; magnitude curves have none. Likewise
    ``output_kinds`` (from a resolved ``metric``) enters the key only when the kinds change
    what is measured (kl / prob-mse on outputs other than last-axis logits).
    """
    measured: dict[str, Any] = {
        "metric": settings.metric,
        "levels": settings.levels,
        "provider": provider,
        "batch_size": batch_size,
    }
    if settings.refit_curves:
        measured["refit"] = {"solver": settings.refit_solver, "damping": REFIT_DAMPING}
    if settings.curve_mask != "magnitude":  # magnitude curves keep the key they always had
        measured["mask"] = settings.curve_mask
    if isinstance(metric, Metric) and metric.measures_kinds():
        measured["output_kinds"] = {n: k.key() for n, k in metric.output_kinds().items()}
    return CurveFile(
        model=model_fingerprint(model),
        data=data_fingerprint(data),
        settings=measured,
        layers={layer.name: layer.size for layer in layers},
    )


def _refit_candidates(
    model: onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    batch_size: int,
    settings: PruneSettings,
    config: SessionConfig,
) -> RefitCandidates | None:
    """The candidate factory of refit-aware curves, or None for plain-mask curves."""
    if not settings.refit_curves:
        return None
    return RefitCandidates(
        model,
        data,
        batch_size=batch_size,
        config=config,
        solver=settings.refit_solver,
        damping=REFIT_DAMPING,
        select=settings.select_masks,
    )


def _measure_with_cache(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    reference: Reference,
    settings: PruneSettings,
    config: SessionConfig,
    entry: CurveFile,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
    needs: CurveNeeds,
    *,
    candidates: RefitCandidates | None = None,
    timings: dict[str, float] | None = None,
    metric: str | None = None,
) -> GridResult:
    cache = CurveCache(cache_dir) if cache_dir is not None else None
    with cache.locked(entry) if cache is not None else contextlib.nullcontext():
        done = cache.load(entry) if cache is not None else {}
        entry.curves.update(done)

        def save(name: str, curve: Curve) -> None:
            entry.curves[name] = curve
            if cache is not None:
                cache.store(entry)

        curves = measure_grid(
            model,
            layers,
            reference,
            needs.specs,
            levels=settings.levels,
            kind=settings.grid,
            targets=needs.targets,
            options=needs.options,
            done=_usable(done, settings.levels),
            on_curve=save,
            progress=progress,
            metric=metric or settings.metric,
            config=config,
            candidates=candidates,
            mask_order=needs.order,
        )
    if candidates is not None and candidates.costs:
        cost = candidates.summary()
        log.info("refit-aware curves: %s", cost)
        if timings is not None:
            for key in ("hessian_s", "solve_s"):
                name = f"curves_refit_{key.removesuffix('_s')}"
                timings[name] = timings.get(name, 0.0) + float(cost[key])
    return curves


def _usable(curves: Mapping[str, Curve], levels: int) -> dict[str, Curve]:
    """Cached curves whose points lie on the grid (all of them, for a key that includes
    ``levels``; a curve that does not is measured again)."""
    return {name: c for name, c in curves.items() if on_grid({name: c}, levels)}


def _load_eval(
    model: onnx.ModelProto, path: str | os.PathLike[str] | None, labels: str | None
) -> tuple[dict[str, np.ndarray] | None, np.ndarray | None]:
    if path is None:
        if labels is not None:
            raise UserError("--labels needs --eval-data", "pass the labelled test set")
        return None, None
    raw = calib.load_npz(path)
    label_array = None
    if labels is not None:
        if labels not in raw:
            raise UserError(
                f"{str(path)!r} has no array {labels!r}", f"it has {', '.join(sorted(raw))}"
            )
        label_array = raw.pop(labels)
    arrays = calib.check_data(raw, calib.model_inputs(model), str(path))
    return arrays, label_array
