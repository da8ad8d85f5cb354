"""Where the allocation's rate-distortion curves come from: measured on the job's model
through the curve cache (:class:`MeasuredCurves`, resumable), or read from a file saved by
``curves`` (:class:`SavedCurves`, measuring only the points it lacks).

A curve source is called with the model being pruned (the dense one, or the partly pruned
one of an iterative step), its reference outputs and what the allocation will ask
(:class:`CurveNeeds`); it returns one curve per layer.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from rdprune_onnx.allocate import Curve, LayerSpec
from rdprune_onnx.allocate.refine import plan_refinement
from rdprune_onnx.cache import CurveCache, CurveFile, data_fingerprint, model_fingerprint
from rdprune_onnx.curves import MaskOrder, Reference
from rdprune_onnx.distortion import Metric
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import Layer
from rdprune_onnx.grid import GridResult, measure_grid, on_grid
from rdprune_onnx.job import Job, layer_specs, mask_order, mask_statistics
from rdprune_onnx.reconstruct import REFIT_DAMPING, RefitCandidates
from rdprune_onnx.runtime import SessionConfig
from rdprune_onnx.settings import PruneSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurveNeeds:
    """What the allocation will ask of the curves: the adaptive grid refines for it."""

    specs: Sequence[LayerSpec]
    targets: Sequence[float]
    options: Mapping[str, object]
    # The mask order of the measured layers (a data-aware mask); None: magnitude.
    order: MaskOrder | None = None


CurveSource = Callable[[onnx.ModelProto, Reference | None, CurveNeeds], dict[str, Curve]]


class MeasuredCurves:
    """Curves measured on the model each call names (through the cache in ``cache_dir``;
    None: no cache), for what the allocation needs."""

    def __init__(
        self,
        job: Job,
        settings: PruneSettings,
        cache_dir: str | os.PathLike[str] | None,
        progress: bool = False,
    ) -> None:
        self.job, self.settings = job, settings
        self.cache_dir, self.progress = cache_dir, progress

    def __call__(
        self, model: onnx.ModelProto, reference: Reference | None, needs: CurveNeeds
    ) -> dict[str, Curve]:
        assert reference is not None
        job = self.job
        _entry, result = measure_model(
            model, job, reference, self.settings, needs, self.cache_dir, self.progress, job.timings
        )
        job.count_points(result)
        return result.curves


def measure_dense(
    job: Job,
    settings: PruneSettings,
    targets: Sequence[float],
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
    timings: dict[str, float] | None = None,
) -> tuple[CurveFile, GridResult]:
    """The curves of the job's dense model (through the cache), refined for ``targets``:
    with the mask that is applied and the job's resolved output kinds."""
    assert job.reference is not None
    needs = CurveNeeds(
        layer_specs(job, settings, job.dense_weights()),
        list(targets),
        {"allow_layer_removal": settings.allow_layer_removal},
        mask_order(settings, mask_statistics(job, settings, None)),
    )
    return measure_model(
        job.model, job, job.reference, settings, needs, cache_dir, progress, timings
    )


def measure_model(
    model: onnx.ModelProto,
    job: Job,
    reference: Reference,
    settings: PruneSettings,
    needs: CurveNeeds,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool = False,
    timings: dict[str, float] | None = None,
) -> tuple[CurveFile, GridResult]:
    """``model``'s curves (the job's layers, data and resolved metric) for ``needs``,
    starting from the curves the cache in ``cache_dir`` holds for their identity and
    storing each finished curve there; with that identity (:func:`curve_entry`)."""
    assert job.data is not None
    entry = curve_entry(
        model,
        job.layers,
        job.data,
        settings,
        job.config.provider,
        job.batch_size,
        metric=job.metric,
    )
    candidates = refit_candidates(model, job.data, job.batch_size, settings, job.config)
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
            job.layers,
            reference,
            needs.specs,
            levels=settings.levels,
            kind=settings.grid,
            targets=needs.targets,
            options=needs.options,
            done=usable(done, settings.levels),
            on_curve=save,
            progress=progress,
            metric=job.metric,
            config=job.config,
            candidates=candidates,
            mask_order=needs.order,
        )
    _add_refit_costs(candidates, timings)
    return entry, curves


def _add_refit_costs(candidates: RefitCandidates | None, timings: dict[str, float] | None) -> None:
    """Log what refit-aware curves cost and add it to ``timings``."""
    if candidates is None or not candidates.costs:
        return
    cost = candidates.summary()
    log.info("refit-aware curves: %s", cost)
    if timings is not None:
        for key in ("hessian_s", "solve_s"):
            name = f"curves_refit_{key.removesuffix('_s')}"
            timings[name] = timings.get(name, 0.0) + float(cost[key])


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
        if settings.select_masks:  # each point is SparseGPT's own selection and weights
            measured["refit"]["points"] = "sparsegpt-select"
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


def refit_candidates(
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
        # A curve point is SparseGPT's own selection and weights, without the two
        # fixed-mask exact solves the final refit compares it with: on MiniLM those solves
        # made the curves ~10 min per ratio, and on digits the cheaper points allocated as
        # well (docs/findings.md, "Refit-aware curves for sparsegpt").
        select_refits=False,
    )


def usable(curves: Mapping[str, Curve], levels: int) -> dict[str, Curve]:
    """Cached curves whose points lie on the grid (all of them, for a key that includes
    ``levels``; a curve that does not is measured again)."""
    return {name: c for name, c in curves.items() if on_grid({name: c}, levels)}


class SavedCurves:
    """Curves saved by ``curves`` (:func:`rdprune_onnx.pipeline.measure`), checked against
    the job's model, layers and settings; the points an allocation lacks are measured when
    the data they were measured on is given (see :meth:`__call__`)."""

    def __init__(
        self, job: Job, settings: PruneSettings, saved: CurveFile, path: str | os.PathLike[str]
    ) -> None:
        self.job, self.settings, self.saved, self.path = job, settings, saved, path
        self._check()

    def _check(self) -> None:
        job, settings, saved, path = self.job, self.settings, self.saved, self.path
        if saved.model != model_fingerprint(job.model):
            raise UserError(
                f"the curves in {str(path)!r} were measured on another model",
                f"measure them on {job.path!r} with `rdprune-onnx curves`",
            )
        missing = [layer.name for layer in job.layers if layer.name not in saved.curves]
        if missing:
            raise UserError(
                f"{str(path)!r} has no curve for {len(missing)} layer(s), e.g. {missing[0]!r}",
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

    def __call__(
        self, model: onnx.ModelProto, reference: Reference | None, needs: CurveNeeds
    ) -> dict[str, Curve]:
        """The saved curves, with the points the allocation at ``needs`` lacks measured.

        Curves from the full grid cover every ratio. Adaptive ones cover the ratios whose
        allocation sits on measured points (with measured neighbours); for another ratio the
        missing points are measured when the calibration data they were measured on is
        given, else a UserError says which ratios the file was refined for.
        """
        job, saved = self.job, self.saved
        curves = {layer.name: saved.curves[layer.name] for layer in job.layers}
        levels = int(saved.settings.get("levels", 0))
        if levels < 2 or not on_grid(curves, levels):
            return curves  # curves from elsewhere (no grid): allocate on what is there
        plan = plan_refinement(needs.specs, curves, levels, needs.targets, options=needs.options)
        if not plan.points:
            return curves
        refined = (saved.grid or {}).get("refined_for") or []
        covered = ", ".join(f"{r:g}" for r in refined) or "unknown ratios"
        asked = ", ".join(f"{t:g}" for t in needs.targets)
        lacks = f"ratio {asked} needs {plan.count} curve points that {str(self.path)!r} lacks"
        hint = (
            f"pass the data the curves were measured on (--data), or run `curves --ratio {asked}`"
        )
        if job.reference is None or job.data is None:
            raise UserError(f"{lacks} (its curves were refined for {covered})", hint)
        return self._measure_missing(curves, needs, levels, plan.count, lacks, hint)

    def _measure_missing(
        self,
        curves: dict[str, Curve],
        needs: CurveNeeds,
        levels: int,
        count: int,
        lacks: str,
        hint: str,
    ) -> dict[str, Curve]:
        """Measure the points the saved curves lack, as the file was measured (refused when
        the data or the settings given differ from the file's)."""
        job = self.job
        assert job.reference is not None and job.data is not None
        as_saved, metric = self._as_saved(levels)
        entry = curve_entry(
            job.model,
            job.layers,
            job.data,
            as_saved,
            job.config.provider,
            job.batch_size,
            metric=metric,
        )
        if (entry.data, entry.settings) != (self.saved.data, self.saved.settings):
            raise UserError(
                f"{lacks}, and the calibration data or settings given differ "
                "from the ones it was measured with",
                hint,
            )
        log.info("measuring %d curve points the saved curves lack", count)
        with job.timed("curves"):
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
                candidates=refit_candidates(
                    job.model, job.data, job.batch_size, as_saved, job.config
                ),
                mask_order=needs.order,
            )
        job.count_points(result)
        return result.curves

    def _as_saved(self, levels: int) -> tuple[PruneSettings, str]:
        """Settings that measure as the file was measured (its grid, metric and refit), and
        the metric to measure with: the run's resolved one when the names agree (a file
        measured with other output kinds or mask order has another key and is refused)."""
        saved, settings = self.saved, self.settings
        refit = saved.settings.get("refit")
        as_saved = replace(
            settings,
            levels=levels,
            metric=str(saved.settings.get("metric", settings.metric)),
            refit_curves=isinstance(refit, dict),
            refit_solver=str(refit.get("solver", "auto")) if isinstance(refit, dict) else "auto",
        )
        metric = self.job.metric if as_saved.metric == settings.metric else as_saved.metric
        return as_saved, metric
