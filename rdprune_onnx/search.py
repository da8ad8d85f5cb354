"""Prune to a quality target instead of a ratio: ``--max-drop`` and ``--max-distortion``.

``max_drop``: the highest ratio whose held-out metric stays within ``max_drop`` of the dense
model's, found by bisection over ratios (:func:`bisect_ratio`); every probe prunes in memory
from curves measured once (:class:`~rdprune_onnx.probe.Prober`), and only the chosen model is
written.

``max_distortion``: the measured calibration distortion must stay at or below ``X``. With rd,
the dual DP (:func:`rdprune_onnx.allocate.dual.allocate_within`) gives the largest ratio whose
*predicted* distortion is within ``X``; that ratio is pruned (rd allocation at that ratio,
which predicts no more than the dual's choice) and *measured*; if the measurement exceeds
``X`` the search steps back by bisection below it. Other methods bisect on the measured
distortion directly. No held-out data needed.

Which ratio bisection returns: the highest ratio whose probe passed among the probes made,
on a grid ``low, low + resolution, ..., high``. With a monotone quality this is the boundary
to within ``resolution``; with a non-monotone one it is still a passing ratio (never one whose
probe failed), and the next grid ratio above it failed, but a higher ratio that was never
probed might pass too.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rdprune_onnx.allocate.dual import allocate_within
from rdprune_onnx.compact import compact_weights
from rdprune_onnx.errors import InfeasibleError, UserError
from rdprune_onnx.graph.layers import read_weight
from rdprune_onnx.graph.load import save_model
from rdprune_onnx.pipeline import (
    CalibrationSpec,
    PruneResult,
    PruneSettings,
    _check_outputs,
    _check_storage,
    _layer_specs,
    default_output,
)
from rdprune_onnx.probe import Probed, Prober, with_ratio
from rdprune_onnx.quality import QualityMetric, metric_name
from rdprune_onnx.report import write_json
from rdprune_onnx.weights import ModelWeights

log = logging.getLogger(__name__)

# A probe passes when its value is within the limit up to this relative slack (float noise).
_REL_TOL = 1e-9


@dataclass
class QualityTarget:
    """What ``prune`` aims for instead of a ratio (exactly one of the two limits).

    ``max_drop``: largest allowed ``dense - pruned`` of ``metric`` on the held-out data
    (``metric``: ``accuracy`` | ``agreement`` | ``cosine`` or a callable on dense and pruned
    outputs, see :mod:`rdprune_onnx.quality`; default: accuracy with labels, else agreement,
    else cosine). ``max_distortion``: largest allowed measured calibration distortion (in the
    units of ``PruneSettings.metric``). Ratios are searched in ``[low, high]`` on a grid of
    step ``resolution``.
    """

    max_drop: float | None = None
    max_distortion: float | None = None
    metric: QualityMetric | None = None
    low: float = 0.05
    high: float = 0.99
    resolution: float = 0.01

    def check(self) -> None:
        if (self.max_drop is None) == (self.max_distortion is None):
            raise UserError(
                "give one quality target: --max-drop or --max-distortion"
                + (", not both" if self.max_drop is not None else ""),
                "--max-drop limits the held-out metric, --max-distortion the calibration one",
            )
        for label, value in (
            ("--max-drop", self.max_drop),
            ("--max-distortion", self.max_distortion),
        ):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UserError(f"{label} must be a non-negative number, got {value}", "e.g. 0.01")
        if not 0.0 < self.low <= self.high < 1.0:
            raise UserError(
                f"the search range {self.low:g}:{self.high:g} must satisfy 0 < low <= high < 1",
                "e.g. --search-range 0.05:0.99",
            )
        if not 0.0 < self.resolution <= 0.5:
            raise UserError(
                f"--resolution must be in (0, 0.5], got {self.resolution}", "e.g. --resolution 0.01"
            )
        if self.max_distortion is not None and self.metric is not None:
            raise UserError(
                "--quality-metric applies to --max-drop", "drop --quality-metric, or use --max-drop"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_drop": self.max_drop,
            "max_distortion": self.max_distortion,
            "metric": None if self.metric is None else metric_name(self.metric),
            "low": self.low,
            "high": self.high,
            "resolution": self.resolution,
        }


@dataclass
class Probe:
    """One ratio tried by the search, and whether it met the target."""

    ratio: float
    passed: bool
    value: float | None  # the criterion: the metric's drop, or the measured distortion
    limit: float
    achieved_ratio: float | None = None
    dense_metric: float | None = None
    pruned_metric: float | None = None
    predicted: float | None = None
    measured: float | None = None
    seconds: float = 0.0
    error: str | None = None  # the ratio could not be pruned (e.g. infeasible bounds)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Search:
    """The probes of a bisection, in the order made; ``best`` passed, ``failed_above`` not."""

    probes: list[Probe] = field(default_factory=list)
    best: Probe | None = None
    failed_above: Probe | None = None


def ratio_grid(low: float, high: float, resolution: float) -> list[float]:
    """``low, low + resolution, ...`` up to ``high`` (always the last point), rounded."""
    steps = math.floor((high - low) / resolution + 1e-9)
    points = [round(low + i * resolution, 10) for i in range(steps + 1)]
    points = [p for p in points if p < high - 1e-9 * resolution]
    return [*points, round(high, 10)]


def bisect_ratio(
    check: Callable[[float], Probe],
    low: float,
    high: float,
    resolution: float,
    *,
    known: Mapping[float, Probe] | None = None,
) -> Search:
    """The highest passing ratio on the grid, by bisection; never a ratio whose probe failed.

    Probes ``low`` (none passes if it fails), then ``high`` (the answer if it passes), then
    halves the grid interval between the highest passing and the lowest failing probe above
    it. ``known`` holds probes already made (by ratio), which are not repeated.
    """
    points = ratio_grid(low, high, resolution)
    search = Search()
    memo: dict[int, Probe] = {}
    known = dict(known or {})

    def at(i: int) -> Probe:
        if i not in memo:
            probe = known.get(points[i])
            if probe is None:
                probe = check(points[i])
                search.probes.append(probe)
                log.info(
                    "probe %.4g: %s (%s)",
                    probe.ratio,
                    "pass" if probe.passed else "fail",
                    probe.value,
                )
            memo[i] = probe
        return memo[i]

    if not at(0).passed:
        search.failed_above = memo[0]
        return search
    last = len(points) - 1
    if last == 0 or at(last).passed:
        search.best = memo[last]
        return search
    good, bad = 0, last
    while bad - good > 1:
        mid = (good + bad) // 2
        if at(mid).passed:
            good = mid
        else:
            bad = mid
    search.best, search.failed_above = memo[good], memo[bad]
    return search


def _within(value: float | None, limit: float) -> bool:
    return (
        value is not None and math.isfinite(value) and value <= limit + _REL_TOL * max(1.0, limit)
    )


def _probe_of(ratio: float, limit: float, probed: Probed, value: float | None) -> Probe:
    result = probed.result
    return Probe(
        ratio=ratio,
        passed=_within(value, limit),
        value=value,
        limit=limit,
        achieved_ratio=result.achieved_ratio,
        dense_metric=None if probed.quality is None else probed.quality.dense,
        pruned_metric=None if probed.quality is None else probed.quality.pruned,
        predicted=result.predicted_distortion,
        measured=result.measured_distortion,
        seconds=probed.seconds,
    )


def prune_to_target(
    model_path: str | os.PathLike[str],
    settings: PruneSettings,
    calibration: CalibrationSpec,
    target: QualityTarget,
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
) -> PruneResult:
    """Prune ``model_path`` to the highest ratio that meets ``target``; write only that model.

    ``settings.ratio`` is ignored (the search chooses it). The result's ``search`` lists every
    probe; its ``evaluation`` is the chosen model's on ``eval_data``.
    """
    target.check()
    settings = with_ratio(settings, target.low)
    settings.check()
    _check_storage(storage)
    if target.max_drop is not None and eval_data is None:
        raise UserError(
            "--max-drop needs held-out data to measure the drop on",
            "pass --eval-data FILE.npz (and --labels KEY for accuracy)",
        )
    out_path = Path(output) if output is not None else default_output(model_path)
    _check_outputs(model_path, [out_path] if write else [], report, force)
    for given in (eval_data, calibration.data):
        if given is not None and write and Path(given).resolve() == out_path.resolve():
            raise UserError("refusing to overwrite an input file", "choose another -o")
    prober = Prober(
        model_path,
        settings,
        calibration,
        eval_data=eval_data,
        labels=labels,
        metric=target.metric,
        need_curves=settings.method == "rd",
        cache_dir=cache_dir,
        progress=progress,
    )
    with tqdm(desc="search", unit="probe", disable=not progress, leave=False, delay=0.5) as bar:
        kept = _Kept(bar)
        if target.max_drop is not None:
            search, extra = _search_drop(prober, settings, target, target.max_drop, kept)
        else:
            assert target.max_distortion is not None
            search, extra = _search_distortion(
                prober, settings, target, target.max_distortion, kept
            )
    dense = prober.dense_quality()
    criterion = "max_drop" if target.max_drop is not None else "max_distortion"
    limit = target.max_drop if target.max_drop is not None else target.max_distortion
    what = (
        f"the {metric_name(prober.metric)} drop"
        if target.max_drop is not None and prober.metric is not None
        else "the measured distortion"
    )
    if search.best is None:
        first = search.failed_above
        detail = ""
        if first is not None:
            detail = (
                f": ratio {first.ratio:g} could not be pruned ({first.error})"
                if first.error
                else f": ratio {first.ratio:g} already gives {first.value:.4g}"
            )
        raise UserError(
            f"no ratio in {target.low:g}..{target.high:g} keeps {what} within {limit:g}{detail}",
            f"raise the {criterion.replace('_', '-')} limit or lower the search range",
        )
    chosen = search.best
    log.info("chosen ratio %.4g (%s %.4g)", chosen.ratio, criterion, chosen.value)
    probed = kept.at(chosen.ratio)
    if probed is not None and probed.result.model is not None:
        # The chosen probe's model is in memory: write it (the bytes prune --ratio writes).
        result = probed.result
        if write:
            t = time.perf_counter()
            _write(prober, result, out_path, force=force, storage=storage)
            result.timings["write"] = time.perf_counter() - t
    else:  # a lazy model (weights on disk): prune the chosen ratio again, writing it
        result = prober.prune(
            with_ratio(settings, chosen.ratio),
            output=out_path if write else None,
            force=force,
            storage=storage,
        ).result
    result.search = {
        "criterion": criterion,
        "limit": limit,
        "metric": metric_name(prober.metric) if prober.metric is not None else None,
        "dense_metric": None if dense is None else dense.pruned,
        "eval_samples": prober.eval_samples,
        "target": target.to_dict(),
        "chosen_ratio": chosen.ratio,
        "chosen_value": chosen.value,
        "next_failing_ratio": None if search.failed_above is None else search.failed_above.ratio,
        "next_failing_value": None if search.failed_above is None else search.failed_above.value,
        "rule": "the highest ratio whose probe passed, among the probes made (bisection on "
        f"a grid of step {target.resolution:g}); the next grid ratio above it failed",
        "probes": [p.to_dict() for p in search.probes],
        "probe_s_mean": float(np.mean([p.seconds for p in search.probes])),
        "once_s": prober.timings,
        **extra,
    }
    if report is not None:
        try:
            write_json(result.to_dict(), report, force=force)
        except BaseException:
            # All or nothing, as in prune: no model without its report.
            if result.output is not None:
                Path(result.output).unlink(missing_ok=True)
            raise
    return result


class _Kept:
    """The probe of the highest passing ratio so far (its pruned model stays in memory);
    every probe made ticks the progress bar."""

    def __init__(self, bar: tqdm | None = None) -> None:
        self.ratio: float | None = None
        self.probed: Probed | None = None
        self.bar = bar

    def offer(self, probe: Probe, probed: Probed) -> Probe:
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix_str(f"{probe.ratio:g} {'pass' if probe.passed else 'fail'}")
        if probe.passed and (self.ratio is None or probe.ratio > self.ratio):
            self.ratio, self.probed = probe.ratio, probed
        return probe

    def at(self, ratio: float) -> Probed | None:
        return self.probed if self.ratio == ratio else None


def _write(prober: Prober, result: PruneResult, output: Path, *, force: bool, storage: str) -> None:
    """Write a probe's in-memory model as ``prune`` writes it."""
    job = prober.job
    assert result.model is not None
    to_write = result.model
    if storage == "compact":
        to_write = compact_weights(result.model, [layer.name for layer in job.layers])
    save_model(
        to_write, output, external_data=job.had_external or None, force=force, protect=(job.path,)
    )
    result.output = str(output)


def _search_drop(
    prober: Prober, settings: PruneSettings, target: QualityTarget, limit: float, kept: _Kept
) -> tuple[Search, dict[str, Any]]:
    def check(ratio: float) -> Probe:
        try:
            probed = prober.prune(with_ratio(settings, ratio))
        except InfeasibleError as exc:
            return Probe(ratio=ratio, passed=False, value=None, limit=limit, error=str(exc))
        assert probed.quality is not None
        return kept.offer(_probe_of(ratio, limit, probed, probed.quality.drop), probed)

    return bisect_ratio(check, target.low, target.high, target.resolution), {}


def _search_distortion(
    prober: Prober, settings: PruneSettings, target: QualityTarget, limit: float, kept: _Kept
) -> tuple[Search, dict[str, Any]]:
    job = prober.job
    if job.reference is None:
        raise UserError(
            "--max-distortion measures the calibration distortion",
            "pass --data FILE.npz or --synthetic N",
        )

    def check(ratio: float) -> Probe:
        try:
            probed = prober.prune(with_ratio(settings, ratio))
        except InfeasibleError as exc:
            return Probe(ratio=ratio, passed=False, value=None, limit=limit, error=str(exc))
        return kept.offer(
            _probe_of(ratio, limit, probed, probed.result.measured_distortion), probed
        )

    if settings.method != "rd":
        return bisect_ratio(check, target.low, target.high, target.resolution), {}
    assert prober.curves is not None
    names = [layer.name for layer in job.layers]
    weights = (
        ModelWeights(job.model, names)
        if job.lazy
        else {name: read_weight(job.model, name) for name in names}
    )
    specs = _layer_specs(job, settings, weights)
    dual = allocate_within(
        specs, prober.curves, limit, allow_layer_removal=settings.allow_layer_removal
    )
    top = float(dual.info["achieved_ratio"])  # type: ignore[arg-type]
    extra: dict[str, Any] = {
        "dual": {
            "ratio": top,
            "predicted": dual.info["objective"],
            "exact": dual.info["exact"],
            "ratios": {s.name: dual.counts[s.name] / s.size for s in specs},
        }
    }
    if top <= 0.0:
        raise UserError(
            f"no pruning keeps the predicted distortion within {limit:g}",
            "raise --max-distortion",
        )
    top = round(min(top, target.high), 10)
    first = check(top)
    search = Search(probes=[first])
    if first.passed:
        search.best = first
        return search, extra
    # The measurement exceeds the prediction: step back below the dual's ratio, by
    # resolution, 2x, 4x ... until a probe passes, then bisect between it and the last failure.
    return _step_back(check, first, target.low, target.resolution), extra


def _step_back(check: Callable[[float], Probe], failed: Probe, low: float, step: float) -> Search:
    search = Search(probes=[failed])
    above = failed
    distance = step
    while above.ratio > low + 1e-12:
        ratio = round(max(low, failed.ratio - distance), 10)
        probe = check(ratio)
        search.probes.append(probe)
        if probe.passed:
            inner = bisect_ratio(
                check, ratio, above.ratio, step, known={ratio: probe, above.ratio: above}
            )
            search.probes += inner.probes
            search.best, search.failed_above = inner.best, inner.failed_above
            return search
        above = probe
        distance *= 2
    search.failed_above = above
    return search


__all__ = ["Probe", "QualityTarget", "Search", "bisect_ratio", "prune_to_target", "ratio_grid"]
