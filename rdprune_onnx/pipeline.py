"""The prune pipeline: load -> find layers -> calibrate -> curves -> allocate -> mask ->
verify -> write. :func:`prune` is the one call the command line and Python users make.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rdprune_onnx import calibration as calib
from rdprune_onnx.allocate import METHODS, AllocationProblem, Curve, LayerSpec, get_allocator
from rdprune_onnx.cache import CurveCache, CurveFile, data_fingerprint, model_fingerprint
from rdprune_onnx.curves import (
    Reference,
    grid,
    measure_curves,
    measure_distortion,
    run_reference,
)
from rdprune_onnx.distortion import METRICS, check_metric
from rdprune_onnx.errors import UserError
from rdprune_onnx.evaluate import Evaluation, compare
from rdprune_onnx.graph.layers import Layer, LayerScan, Skipped, find_layers, read_weight
from rdprune_onnx.graph.load import load_model, save_model, uses_external_data
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask
from rdprune_onnx.report import write_json
from rdprune_onnx.runtime import Session, SessionConfig, resolve_provider, versions

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

    def check(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(
                f"--ratio must be strictly between 0 and 1, got {self.ratio}",
                "e.g. --ratio 0.8 zeroes 80% of the prunable weights",
            )
        if self.method not in METHODS:
            raise UserError(
                f"unknown method {self.method!r}", f"choose one of {', '.join(METHODS)}"
            )
        if self.metric not in METRICS:
            raise UserError(
                f"unknown metric {self.metric!r}", f"choose one of {', '.join(METRICS)}"
            )
        grid(self.levels)
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}", "e.g. --steps 3")
        if self.steps > 1 and self.method != "rd":
            raise UserError(
                f"--steps applies to --method rd only (got {self.method})", "drop --steps"
            )


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
    measured_distortion: float
    timings: dict[str, float]
    allocation_info: dict[str, Any]
    curves: dict[str, Curve] | None = None
    evaluation: Evaluation | None = None
    model: onnx.ModelProto | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "settings": vars(self.settings) | {"exclude": list(self.settings.exclude)},
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
                    if self.predicted_distortion is not None and self.measured_distortion > 0
                    else None
                ),
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
            "timings_s": self.timings,
            "versions": versions() | {"python": platform.python_version()},
        }


def default_output(model_path: str | os.PathLike[str]) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + ".pruned.onnx")


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
        )
    else:
        raise UserError(
            "no calibration data", "pass --data FILE.npz or --synthetic N (random inputs)"
        )
    batch_size = spec.batch_size
    fixed = calib.fixed_batch(specs)
    if fixed is not None:
        batch_size = fixed
        n = calib.sample_count(data)
        if n < fixed:
            raise UserError(
                f"the model's batch dimension is fixed at {fixed}, but only {n} samples given",
                f"give at least {fixed} samples",
            )
        if n % fixed:
            log.warning("dropping %d samples that do not fill a batch of %d", n % fixed, fixed)
            data = {k: v[: n - n % fixed] for k, v in data.items()}
    return data, batch_size


def select_layers(scan: LayerScan, exclude: Sequence[str]) -> list[Layer]:
    import fnmatch

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
    progress: bool = False,
) -> PruneResult:
    """Prune ``model_path`` to ``settings.ratio`` and (unless ``write`` is False) write it.

    Curves are cached in ``cache_dir`` (resumable; ``None`` disables the cache).
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    settings.check()
    out_path = Path(output) if output is not None else default_output(model_path)
    if write:
        if out_path.resolve() == Path(model_path).resolve():
            raise UserError("refusing to overwrite the input model", "choose another -o")
        if out_path.exists() and not force:
            raise UserError(f"output {str(out_path)!r} already exists", "pass --force")
        if not out_path.parent.is_dir():
            raise UserError(
                f"output folder {str(out_path.parent)!r} does not exist", "create it first"
            )
    if report is not None and Path(report).exists() and not force:
        raise UserError(f"report {str(report)!r} already exists", "pass --force")

    model = load_model(model_path)
    had_external = _input_had_external_data(model_path)
    scan = find_layers(model)
    layers = select_layers(scan, settings.exclude)
    data, batch_size = load_calibration(model, calibration)
    eval_arrays, eval_labels = _load_eval(model, eval_data, labels)
    provider = resolve_provider(settings.provider)
    config = SessionConfig(provider=provider)
    timings["load"] = time.perf_counter() - start

    t = time.perf_counter()
    reference = run_reference(model, data, batch_size, config)
    check_metric(settings.metric, reference.outputs, reference.values[0])
    pruned_weights = {layer.name: read_weight(model, layer.name) for layer in layers}
    current = model
    curves: dict[str, Curve] | None = None
    steps = []
    for step in range(1, settings.steps + 1):
        step_ratio = settings.ratio * step / settings.steps
        if settings.method == "rd":
            step_reference = reference if step == 1 else reference.rebased(current, config)
            t = time.perf_counter()
            curves = _curves_with_cache(
                current,
                layers,
                data,
                step_reference,
                settings,
                config,
                batch_size,
                cache_dir,
                progress,
            )
            timings["curves"] = timings.get("curves", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        problem = AllocationProblem(
            layers=[
                LayerSpec(
                    layer.name,
                    layer.shape,
                    # Weights already zero stay zero: a layer's ratio never decreases
                    # (between iterative steps, or below its sparsity before pruning).
                    min_ratio=(
                        float(np.count_nonzero(pruned_weights[layer.name] == 0)) / layer.size
                    ),
                )
                for layer in layers
            ],
            target_ratio=step_ratio,
            curves=curves,
            magnitudes=(
                {n: np.abs(w.astype(np.float64)).ravel() for n, w in pruned_weights.items()}
                if settings.method in ("global", "lamp")
                else None
            ),
            options={"allow_layer_removal": settings.allow_layer_removal},
        )
        allocation = get_allocator(settings.method).allocate(problem)
        timings["allocate"] = timings.get("allocate", 0.0) + time.perf_counter() - t
        pruned_weights = {
            name: apply_mask(pruned_weights[name], int(allocation.counts[name]))
            for name in pruned_weights
        }
        current = replace_weights(model, pruned_weights)
        steps.append(
            {
                "step": step,
                "target_ratio": step_ratio,
                "ratios": allocation.ratios(problem.layers),
                **dict(allocation.info),
            }
        )

    t = time.perf_counter()
    pruned_model = current
    measured = measure_distortion(Session(pruned_model, config), reference, settings.metric)
    timings["verify"] = time.perf_counter() - t

    results = []
    predicted_total = 0.0 if curves else None
    for layer in layers:
        count = int(allocation.counts[layer.name])
        ratio = count / layer.size
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
                pruned=int(np.count_nonzero(pruned_weights[layer.name] == 0)),
                ratio=ratio,
                sparsity_before=layer.sparsity,
                predicted=predicted,
            )
        )
    total = sum(r.size for r in results)
    achieved = sum(r.pruned for r in results) / total

    evaluation = None
    if eval_arrays is not None:
        t = time.perf_counter()
        evaluation = compare(
            model,
            pruned_model,
            eval_arrays,
            labels=eval_labels,
            batch_size=batch_size,
            config=config,
        )
        timings["evaluate"] = time.perf_counter() - t

    written = None
    if write:
        t = time.perf_counter()
        save_model(
            pruned_model,
            out_path,
            external_data=had_external or None,
            force=force,
            protect=(model_path,),
        )
        written = str(out_path)
        timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    result = PruneResult(
        input=str(model_path),
        output=written,
        settings=settings,
        provider=provider,
        samples=calib.sample_count(data),
        layers=results,
        skipped=scan.skipped,
        target_ratio=settings.ratio,
        achieved_ratio=achieved,
        predicted_distortion=predicted_total,
        measured_distortion=measured,
        timings=timings,
        allocation_info=dict(allocation.info) | ({"steps": steps} if len(steps) > 1 else {}),
        curves=curves,
        evaluation=evaluation,
        model=pruned_model,
    )
    if report is not None:
        write_json(result.to_dict(), report, force=force)
    return result


def curve_entry(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    data: Mapping[str, np.ndarray],
    settings: PruneSettings,
    provider: str,
    batch_size: int,
) -> CurveFile:
    """The identity of a set of curves: model, data and every setting that changes them."""
    return CurveFile(
        model=model_fingerprint(model),
        data=data_fingerprint(data),
        settings={
            "metric": settings.metric,
            "levels": settings.levels,
            "provider": provider,
            "batch_size": batch_size,
            "engine": "per-layer-session/1",
        },
        layers={layer.name: layer.size for layer in layers},
    )


def _curves_with_cache(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    data: Mapping[str, np.ndarray],
    reference: Reference,
    settings: PruneSettings,
    config: SessionConfig,
    batch_size: int,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
) -> dict[str, Curve]:
    entry = curve_entry(model, layers, data, settings, config.provider, batch_size)
    cache = CurveCache(cache_dir) if cache_dir is not None else None
    done = cache.load(entry) if cache is not None else {}

    def save(name: str, curve: Curve) -> None:
        entry.curves[name] = curve
        if cache is not None:
            cache.store(entry)

    entry.curves.update(done)
    return measure_curves(
        model,
        layers,
        reference,
        ratios=grid(settings.levels),
        metric=settings.metric,
        config=config,
        progress=progress,
        done=done,
        on_curve=save,
    )


def _input_had_external_data(model_path: str | os.PathLike[str]) -> bool:
    return uses_external_data(onnx.load_model(str(model_path), load_external_data=False))


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
