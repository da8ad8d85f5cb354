"""The whole trade-off in one run: held-out quality against ratio, for several methods.

:func:`sweep` measures the curves once (cached like ``prune``'s), then for every method and
ratio allocates, masks (and refits with ``reconstruct``), verifies on the calibration data and
scores the held-out data, all in memory (:class:`~rdprune_onnx.probe.Prober`). Each finished
point is saved at once in the cache folder (``sweeps/KEY.json``, keyed by the model, the data
and every setting), so a killed sweep resumes without evaluating the points it finished.
The result can be written as JSON and drawn (:func:`rdprune_onnx.sweep_plot.plot_sweep`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from rdprune_onnx.allocate import METHODS
from rdprune_onnx.cache import data_fingerprint, model_fingerprint
from rdprune_onnx.errors import InfeasibleError, UserError
from rdprune_onnx.files import RunFiles
from rdprune_onnx.job import require_calibration
from rdprune_onnx.probe import Prober, with_ratio
from rdprune_onnx.quality import QualityMetric, metric_name
from rdprune_onnx.report import write_json
from rdprune_onnx.runtime import versions
from rdprune_onnx.settings import CalibrationSpec, EvalSpec, PruneSettings, resolve_eval

if TYPE_CHECKING:
    from typing import Unpack

    from rdprune_onnx.settings import EvalOptions

log = logging.getLogger(__name__)

FORMAT = "rdprune-onnx-sweep/1"
POINTS_FORMAT = "rdprune-onnx-sweep-points/1"


@dataclass
class SweepPoint:
    """One (method, ratio) of a sweep."""

    method: str
    ratio: float
    achieved_ratio: float | None = None
    metric: float | None = None  # the pruned model's held-out metric
    drop: float | None = None  # dense - pruned
    predicted: float | None = None  # summed single-layer distortions (from the curves)
    measured: float | None = None  # calibration distortion of the pruned model
    seconds: float = 0.0
    cached: bool = False  # read from the point cache (not evaluated in this run)
    error: str | None = None  # the ratio could not be pruned (e.g. infeasible bounds)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SweepPoint:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


@dataclass
class SweepResult:
    model: str
    metric: str
    dense_metric: float
    eval_samples: int
    distortion_metric: str
    settings: dict[str, Any]
    points: list[SweepPoint]
    timings: dict[str, float] = field(default_factory=dict)
    output: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "metric": self.metric,
            "dense_metric": self.dense_metric,
            "eval_samples": self.eval_samples,
            "distortion_metric": self.distortion_metric,
            "settings": self.settings,
            "points": [p.to_dict() for p in self.points],
            "timings_s": self.timings,
            "versions": versions() | {"python": platform.python_version()},
        }


def parse_ratio_grid(text: str) -> list[float]:
    """``0.3:0.95:0.05`` (start:stop:step, stop included) or a comma list ``0.5,0.7,0.9``."""
    text = text.strip()
    hint = "e.g. --ratios 0.3:0.95:0.05 or --ratios 0.5,0.7,0.9"
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise UserError(f"cannot read --ratios {text!r}: give start:stop:step", hint)
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise UserError(f"--ratios {text!r}: need step > 0 and start <= stop", hint)
            count = math.floor((stop - start) / step + 1e-9)
            values = [round(start + i * step, 10) for i in range(count + 1)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"cannot read --ratios {text!r}", hint) from None
    if not values:
        raise UserError("--ratios is empty", hint)
    bad = [v for v in values if not 0.0 < v < 1.0]
    if bad:
        raise UserError(f"--ratios: {bad[0]:g} is not strictly between 0 and 1", hint)
    return sorted(set(values))


def parse_methods(text: str | Sequence[str]) -> list[str]:
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    names = [m for m in names if m]
    if not names:
        raise UserError("no method given", f"e.g. --method rd,lamp,global ({', '.join(METHODS)})")
    for name in names:
        if name not in METHODS:
            raise UserError(f"unknown method {name!r}", f"choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


class _PointCache:
    """The finished points of one sweep identity, saved after every point."""

    def __init__(self, folder: Path | None, identity: dict[str, Any]) -> None:
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
        self.path = None if folder is None else folder / "sweeps" / f"{key}.json"
        self.identity = identity
        self.points: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                if raw.get("format") == POINTS_FORMAT and raw.get("identity") == identity:
                    self.points = dict(raw["points"])
                    log.info("resuming a sweep: %d points done (%s)", len(self.points), self.path)
            except (ValueError, KeyError, TypeError, OSError) as exc:
                log.warning("ignoring unreadable sweep cache %s: %s", self.path, exc)

    @staticmethod
    def key(method: str, ratio: float) -> str:
        return f"{method}@{ratio:.10g}"

    def get(self, method: str, ratio: float) -> SweepPoint | None:
        raw = self.points.get(self.key(method, ratio))
        if raw is None:
            return None
        point = SweepPoint.from_dict(raw)
        point.cached = True
        return point

    def put(self, point: SweepPoint) -> None:
        self.points[self.key(point.method, point.ratio)] = point.to_dict() | {"cached": False}
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            body = {"format": POINTS_FORMAT, "identity": self.identity, "points": self.points}
            write_json(body, self.path, force=True)
        except (OSError, UserError) as exc:
            log.warning("could not write the sweep cache %s: %s", self.path, exc)


def sweep(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    calibration: CalibrationSpec,
    *,
    evaluation: EvalSpec | None = None,
    ratios: Sequence[float],
    methods: Sequence[str] = ("rd",),
    metric: QualityMetric | None = None,
    output: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    force: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    on_point: Callable[[SweepPoint], None] | None = None,
    **options: Unpack[EvalOptions],
) -> SweepResult:
    """Prune ``model_path`` at every ratio with every method and score each on the held-out
    data of ``evaluation`` (or the flat keywords ``eval_data`` and ``labels``).

    ``settings`` gives everything but the ratio and the method (bounds, exclusions,
    ``reconstruct``, the curves' metric and levels). ``metric`` is a quality metric name or a
    callable (see :mod:`rdprune_onnx.quality`). Writes the result as JSON to ``output`` and a
    picture to ``plot`` (never replacing a file without ``force``, nor an input). Finished
    points are cached in ``cache_dir`` (none with a callable metric, which cannot be
    fingerprinted); ``on_point`` is called after each point, cached or evaluated.
    """
    # About 80 lines with its 13 parameters and docstring; the body reads as the sweep:
    # check, load once, run every point, write (the steps are the helpers below).
    started = time.perf_counter()
    evaluation = resolve_eval(evaluation, options)
    methods = parse_methods(methods)
    grid = sorted({float(r) for r in ratios})
    files = _check_sweep(
        model_path, settings, calibration, evaluation, methods, grid, output, plot, force
    )
    prober = Prober(
        model_path,
        with_ratio(settings, grid[0], methods[0]),
        calibration,
        evaluation=evaluation,
        metric=metric,
        need_curves="rd" in methods,
        cache_dir=cache_dir,
        progress=progress,
    )
    dense = prober.dense_quality()
    assert prober.metric is not None and dense is not None
    common = {k: v for k, v in settings.to_dict().items() if k not in ("ratio", "method", "steps")}
    folder = None if cache_dir is None or callable(prober.metric) else Path(cache_dir)
    cache = _PointCache(folder, _identity(prober, common))
    points, evaluated = _points(
        prober, settings, cache, [(m, r) for m in methods for r in grid], progress, on_point
    )
    result = SweepResult(
        model=str(model_path),
        metric=metric_name(prober.metric),
        dense_metric=dense.dense,
        eval_samples=prober.eval_samples,
        distortion_metric=settings.metric,
        settings=common
        | {
            "methods": methods,
            "ratios": grid,
            "labels": evaluation.labels,
            "cache": str(cache.path),
        },
        points=points,
        timings={
            **prober.timings,
            "points": evaluated,
            "total": time.perf_counter() - started,
        },
    )
    if output is not None:
        write_json(result.to_dict(), output, force=force, protect=files.protected())
        result.output = str(output)
    if plot is not None:
        from rdprune_onnx.sweep_plot import plot_sweep

        plot_sweep(result, plot, force=force, protect=files.protected())
    return result


def _check_sweep(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    calibration: CalibrationSpec,
    evaluation: EvalSpec,
    methods: Sequence[str],
    grid: Sequence[float],
    output: str | os.PathLike[str] | None,
    plot: str | os.PathLike[str] | None,
    force: bool,
) -> RunFiles:
    """Every check before the sweep's work: data, ratios, settings of each method, and the
    output targets (never an input, never an existing file without ``force``)."""
    if evaluation.data is None:
        raise UserError("a sweep scores held-out data", "pass --eval-data FILE.npz")
    if not grid:
        raise UserError("no ratio to sweep", "e.g. --ratios 0.3:0.95:0.05")
    for method in methods:
        with_ratio(settings, grid[0], method).check()
    files = RunFiles(force=force)
    files.add_input(model_path, "input model")
    files.add_input(calibration.data, "calibration data")
    files.add_input(evaluation.data, "evaluation data")
    if output is not None:
        files.claim(output, "sweep file")
    if plot is not None:
        from rdprune_onnx.sweep_plot import check_plot_format

        check_plot_format(plot)
        files.claim(plot, "plot")
    require_calibration(calibration, "rd" in methods or settings.budget == "flops")
    return files


def _identity(prober: Prober, common: dict[str, Any]) -> dict[str, Any]:
    """What a sweep point depends on: model, data, labels, metric and settings."""
    job = prober.job
    assert prober.metric is not None and prober.eval_arrays is not None
    return {
        "model": model_fingerprint(job.model),
        "calibration": None if job.data is None else data_fingerprint(job.data),
        "batch_size": job.batch_size,
        "eval": data_fingerprint(prober.eval_arrays),
        "labels": None
        if prober.labels is None
        else hashlib.sha256(prober.labels.tobytes()).hexdigest(),
        "metric": metric_name(prober.metric),
        "settings": common,
        "provider": job.config.provider,
    }


def _points(
    prober: Prober,
    settings: PruneSettings,
    cache: _PointCache,
    jobs: Sequence[tuple[str, float]],
    progress: bool,
    on_point: Callable[[SweepPoint], None] | None,
) -> tuple[list[SweepPoint], float]:
    """Every (method, ratio): from the point cache, or evaluated and cached; with the
    seconds spent evaluating."""
    points: list[SweepPoint] = []
    evaluated = 0.0
    with tqdm(
        total=len(jobs), disable=not progress, unit="pt", desc="sweep", leave=False, delay=0.5
    ) as bar:
        for method, ratio in jobs:
            point = cache.get(method, ratio)
            if point is None:
                point = _evaluate(prober, settings, method, ratio)
                evaluated += point.seconds
                cache.put(point)
            points.append(point)
            bar.update()
            if on_point is not None:
                on_point(point)
    return points, evaluated


def _evaluate(prober: Prober, settings: PruneSettings, method: str, ratio: float) -> SweepPoint:
    t = time.perf_counter()
    try:
        probed = prober.prune(with_ratio(settings, ratio, method))
    except InfeasibleError as exc:
        log.warning("%s at %g: %s", method, ratio, exc)
        return SweepPoint(method, ratio, seconds=time.perf_counter() - t, error=str(exc))
    result, quality = probed.result, probed.quality
    assert quality is not None
    return SweepPoint(
        method=method,
        ratio=ratio,
        achieved_ratio=result.achieved_ratio,
        metric=quality.pruned,
        drop=quality.drop,
        predicted=result.predicted_distortion,
        measured=result.measured_distortion,
        seconds=probed.seconds,
    )


__all__ = ["SweepPoint", "SweepResult", "parse_methods", "parse_ratio_grid", "sweep"]
