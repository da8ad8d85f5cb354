"""Prune one model many times, in memory: the engine of ``sweep`` and of quality targets.

A :class:`Prober` loads the model and its data once, measures the rate-distortion curves
once (through the same cache as ``prune``), and runs the dense model once on the held-out
data. Each :meth:`Prober.prune` is then one *probe*: the pipeline's own allocate and mask
(and refit with ``reconstruct``), verification on the calibration data, and a score of the
pruned model's held-out outputs against the dense ones. Nothing is written unless an output
is given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import onnx

from rdprune_onnx.allocate import Curve
from rdprune_onnx.calibration import sample_count
from rdprune_onnx.curve_source import CurveNeeds, measure_dense
from rdprune_onnx.curves import Reference
from rdprune_onnx.errors import UserError
from rdprune_onnx.evaluate import run_all
from rdprune_onnx.job import load_eval, load_job, require_calibration, staging_folder
from rdprune_onnx.quality import Outputs, Quality, QualityMetric, choose_metric, score
from rdprune_onnx.result import PruneResult
from rdprune_onnx.runtime import Session
from rdprune_onnx.settings import CalibrationSpec, EvalSpec, OutputSpec, PruneSettings
from rdprune_onnx.stages import (
    Pruned,
    allocate_and_mask,
    build_pruned,
    refit_layers,
    run_dense,
    summarize,
    verify,
    write_pruned,
)

log = logging.getLogger(__name__)


@dataclass
class Probed:
    """One probe: the prune result (with its evaluation) and the quality, if scored."""

    result: PruneResult
    quality: Quality | None
    seconds: float


class Prober:
    """A model, its data and its curves, loaded once; :meth:`prune` probes one setting."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        settings: PruneSettings,
        calibration: CalibrationSpec | None,
        *,
        evaluation: EvalSpec | None = None,
        metric: QualityMetric | None = None,
        need_curves: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: bool = False,
    ) -> None:
        if settings.steps > 1:
            raise UserError(
                "--steps re-measures curves for one ratio; it cannot be combined with a sweep "
                "or a quality target",
                "drop --steps",
            )
        require_calibration(calibration, need_curves)
        self.settings = settings
        self.job = load_job(model_path, settings, calibration)
        job = self.job
        # Costs paid once (load, reference run, curves, dense held-out run), not per probe.
        self.timings: dict[str, float] = dict(job.timings)
        self.eval_arrays, self.labels = load_eval(job.model, evaluation or EvalSpec())
        self.curves: dict[str, Curve] | None = None
        if need_curves:
            assert job.reference is not None and job.data is not None
            t = time.perf_counter()
            # Every level of the grid: probes ask for many ratios (a sweep, a bisection).
            entry, result = measure_dense(
                job,
                dataclasses.replace(settings, grid="full"),
                [settings.ratio],
                cache_dir,
                progress,
                timings=self.timings,
            )
            self.curve_key = entry.key
            self.curves = result.curves
            self.timings["curves"] = time.perf_counter() - t
        self.dense_out: Outputs | None = None
        self.metric: QualityMetric | None = None
        if self.eval_arrays is not None:
            t = time.perf_counter()
            self.dense_out = run_dense(job, self.eval_arrays)
            self.timings["dense_eval"] = time.perf_counter() - t
            self.metric = choose_metric(metric, self.labels, self.dense_out)
        elif metric is not None:
            raise UserError("a quality metric needs held-out data", "pass --eval-data")

    @property
    def eval_samples(self) -> int:
        return sample_count(self.eval_arrays) if self.eval_arrays is not None else 0

    def dense_quality(self) -> Quality | None:
        if self.dense_out is None or self.metric is None:
            return None
        return score(self.metric, self.dense_out, self.dense_out, self.labels)[0]

    def _curves(
        self, model: onnx.ModelProto, reference: Reference | None, needs: CurveNeeds
    ) -> dict[str, Curve]:
        if self.curves is None:
            raise UserError("the rd method needs rate-distortion curves", "pass --data")
        return self.curves

    def prune(self, settings: PruneSettings, output: OutputSpec | None = None) -> Probed:
        """Allocate, mask (and refit), verify and score ``settings`` (its ratio and method);
        write the model only when ``output`` says so (no report)."""
        started = time.perf_counter()
        settings.check()
        out = output if output is not None else OutputSpec(write=False)
        job = self.job
        job.timings = {}
        masked = allocate_and_mask(job, settings, self._curves)
        # Every method's ratios are read off the curves: a predicted distortion for LAMP and
        # global too, beside rd's.
        masked = dataclasses.replace(masked, curves=self.curves)
        with staging_folder(job, out) as staging:
            refit = refit_layers(job, settings, masked)
            pruned = build_pruned(job, refit, staging)
            result = summarize(job, settings, masked, refit, pruned, verify(job, pruned), None)
            write_pruned(job, result, pruned.model, out, started)
            quality = self._score(result, pruned)
        seconds = time.perf_counter() - started
        result.timings["probe"] = seconds
        return Probed(result, quality, seconds)

    def _score(self, result: PruneResult, pruned: Pruned) -> Quality | None:
        """The quality of the pruned model on the held-out data (its evaluation goes into
        ``result``); None without held-out data."""
        if self.eval_arrays is None or self.dense_out is None:
            return None
        assert self.metric is not None
        t = time.perf_counter()
        session = Session(pruned.model, self.job.config, path=pruned.path)
        pruned_out = run_all(session, self.eval_arrays, self.job.batch_size)
        quality, result.evaluation = score(self.metric, self.dense_out, pruned_out, self.labels)
        result.timings["evaluate"] = time.perf_counter() - t
        return quality


def with_ratio(settings: PruneSettings, ratio: float, method: str | None = None) -> PruneSettings:
    return dataclasses.replace(
        settings, ratio=float(ratio), method=settings.method if method is None else method
    )
