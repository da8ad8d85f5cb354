"""Console tables for results (the library never prints; this module does)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rdprune_onnx.cache import CurveFile
from rdprune_onnx.evaluate import Evaluation
from rdprune_onnx.inspect import ModelSummary
from rdprune_onnx.result import PruneResult


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if a == "r" else c.ljust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in cells[1:]]
    return "\n".join(lines)


def _shape(shape: Sequence[int] | None) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def show_summary(summary: ModelSummary) -> str:
    lines = [
        f"model: {summary.path}  ({summary.producer or 'unknown producer'})",
        "opsets: " + ", ".join(f"{k} {v}" for k, v in summary.opsets.items()),
        "inputs: " + "; ".join(i.describe() for i in summary.inputs),
        "outputs: " + ", ".join(summary.outputs),
        "",
    ]
    rows = [
        (
            r["layer"],
            r["op"],
            _shape(r["shape"]),
            r["params"] if r["params"] is not None else "-",
            f"{r['sparsity']:.1%}" if r["sparsity"] is not None else "-",
            "yes" if r["prunable"] else f"no: {r['reason']}",
        )
        for r in summary.rows()
    ]
    lines.append(
        table(["layer", "op", "weight shape", "params", "sparsity", "prunable"], rows, "lllrrl")
    )
    lines.append("")
    lines.append(
        f"{len(summary.scan.layers)} prunable layers, {summary.prunable_weights:,} weights; "
        f"{len(summary.scan.skipped)} skipped"
    )
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def show_prune(result: PruneResult) -> str:
    rows = [
        (r.name, "/".join(r.op_types), r.size, f"{r.ratio:.2%}", _num(r.predicted))
        for r in result.layers
    ]
    lines = [table(["layer", "op", "params", "ratio", "predicted"], rows, "llrrr"), ""]
    total = sum(r.size for r in result.layers)
    pruned = sum(r.pruned for r in result.layers)
    s = result.settings
    lines.append(
        f"method {s.method}, metric {s.metric}, {s.levels} levels, provider {result.provider}, "
        + (
            f"{result.samples} calibration samples"
            if result.samples
            else "no calibration data (saved curves; nothing measured)"
        )
    )
    if s.select_masks:
        lines.append(
            f"mask {s.mask} (chosen with the refit, {s.refit_inputs} Hessians; "
            f"curves of the {s.curve_mask} mask)"
        )
    elif s.mask != "magnitude":
        lines.append(f"mask {s.mask} ({s.mask_inputs} input statistics)")
    lines.append(
        f"pruned {pruned:,} of {total:,} prunable weights: {result.achieved_ratio:.4%} "
        f"(target {result.target_ratio:.4%})"
    )
    if s.budget == "flops":
        flops = result.allocation_info.get("achieved_budget_ratio")
        lines.append(f"multiply-accumulates removed: {flops:.4%}" if flops is not None else "")
    lines.append(
        f"distortion ({s.metric}): predicted {_num(result.predicted_distortion)}"
        + (" (masking alone)" if s.reconstruct and not s.refit_curves else "")
        + f", measured {_num(result.measured_distortion)}"
    )
    refits = [r.refit for r in result.layers if r.refit and r.refit["method"] != "skipped"]
    if refits:
        before = sum(r["error_before"] or 0.0 for r in refits)
        after = sum(r["error_after"] or 0.0 for r in refits)
        lines.append(
            f"reconstruct: {len(refits)} layers refit, summed layer output error "
            f"{_num(before)} -> {_num(after)}"
        )
    if result.evaluation is not None:
        lines += _show_evaluation(result.evaluation)
    points = result.curve_points
    if points:
        lines.append(
            f"curve points measured: {points['curve_points_measured']:,} of "
            f"{points['curve_points_full_grid']:,} ({points['grid']} grid)"
        )
    if result.skipped:
        lines.append(f"{len(result.skipped)} layers skipped (see `rdprune-onnx inspect`)")
    lines.append(f"time {result.timings['total']:.1f} s")
    if result.output:
        lines.append(f"wrote {result.output}")
    return "\n".join(lines)


def _show_evaluation(ev: Evaluation) -> list[str]:
    lines = []
    for out in ev.outputs:
        agree = "" if out.top1_agreement is None else f", top-1 agreement {out.top1_agreement:.2%}"
        lines.append(f"eval {out.name}: mse {out.mse:.4g}, cosine {out.cosine:.5f}{agree}")
    if ev.pruned_accuracy is not None and ev.dense_accuracy is not None:
        lines.append(
            f"accuracy on {ev.samples} samples: dense {ev.dense_accuracy:.2%}, "
            f"pruned {ev.pruned_accuracy:.2%}"
        )
    return lines


def show_curves(entry: CurveFile) -> str:
    rows = [
        (
            name,
            entry.layers[name],
            _num(float(np.interp(0.5, c.ratios, c.distortion))),
            _num(c.distortion[-1]),
            c.ratios.size,
        )
        for name, c in entry.curves.items()
    ]
    grid = entry.grid or {}
    measured = sum(c.ratios.size for c in entry.curves.values())
    levels = entry.settings.get("levels")
    summary = f"\n{len(entry.curves)} curves, {levels} levels"
    if grid.get("grid") == "adaptive":
        refined = ", ".join(f"{r:g}" for r in grid.get("refined_for") or [])
        summary += (
            f", {measured:,} of {len(entry.curves) * int(levels or 0):,} points measured "
            f"(adaptive grid, refined for ratios {refined})"
        )
    return table(["layer", "params", "d(0.5)", "d(1.0)", "points"], rows, "lrrrr") + (
        summary + (", each point pruned and refit" if "refit" in entry.settings else "")
        if entry.curves
        else ""
    )
