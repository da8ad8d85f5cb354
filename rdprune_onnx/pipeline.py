"""The prune pipeline: load -> layers -> calibrate -> curves -> allocate -> mask -> refit ->
verify -> write. :func:`prune` is the one call the command line and Python users make; it
reads as that flow, one call per stage (the stages: :mod:`rdprune_onnx.job`,
:mod:`rdprune_onnx.curve_source`, :mod:`rdprune_onnx.stages`).

:func:`measure` saves a model's curves, :func:`prune_from_curves` prunes with saved ones
(the ``curves`` and ``allocate`` commands).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rdprune_onnx.cache import CurveFile, read_curve_file
from rdprune_onnx.curve_source import (
    CurveNeeds,
    CurveSource,
    MeasuredCurves,
    SavedCurves,
    curve_entry,
    measure_dense,
)
from rdprune_onnx.errors import UserError
from rdprune_onnx.job import (
    calibrate,
    check_outputs,
    check_targets,
    load_calibration,
    load_evaluation,
    load_job,
    open_model,
    require_calibration,
    select_layers,
    staging_folder,
)
from rdprune_onnx.report import write_json
from rdprune_onnx.result import LayerResult, PruneResult
from rdprune_onnx.settings import (
    BUDGETS,
    CalibrationSpec,
    EvalSpec,
    LayerBounds,
    OutputSpec,
    PruneSettings,
    default_output,
    output_for_ratio,
    read_overrides,
    resolve_specs,
)
from rdprune_onnx.stages import (
    allocate_and_mask,
    build_pruned,
    evaluate_pruned,
    refit_layers,
    summarize,
    verify,
    write_pruned,
    write_report,
)

if TYPE_CHECKING:
    from typing import Unpack

    from rdprune_onnx.search import QualityTarget
    from rdprune_onnx.settings import SpecOptions


def prune(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    calibration: CalibrationSpec,
    *,
    output: OutputSpec | str | os.PathLike[str] | None = None,
    evaluation: EvalSpec | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    target: QualityTarget | None = None,
    curves: str | os.PathLike[str] | None = None,
    **options: Unpack[SpecOptions],
) -> PruneResult:
    """Prune ``model_path`` to ``settings.ratio`` and write it (see :class:`OutputSpec`:
    the model's path, report, plot target, storage, ``write=False``, ``force``).

    ``evaluation`` compares the dense and pruned models on held-out data. Curves are cached
    in ``cache_dir`` (resumable; ``None`` disables the cache), or read from the file
    ``curves`` saved by :func:`measure` (see :func:`prune_from_curves`). With a ``target``
    (``max_drop`` or ``max_distortion``) the ratio is searched instead
    (:func:`rdprune_onnx.search.prune_to_target`; ``settings.ratio`` is ignored) and the
    result's ``search`` lists every probe. The flat keywords ``write``, ``force``,
    ``report``, ``plot``, ``storage``, ``eval_data`` and ``labels`` set the specs' fields.
    """
    # About 70 lines with the signature and docstring: the body is the flow, one visible
    # call per stage, on purpose in one place (a reader should not hop to follow it).
    out, evaluation = resolve_specs(output, evaluation, options)
    if target is not None:
        from rdprune_onnx.search import prune_to_target

        return prune_to_target(
            model_path,
            settings,
            calibration,
            target,
            output=out,
            evaluation=evaluation,
            cache_dir=cache_dir,
            progress=progress,
        )
    started = time.perf_counter()
    settings.check()
    out.check()
    files = check_outputs(
        model_path,
        out,
        inputs={
            "curves file": curves,
            "calibration data": calibration.data,
            "evaluation data": evaluation.data,
        },
    )
    require_calibration(calibration, settings.method == "rd" and curves is None)
    saved = read_curve_file(curves) if curves is not None else None
    job = open_model(model_path, settings, files=files, outputs=out.models(model_path))
    calibrate(job, settings, calibration)
    load_evaluation(job, evaluation)
    source: CurveSource = (  # measured on demand, for what the allocation asks
        MeasuredCurves(job, settings, cache_dir, progress)
        if saved is None or curves is None
        else SavedCurves(job, settings, saved, curves)
    )
    masked = allocate_and_mask(job, settings, source)
    with staging_folder(job, out) as staging:
        refit = refit_layers(job, settings, masked)
        pruned = build_pruned(job, refit, staging)
        measured = verify(job, pruned)
        result = summarize(
            job, settings, masked, refit, pruned, measured, evaluate_pruned(job, pruned)
        )
        write_pruned(job, result, pruned.model, out, started)
    return write_report(job, result, out)


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
    :func:`prune_from_curves` can check that curves belong to the model they are applied
    to. With ``settings.grid == "adaptive"`` the curves are refined for the ratios
    ``targets`` (with ``settings``' bounds and budget); pruning at another ratio checks
    whether the measured points cover it.
    """
    for ratio in targets:
        if not 0.0 < ratio < 1.0:
            raise UserError(f"--ratio must be strictly between 0 and 1, got {ratio}", "e.g. 0.8")
    files = check_outputs(
        model_path,
        OutputSpec(write=False, force=force),
        inputs={"calibration data": calibration.data},
    )
    if output is not None:
        files.claim(output, "curves file", suffixes=(".json",))
    require_calibration(calibration)
    job = load_job(model_path, settings, calibration, files=files)
    entry, result = measure_dense(job, settings, targets, cache_dir, progress)
    entry.curves = result.curves
    entry.grid = result.summary()
    if output is not None:
        write_json(
            entry.to_dict(), output, force=force, protect=files.protected(), label="curves file"
        )
    return entry


def prune_from_curves(
    curves_path: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    *,
    calibration: CalibrationSpec | None = None,
    output: OutputSpec | str | os.PathLike[str] | None = None,
    evaluation: EvalSpec | None = None,
    **options: Unpack[SpecOptions],
) -> PruneResult:
    """Prune ``model_path`` with curves saved by :func:`measure`, measuring nothing
    (unless the saved points do not cover the ratio, see
    :class:`~rdprune_onnx.curve_source.SavedCurves`).

    With the same settings it writes the same bytes as :func:`prune`. Calibration data is
    optional here: with it, the pruned model's distortion is measured and reported.
    """
    if settings.steps > 1:
        raise UserError(
            "--steps re-measures curves on the partly pruned model", "use `prune --steps`"
        )
    return prune(
        model_path,
        settings,
        calibration if calibration is not None else CalibrationSpec(),
        curves=curves_path,
        output=output,
        evaluation=evaluation,
        **options,
    )


__all__ = [
    "BUDGETS",
    "DEFAULT_TARGETS",
    "CalibrationSpec",
    "CurveNeeds",
    "EvalSpec",
    "LayerBounds",
    "LayerResult",
    "OutputSpec",
    "PruneResult",
    "PruneSettings",
    "check_targets",
    "curve_entry",
    "default_output",
    "load_calibration",
    "measure",
    "output_for_ratio",
    "prune",
    "prune_from_curves",
    "read_overrides",
    "select_layers",
]
