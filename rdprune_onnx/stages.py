"""The stages of a prune after the curves: allocate -> mask -> refit -> verify -> write.

Each stage is one function with a typed result that the next one takes:
:func:`allocate_and_mask` (:class:`Masked`), :func:`refit_layers` (:class:`Refit`),
:func:`build_pruned` (:class:`Pruned`), :func:`verify` and :func:`evaluate_pruned`,
:func:`summarize` (the :class:`~rdprune_onnx.result.PruneResult`), :func:`write_pruned` and
:func:`write_report`. :func:`rdprune_onnx.pipeline.prune` calls them in that order;
:class:`rdprune_onnx.probe.Prober` calls the same ones for every probe.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rdprune_onnx import calibration as calib
from rdprune_onnx.activations import Statistics
from rdprune_onnx.allocate import Allocation, AllocationProblem, Curve, LayerSpec, get_allocator
from rdprune_onnx.compact import compact_weights
from rdprune_onnx.curve_source import CurveNeeds, CurveSource
from rdprune_onnx.curves import measure_distortion
from rdprune_onnx.distortion import Metric
from rdprune_onnx.errors import UserError
from rdprune_onnx.evaluate import Evaluation, compare_outputs, run_all
from rdprune_onnx.graph.external import write_external
from rdprune_onnx.graph.load import read_model, save_model
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.job import (
    Job,
    apply_masks,
    layer_specs,
    mask_order,
    mask_scores,
    mask_statistics,
)
from rdprune_onnx.reconstruct import reconstruct
from rdprune_onnx.report import write_json
from rdprune_onnx.result import LayerResult, PruneResult
from rdprune_onnx.runtime import Session, user_model
from rdprune_onnx.sanity import keep_unused, unused_layers
from rdprune_onnx.settings import OutputSpec, PruneSettings
from rdprune_onnx.weights import ModelWeights

log = logging.getLogger(__name__)


# --- allocate -> mask -------------------------------------------------------------------------


@dataclass
class Masked:
    """What the allocation chose and the weights masked at it (the last step's, with
    ``--steps``; ``steps`` records every step)."""

    weights: Mapping[str, np.ndarray]
    allocation: Allocation
    specs: list[LayerSpec]
    steps: list[dict[str, Any]]
    curves: dict[str, Curve] | None


@dataclass
class _Step:
    weights: Mapping[str, np.ndarray]
    allocation: Allocation
    specs: list[LayerSpec]
    curves: dict[str, Curve] | None
    stats: Statistics | None
    record: dict[str, Any]


def allocate_and_mask(job: Job, settings: PruneSettings, curves: CurveSource | None) -> Masked:
    """Choose ratios (in ``settings.steps`` steps, each re-measuring the curves of the model
    pruned so far) and mask the layers at them.

    For a lazy job the weights come as a :class:`~rdprune_onnx.weights.ModelWeights` that
    masks each layer when it is read, so no step holds every layer's weight at once.
    """
    if settings.mask_inputs != "dense" and not settings.data_aware_mask:
        log.warning(
            "--mask-inputs %s has no effect with --mask %s (it uses no statistics)",
            settings.mask_inputs,
            settings.mask,
        )
    weights = job.dense_weights()
    records: list[dict[str, Any]] = []
    step: _Step | None = None
    for number in range(1, settings.steps + 1):
        step = _allocate_step(job, settings, curves, weights, number)
        weights = step.weights
        records.append(step.record)
    assert step is not None
    allocation = step.allocation
    if settings.data_aware_mask:
        missing = sorted(step.stats.missing) if step.stats else []
        allocation = Allocation(
            allocation.counts,
            allocation.predicted,
            dict(allocation.info)
            | {
                "mask": settings.mask,
                "mask_inputs": settings.mask_inputs,
                "mask_without_statistics": missing,
            },
        )
    return Masked(weights, allocation, step.specs, records, step.curves)


def _allocate_step(
    job: Job,
    settings: PruneSettings,
    source: CurveSource | None,
    weights: Mapping[str, np.ndarray],
    number: int,
) -> _Step:
    """One step: statistics, the problem's layers, the curves (rd), the allocation at this
    step's share of the ratio, and the masks."""
    ratio = settings.ratio * number / settings.steps
    # A data-aware mask's statistics, recomputed on the partly pruned model each step.
    stats = mask_statistics(job, settings, weights if number > 1 else None)
    with job.timed("allocate"):
        specs = layer_specs(job, settings, weights)
    options = {"allow_layer_removal": settings.allow_layer_removal}
    curves = None
    if settings.method == "rd":
        assert source is not None
        with job.timed("curves"):
            model, reference = job.model, job.reference
            if number > 1:
                model = replace_weights(job.model, weights)
                if reference is not None:
                    reference = reference.rebased(model, job.config)
            needs = CurveNeeds(specs, [ratio], options, mask_order(settings, stats))
            curves = source(model, reference, needs)
    with job.timed("allocate"):
        problem = AllocationProblem(
            layers=specs,
            target_ratio=ratio,
            curves=curves,
            # The allocators take |w| themselves, one layer at a time (or the mask's scores).
            magnitudes=(
                mask_scores(settings, stats, weights)
                if settings.method in ("global", "lamp")
                else None
            ),
            options=options,
        )
        allocation, specs, unused = _allocate_used(job, settings, problem)
        del problem
    record = {
        "step": number,
        "target_ratio": ratio,
        "ratios": allocation.ratios(specs),
        **dict(allocation.info),
        **unused,
    }
    masked = apply_masks(job, settings, weights, allocation.counts, stats)
    return _Step(masked, allocation, specs, curves, stats, record)


def _allocate_used(
    job: Job, settings: PruneSettings, problem: AllocationProblem
) -> tuple[Allocation, list[LayerSpec], dict[str, Any]]:
    """The allocation, with layers whose whole curve is zero (never reaching the output on
    the calibration data) held at the median ratio of the others unless
    ``prune_unused_layers``; and the step's record of them."""
    allocator = get_allocator(settings.method)
    allocation = allocator.allocate(problem)
    specs = list(problem.layers)
    unused = unused_layers(problem.curves, job.names) if problem.curves is not None else []
    held = None if settings.prune_unused_layers else keep_unused(specs, allocation, unused)
    if held is not None:
        specs = held
        allocation = allocator.allocate(dataclasses.replace(problem, layers=specs))
    if not unused:
        return allocation, specs, {}
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
    return allocation, specs, {"unused_layers": unused, "unused_pruned": held is None}


# --- refit ------------------------------------------------------------------------------------


@dataclass
class Refit:
    """The masked weights refit to the dense layers' outputs (``settings.reconstruct``; else
    the masked weights as they are), the biases it rewrote and each layer's refit record."""

    weights: Mapping[str, np.ndarray]
    biases: dict[str, np.ndarray]
    records: dict[str, dict[str, Any]]


def refit_layers(job: Job, settings: PruneSettings, masked: Masked) -> Refit:
    if not settings.reconstruct:
        return Refit(masked.weights, {}, {})
    if job.data is None:
        raise UserError("--reconstruct needs calibration data", "pass --data or --synthetic")
    with job.timed("reconstruct"):
        refit = reconstruct(
            job.model,
            masked.weights,
            job.layers,
            job.data,
            batch_size=job.batch_size,
            config=job.config,
            solver=settings.refit_solver,
            select=settings.select_masks,
            inputs=settings.refit_inputs,
        )
    records = {
        r.name: {
            k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in vars(r).items()
        }
        for r in refit.layers
    }
    weights = {name: refit.weights.get(name, w) for name, w in masked.weights.items()}
    return Refit(weights, dict(refit.biases), records)


# --- the pruned model: build, verify, evaluate ------------------------------------------------


@dataclass
class Pruned:
    """The pruned model; for a lazy job it is read from the staged file at ``path`` (its
    weights on disk), else it is in memory."""

    model: onnx.ModelProto
    weights: Mapping[str, np.ndarray]
    path: Path | None = None


def build_pruned(job: Job, refit: Refit, staging: Path | None) -> Pruned:
    """The model with the pruned (and refit) weights. A lazy job's is first written to
    ``staging`` (see :func:`rdprune_onnx.job.staging_folder`), streaming one weight at a
    time, and read back from there: the dense weights stay on disk and only ONNX Runtime
    holds a copy of the pruned ones."""
    if staging is None:
        return Pruned(replace_weights(job.model, {**refit.weights, **refit.biases}), refit.weights)
    with job.timed("stage"):
        try:
            staged = write_external(
                job.model,
                staging,
                # Biases come only from --reconstruct, whose weights are a dict already.
                {**refit.weights, **refit.biases} if refit.biases else refit.weights,
                name="pruned.onnx",
            )
        except OSError as exc:
            raise UserError(
                f"could not write the pruned model to {str(staging)!r}: {exc.strerror or exc}",
                "free disk space next to the output (it is written there first) or choose "
                "another -o",
            ) from None
        model = read_model(staged, check=False)[0]
    return Pruned(model, ModelWeights(model, list(refit.weights)), staged)


def verify(job: Job, pruned: Pruned) -> float | None:
    """The pruned model's distortion on the calibration data (None without data)."""
    if job.reference is None:
        return None
    with job.timed("verify"):
        session = Session(pruned.model, job.config, path=pruned.path)
        return measure_distortion(session, job.reference, job.metric)


def evaluate_pruned(job: Job, pruned: Pruned) -> Evaluation | None:
    """The dense and the pruned model compared on the held-out data (None without it)."""
    if job.eval_arrays is None:
        return None
    with job.timed("evaluate"):
        dense = run_dense(job, job.eval_arrays)
        # The pruned copy is the library's graph: ONNX Runtime failing on it is a bug
        # (InternalError), not the user's (the dense run on the same data passed).
        session = Session(pruned.model, job.config, path=pruned.path)
        outputs = run_all(session, job.eval_arrays, job.batch_size)
        return compare_outputs(dense, outputs, calib.sample_count(job.eval_arrays), job.eval_labels)


def run_dense(job: Job, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The dense model's outputs on ``arrays`` (the user's model and data: an ONNX Runtime
    failure is a UserError)."""
    with user_model("the model on --eval-data"):
        session = Session(job.model, job.config, path=job.path if job.lazy else None)
        return run_all(session, arrays, job.batch_size)


# --- the result and the files -----------------------------------------------------------------


def summarize(
    job: Job,
    settings: PruneSettings,
    masked: Masked,
    refit: Refit,
    pruned: Pruned,
    measured: float | None,
    evaluation: Evaluation | None,
) -> PruneResult:
    """What the run did (nothing written yet: see :func:`write_pruned`)."""
    layers, predicted = layer_results(job, masked, refit, pruned)
    achieved = sum(r.pruned for r in layers) / sum(r.size for r in layers)
    _warn_outcome(settings, achieved, predicted)
    return PruneResult(
        input=job.path,
        output=None,
        settings=settings,
        provider=job.config.provider,
        samples=calib.sample_count(job.data) if job.data is not None else 0,
        layers=layers,
        skipped=job.scan.skipped,
        target_ratio=settings.ratio,
        achieved_ratio=achieved,
        predicted_distortion=predicted,
        measured_distortion=measured,
        timings=dict(job.timings),
        allocation_info=allocation_info(settings, masked, layers),
        curves=masked.curves,
        evaluation=evaluation,
        # A staged model's weights are in a folder about to go: it is read back once written.
        model=pruned.model if pruned.path is None else None,
        output_kinds=_kinds_record(job.metric),
        curve_points=job.curve_points,
    )


def layer_results(
    job: Job, masked: Masked, refit: Refit, pruned: Pruned
) -> tuple[list[LayerResult], float | None]:
    """Each layer's outcome, and the predicted distortion (the sum of the layers' own,
    from the allocation or read off the curves; None without curves)."""
    allocation, curves = masked.allocation, masked.curves
    results = []
    total = 0.0 if curves else None
    for layer in job.layers:
        ratio = int(allocation.counts[layer.name]) / layer.size
        predicted = None
        if allocation.predicted is not None:
            predicted = float(allocation.predicted[layer.name])
        elif curves is not None:
            curve = curves[layer.name]
            predicted = float(np.interp(ratio, curve.ratios, curve.distortion))
        if predicted is not None and total is not None:
            total += predicted
        results.append(
            LayerResult(
                name=layer.name,
                op_types=layer.op_types,
                shape=layer.shape,
                size=layer.size,
                pruned=int(np.count_nonzero(pruned.weights[layer.name] == 0)),
                ratio=ratio,
                sparsity_before=layer.sparsity,
                predicted=predicted,
                refit=refit.records.get(layer.name),
            )
        )
    return results, total


def allocation_info(
    settings: PruneSettings, masked: Masked, layers: list[LayerResult]
) -> dict[str, Any]:
    """The report's ``allocation``: the allocator's own record, the budget reached, and
    the steps and unused layers when there are any."""
    specs, steps = masked.specs, masked.steps
    cost_total = sum(spec.size * spec.unit_cost for spec in specs)
    achieved_cost = (
        sum(r.pruned * spec.unit_cost for r, spec in zip(layers, specs, strict=True)) / cost_total
    )
    info = dict(masked.allocation.info) | {
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
    return info


def _warn_outcome(settings: PruneSettings, achieved: float, predicted: float | None) -> None:
    if achieved > settings.ratio + 0.005:
        log.warning(
            "the model was already sparser than --ratio %g: %.2f%% of its prunable weights "
            "are zero now (weights already zero stay zero)",
            settings.ratio,
            100 * achieved,
        )
    if settings.method == "rd" and predicted == 0.0 and achieved > 0:
        log.warning(
            "the predicted distortion is exactly 0 at ratio %g: on this calibration data "
            "the pruned weights never change the output; the pruned model may break on "
            "other inputs (use more varied calibration data)",
            settings.ratio,
        )


def _kinds_record(metric: str) -> dict[str, Any] | None:
    """Each output's resolved kind, for the report (None before any output was run)."""
    if not isinstance(metric, Metric):
        return None
    return {name: vars(kind) for name, kind in metric.output_kinds().items()}


def write_pruned(
    job: Job,
    result: PruneResult,
    model: onnx.ModelProto,
    output: OutputSpec,
    started: float | None = None,
) -> PruneResult:
    """Write ``model`` to the output (unless ``output.write`` is False) in its storage;
    record the files, and the run's total time from ``started``."""
    written: list[Path] = []
    if output.write:
        t = time.perf_counter()
        target = output.target(job.path)
        to_write = model
        if output.storage == "compact":
            to_write = compact_weights(model, job.names)
        written = save_model(
            to_write,
            target,
            external_data=job.had_external or None,
            force=output.force,
            protect=job.files.protected(),
        )
        result.output = str(target)
        result.timings["write"] = time.perf_counter() - t
    if started is not None:
        result.timings["total"] = time.perf_counter() - started
    if result.model is None and result.output is not None and output.storage == "dense":
        result.model = read_model(result.output, check=False)[0]  # weights read lazily
    result.files = [str(path) for path in written]
    return result


def write_report(job: Job, result: PruneResult, output: OutputSpec) -> PruneResult:
    """Write the JSON report (``output.report``); all or nothing: if it fails, the files
    the run wrote are removed (no model is left behind without its report)."""
    if output.report is None:
        return result
    try:
        write_json(
            result.to_dict(), output.report, force=output.force, protect=job.files.protected()
        )
    except BaseException:
        for path in result.files:
            Path(path).unlink(missing_ok=True)
        raise
    result.files.append(str(output.report))
    return result


__all__ = [
    "Masked",
    "Pruned",
    "Refit",
    "allocate_and_mask",
    "allocation_info",
    "build_pruned",
    "evaluate_pruned",
    "layer_results",
    "refit_layers",
    "run_dense",
    "summarize",
    "verify",
    "write_pruned",
    "write_report",
]
