"""The plot of scripts/benchmark_methods.py (``benchmark_methods.png``): task figure vs ratio per
method, the reconstruction panel, rd's predicted vs measured distortion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchlib.tables import labels_in_order

from .report import capped_rows, main_rows, refit_rows

PLOT_REFIT_DATA = {"minilm": "128x128 calib"}


def plot_refit(ax: Any, task: Mapping[str, Any], colours: Mapping[str, Any]) -> None:
    """Task figure vs ratio with the default (``auto``) refit (dashed) over the plain row of
    the same masks (solid, faint), onnxsim's SparseGPT and Wanda (dash-dot) and, where
    :data:`PLOT_REFIT_DATA` names one, the refit on more calibration data (dotted). Rows with
    a forced solver are in the tables only."""
    key = task["score"]
    data_tag = PLOT_REFIT_DATA.get(task["name"])

    def shown(r: Mapping[str, Any]) -> bool:
        if not r.get("reconstruct"):
            return True
        if r.get("solver") != "auto":
            return False
        if r.get("refit_calib_samples", task["calibration_samples"]) == task["calibration_samples"]:
            return True
        return data_tag is not None and r["label"].endswith(f"({data_tag})")

    rows = [r for r in refit_rows(task) if shown(r)]
    for label in labels_in_order(rows):
        pts = sorted((r["ratio"], r["scores"][key]) for r in rows if r["label"] == label)
        first = next(r for r in rows if r["label"] == label)
        base = first.get("base", label)
        colour = colours.get(base, "black")
        other_data = (
            first.get("refit_calib_samples", task["calibration_samples"])
            != task["calibration_samples"]
        )
        if first.get("reconstruct") and other_data:
            style = {"linestyle": ":", "linewidth": 2.2, "marker": "D", "markersize": 4}
        elif first.get("reconstruct"):
            style = {"linestyle": "--", "linewidth": 2.0, "marker": "o", "markersize": 5}
        elif first["family"] == "onnxsim":
            style = {"linestyle": "-.", "linewidth": 1.4, "marker": "^", "markersize": 5}
        else:
            style = {"linestyle": "-", "linewidth": 1.0, "marker": ".", "alpha": 0.35}
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            color=colour,
            label=label if first.get("reconstruct") or first["family"] == "onnxsim" else None,
            **style,
        )
    ax.axhline(task["dense"]["scores"][key], color="grey", linestyle=":", label="dense")
    ax.set_title(
        f"{task['name']}: --reconstruct, auto (dashed) vs the same masks plain (faint)"
        + (f"\ndotted: refit on {data_tag}" if data_tag else ""),
        fontsize=10,
    )
    ax.set_xlabel("sparsity (fraction of prunable weights zeroed)")
    ax.set_ylabel(task["score_label"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3)


FAMILY_STYLE: dict[str, dict[str, Any]] = {
    "diagnostic": {"linestyle": ":", "linewidth": 2.0, "marker": "D", "markersize": 4},
    "rd": {"linestyle": "-", "linewidth": 2.2, "marker": "o"},
    "baseline": {"linestyle": "-", "linewidth": 1.2, "marker": "s", "markersize": 4},
    "onnxsim": {"linestyle": "--", "linewidth": 1.2, "marker": "^", "markersize": 4},
}


def plot(record: Mapping[str, Any], path: Path) -> None:
    """Per task (one column): task figure vs ratio per method, the reconstruction panel (when
    there are refit rows), rd's predicted vs measured distortion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = record["tasks"]
    # One colour per line label, the same in every panel (20 distinct colours).
    palette = plt.get_cmap("tab20").colors
    colours: dict[str, Any] = {}
    for task in tasks:
        for label in labels_in_order(main_rows(task)):
            colours.setdefault(label, palette[(2 * len(colours)) % 20 + (len(colours) // 10) % 2])
    for task in tasks:
        for i, label in enumerate(labels_in_order(capped_rows(task))):
            colours.setdefault(label, ("black", "dimgrey")[i % 2])
    refit = any(r.get("reconstruct") for t in tasks for r in t["rows"])
    fig, axes = plt.subplots(
        3 if refit else 2,
        len(tasks),
        figsize=(7.5 * len(tasks), 19 if refit else 12),
        squeeze=False,
        gridspec_kw={"height_ratios": [1.5, 1.5, 1] if refit else [1.5, 1]},
    )
    for col, task in enumerate(tasks):
        plot_methods(axes[0][col], task, colours)
        if refit:
            plot_refit(axes[1][col], task, colours)
        plot_predicted(axes[-1][col], main_rows(task), colours)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_methods(ax: Any, task: Mapping[str, Any], colours: Mapping[str, Any]) -> None:
    """Task figure vs ratio, one line per method (and the capped diagnostics)."""
    key = task["score"]
    lines = main_rows(task) + capped_rows(task)  # the allocator diagnosis of docs/findings.md
    for label in labels_in_order(lines):
        pts = sorted(
            (r["ratio"], r["scores"][key], r["family"]) for r in lines if r["label"] == label
        )
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            label=label,
            color=colours[label],
            **FAMILY_STYLE[pts[0][2]],
        )
    ax.axhline(task["dense"]["scores"][key], color="grey", linestyle=":", label="dense")
    ax.set_title(task["title"], fontsize=10)
    ax.set_xlabel("sparsity (fraction of prunable weights zeroed)")
    ax.set_ylabel(task["score_label"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3)


def plot_predicted(ax: Any, rows: Sequence[Mapping[str, Any]], colours: Mapping[str, Any]) -> None:
    """rd's predicted (sum of curves, dashed) vs measured (solid) distortion, log scale."""
    rd_rows = [r for r in rows if r["method"] == "rd" and r["predicted"]]
    for label in labels_in_order(rd_rows):
        pts = sorted(
            (r["ratio"], r["predicted"], r["measured"]) for r in rd_rows if r["label"] == label
        )
        color = colours[label]
        x = [p[0] for p in pts]
        ax.plot(x, [p[1] for p in pts], color=color, linestyle="--", marker="x")
        ax.plot(x, [p[2] for p in pts], color=color, linestyle="-", marker="o", label=label)
    ax.set_yscale("log")
    ax.set_title(
        "rd: predicted (dashed, sum of curves) vs measured (solid) distortion", fontsize=10
    )
    ax.set_xlabel("sparsity")
    ax.set_ylabel("distortion on the calibration data (row's metric)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
