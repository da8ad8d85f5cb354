"""A picture of a sweep: held-out metric against ratio per method, and the distortions.

Top panel: the pruned model's held-out metric against the target ratio, one line per method,
the dense model as a dashed reference line. Bottom panel (log scale): the measured
calibration distortion (solid) and the predicted one, the sum of single-layer distortions read
off the curves (dashed), in the same colour per method. matplotlib is optional
(``pip install 'rdprune-onnx[plot]'``); the figure is drawn on the Agg canvas without pyplot.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rdprune_onnx import files
from rdprune_onnx.errors import UserError
from rdprune_onnx.plot import matplotlib_canvas, write_figure

FIGSIZE = (9.0, 8.0)
DPI = 110
_FORMATS = ("png", "svg", "pdf")
# One fixed colour per method, so that pictures of different sweeps compare.
COLOURS = {
    "rd": "tab:blue",
    "lamp": "tab:orange",
    "global": "tab:green",
    "uniform": "tab:red",
    "uniform-plus": "tab:purple",
    "erk": "tab:brown",
}


def check_plot_format(path: str | os.PathLike[str]) -> None:
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise UserError(
            f"cannot tell the image format of {str(path)!r}",
            f"end the name with one of .{', .'.join(_FORMATS)} (e.g. .png)",
        )


def plot_sweep(
    result: Any,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    protect: Sequence[files.Identity] = (),
) -> Path:
    """Draw a :class:`~rdprune_onnx.sweep.SweepResult` (or its ``to_dict()``) to ``path``
    (written through :func:`rdprune_onnx.files.write_file`, never over ``protect``)."""
    raw: dict[str, Any] = result if isinstance(result, dict) else result.to_dict()
    out = Path(path)
    check_plot_format(out)
    if not out.parent.is_dir():
        raise UserError(f"plot folder {str(out.parent)!r} does not exist", "create it first")
    files.check_existing(out, "plot", force=force, force_hint=files.FORCE_HINT)
    figure_cls, canvas_cls = matplotlib_canvas()
    fig = figure_cls(figsize=FIGSIZE, dpi=DPI)
    canvas = canvas_cls(fig)
    ax_q, ax_d = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    _draw_methods(ax_q, ax_d, raw)
    _metric_axes(ax_q, raw)
    _distortion_axes(ax_d, raw)
    fig.tight_layout()
    fmt = out.suffix.lower().lstrip(".")
    write_figure(canvas, out, fmt, DPI, force=force, protect=protect)
    return out


def _draw_methods(ax_q: Any, ax_d: Any, raw: Mapping[str, Any]) -> None:
    """One line per method: its held-out metric (top), its measured and predicted
    distortions (bottom, positive values only), failed points left out."""
    methods = list(raw["settings"].get("methods") or [])
    points = [p for p in raw["points"] if p.get("error") is None]
    for method in methods:
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["ratio"])
        if not mine:
            continue
        colour = COLOURS.get(method)
        xs = [p["ratio"] for p in mine]
        ax_q.plot(xs, [p["metric"] for p in mine], "o-", color=colour, label=method, ms=4)
        measured = [(p["ratio"], p["measured"]) for p in mine if _positive(p.get("measured"))]
        predicted = [(p["ratio"], p["predicted"]) for p in mine if _positive(p.get("predicted"))]
        if measured:
            ax_d.plot(*zip(*measured, strict=True), "o-", color=colour, ms=3, label=method)
        if predicted:
            ax_d.plot(*zip(*predicted, strict=True), "--", color=colour, lw=1.2)


def _metric_axes(ax: Any, raw: Mapping[str, Any]) -> None:
    """The top panel's dense reference line, labels, legend and title."""
    metric = str(raw["metric"])
    dense = float(raw["dense_metric"])
    ax.axhline(dense, color="black", ls="--", lw=1.0, label=f"dense ({dense:.4g})")
    ax.set_ylabel(f"held-out {metric} (pruned model)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    name = Path(str(raw["model"])).name
    ax.set_title(
        f"{name}: {metric} on {raw['eval_samples']} held-out samples vs pruning ratio",
        fontsize=11,
    )


def _distortion_axes(ax: Any, raw: Mapping[str, Any]) -> None:
    """The bottom panel's log scale, labels and the key of its line styles."""
    from matplotlib.lines import Line2D

    ax.set_yscale("log")
    ax.set_ylabel(f"calibration distortion ({raw['distortion_metric']})")
    ax.set_xlabel("target pruning ratio (fraction of prunable weights zeroed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(
        handles=[
            Line2D([], [], color="grey", marker="o", ms=3, label="measured"),
            Line2D([], [], color="grey", ls="--", label="predicted (sum of layer curves)"),
        ],
        loc="upper left",
        fontsize=9,
    )


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


__all__ = ["check_plot_format", "plot_sweep"]
