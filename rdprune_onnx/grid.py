"""The point scheduler: which curve points are measured, in rounds.

``--grid full`` measures every level of the ``--levels`` grid for every layer.
``--grid adaptive`` (the default) measures a coarse subset, then only the points the
allocation at the requested ratios can still move to
(:mod:`rdprune_onnx.allocate.refine` decides which; this module measures them with
:func:`rdprune_onnx.curves.measure_curves`, one call per round, each layer with its own
subset of levels). Points measured before (the cache, a curves file) are never measured
again, so a run killed in the middle of a round resumes with every layer it finished.
Plain masks, ``--refit-curves`` candidates and iterative ``--steps`` all go through here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from rdprune_onnx.allocate import Curve, LayerSpec
from rdprune_onnx.allocate.dp import IntArray
from rdprune_onnx.allocate.refine import MARGIN, Refinement, merge, refine
from rdprune_onnx.curves import LayerSessions, Reference, grid, measure_curves
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import Layer
from rdprune_onnx.graph.load import has_lazy

log = logging.getLogger(__name__)

GRIDS = ("adaptive", "full")


def check_grid(kind: str) -> None:
    if kind not in GRIDS:
        raise UserError(f"unknown grid {kind!r}", f"choose one of {', '.join(GRIDS)}")


@dataclass
class GridResult:
    """Curves holding their measured points only, and how they were scheduled."""

    curves: dict[str, Curve]
    kind: str
    levels: int
    targets: list[float]
    rounds: list[int]  # points measured in each round of this run (cached ones excluded)
    converged: bool
    seconds: float = 0.0
    measure_s: list[float] = field(default_factory=list)  # wall seconds of each round

    @property
    def measured(self) -> int:
        return int(sum(c.ratios.size for c in self.curves.values()))

    @property
    def full(self) -> int:
        return len(self.curves) * self.levels

    def summary(self) -> dict[str, Any]:
        """What the report and the curves file say about the points."""
        return {
            "grid": self.kind,
            "levels": self.levels,
            "curve_points_measured": self.measured,
            "curve_points_full_grid": self.full,
            "refined_for": self.targets if self.kind == "adaptive" else None,
            "rounds": self.rounds,
            "converged": self.converged,
            "seconds": self.seconds,
            "measure_s": self.measure_s,
            "interpolation": "linear between measured points, within one level of a choice",
        }


def measure_grid(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    reference: Reference,
    specs: Sequence[LayerSpec],
    *,
    levels: int,
    kind: str = "adaptive",
    targets: Sequence[float] = (),
    options: Mapping[str, object] | None = None,
    done: Mapping[str, Curve] | None = None,
    on_curve: Callable[[str, Curve], None] | None = None,
    progress: bool = False,
    margin: float = MARGIN,
    **measure_kwargs: Any,
) -> GridResult:
    """Measure the curves of ``layers`` on the ``kind`` grid (see the module text).

    ``specs`` are the allocation problem's layers (sizes, costs, bounds) the adaptive grid
    refines for, at every ratio in ``targets``. ``on_curve(name, curve)`` receives each
    layer's curve (all its points so far) after each layer of each round. Other keywords
    go to :func:`measure_curves` (metric, config, candidates, ...).
    """
    check_grid(kind)
    if kind == "adaptive" and not targets:
        raise ValueError("the adaptive grid needs the target ratios it refines for")
    fine = grid(levels)
    started = time.perf_counter()
    wanted = {layer.name for layer in layers}
    current: dict[str, Curve] = {n: c for n, c in (done or {}).items() if n in wanted}
    sessions = round_sessions(model) if kind == "adaptive" else None
    rounds = _Rounds(
        model, layers, reference, kind, fine, current, sessions, on_curve, progress, measure_kwargs
    )
    try:
        result = refine(
            specs,
            levels,
            list(targets),
            rounds.measure,
            done=current,
            full=kind == "full",
            options=options,
            margin=margin,
        )
    finally:
        if sessions is not None:
            sessions.close()
    return _grid_result(result, layers, kind, levels, targets, started, rounds.seconds)


def round_sessions(model: onnx.ModelProto) -> LayerSessions:
    """What the adaptive grid keeps from one round to the next: each layer's cut, session
    and sort, and the dense crossing tensors, within the curve engine's memory budget. A
    model whose weights stay on disk (lazy, a large model) keeps none of them: its sessions
    each hold a copy of their weights, and keeping them put a 2.25 GiB model's prune at 2.7x
    its size instead of 1.5x (tests/test_large.py); its rounds rebuild what they measure."""
    if has_lazy(model):
        return LayerSessions(max_bytes=0)
    return LayerSessions()


def _grid_result(
    result: Refinement,
    layers: Sequence[Layer],
    kind: str,
    levels: int,
    targets: Sequence[float],
    started: float,
    measure_s: list[float],
) -> GridResult:
    """The finished run's :class:`GridResult`, logged (with a warning if it did not settle)."""
    if not result.converged:
        log.warning(
            "the adaptive grid stopped after %d rounds without settling; "
            "the allocation may differ from the full grid's (try --grid full)",
            len(result.rounds),
        )
    out = GridResult(
        curves={layer.name: result.curves[layer.name] for layer in layers},
        kind=kind,
        levels=levels,
        targets=[float(t) for t in targets],
        rounds=result.rounds,
        converged=result.converged,
        seconds=time.perf_counter() - started,
        measure_s=measure_s,
    )
    log.info(
        "%s grid: %d of %d curve points measured (%d this run, rounds %s)",
        kind,
        out.measured,
        out.full,
        sum(out.rounds),
        out.rounds,
    )
    return out


@dataclass
class _Rounds:
    """Measures one round of points (the ``measure`` callback of :func:`refine`), merging
    each layer's new points into ``current`` (then ``on_curve``) and timing every round."""

    model: onnx.ModelProto
    layers: Sequence[Layer]
    reference: Reference
    kind: str
    fine: np.ndarray
    current: dict[str, Curve]
    sessions: LayerSessions | None
    on_curve: Callable[[str, Curve], None] | None
    progress: bool
    measure_kwargs: dict[str, Any]  # to measure_curves
    seconds: list[float] = field(default_factory=list)  # wall seconds of each round

    def save(self, name: str, curve: Curve) -> None:
        self.current[name] = merge(self.current.get(name), curve)
        if self.on_curve is not None:
            self.on_curve(name, self.current[name])

    def measure(self, points: Mapping[str, IntArray], number: int) -> Mapping[str, Curve]:
        planned = int(sum(p.size for p in points.values()))
        began = time.perf_counter()
        label = "curves" if self.kind == "full" else f"curves round {number}"
        log.info("%s: %d points planned over %d layers", label, planned, len(points))
        got = measure_curves(
            self.model,
            [layer for layer in self.layers if layer.name in points],
            self.reference,
            ratios=self.fine,
            layer_ratios={name: self.fine[index] for name, index in points.items()},
            progress=self.progress,
            on_curve=self.save,
            desc=label,
            sessions=self.sessions,
            **self.measure_kwargs,
        )
        self.seconds.append(time.perf_counter() - began)
        return got


def on_grid(curves: Mapping[str, Curve], levels: int) -> bool:
    """Whether every curve's ratios lie on the ``levels`` grid."""
    fine = grid(levels)
    for curve in curves.values():
        position = np.asarray(curve.ratios) * (levels - 1)
        if np.any(np.abs(position - np.rint(position)) > 1e-6) or curve.ratios.size > fine.size:
            return False
    return True


__all__ = ["GRIDS", "GridResult", "check_grid", "measure_grid", "on_grid"]
