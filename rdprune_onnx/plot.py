"""A picture of a prune result: the layers' rate-distortion curves and the chosen ratios.

:func:`plot_result` takes the JSON report that the pipeline writes (``PruneResult.to_dict()``,
or the same thing read back from a ``--report`` file). matplotlib is an optional dependency
(``pip install 'rdprune-onnx[plot]'``) and is imported only when a plot is drawn; the figure is
rendered with the Agg canvas, without touching pyplot or the global backend.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rdprune_onnx import files
from rdprune_onnx.errors import UserError

FIGSIZE = (12.0, 9.0)  # inches; with DPI this fixes the image size (1200 x 900 pixels)
DPI = 100
# Up to this many layers the curves get a legend and the bars get the layers' names.
NAMED_LAYERS = 12
# At most about this many tick labels on the bar chart's layer axis.
MAX_TICKS = 30


class _HasToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class _Layer:
    name: str
    size: int
    ratio: float
    curve: tuple[np.ndarray, np.ndarray] | None  # (ratios, distortion)


@dataclass
class _Report:
    layers: list[_Layer]
    target: float | None
    achieved: float | None
    method: str
    metric: str


def _bad(why: str) -> UserError:
    return UserError(
        f"not a prune report: {why}",
        "pass the JSON file written by `rdprune-onnx prune --report`",
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _parse(report: Mapping[str, Any]) -> _Report:
    if not isinstance(report, Mapping):
        raise _bad(f"expected a JSON object, got {type(report).__name__}")
    layers = report.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _bad("no 'layers' list")
    curves = report.get("curves") or {}
    if not isinstance(curves, Mapping):
        raise _bad("'curves' is not an object")
    parsed = []
    for index, entry in enumerate(layers):
        if not isinstance(entry, Mapping):
            raise _bad(f"layer {index} is not an object")
        name, size, ratio = (
            entry.get("name"),
            _number(entry.get("size")),
            _number(entry.get("ratio")),
        )
        if not isinstance(name, str) or size is None or ratio is None:
            raise _bad(f"layer {index} lacks a name, size or ratio")
        curve = None
        raw = curves.get(name)
        if raw is not None:
            try:
                xs = np.asarray(raw["ratios"], dtype=np.float64)
                ys = np.asarray(
                    [np.nan if v is None else v for v in raw["distortion"]], dtype=np.float64
                )
            except (KeyError, TypeError, ValueError):
                raise _bad(f"the curve of layer {name!r} is not ratios/distortion lists") from None
            if xs.ndim != 1 or xs.shape != ys.shape or not xs.size:
                raise _bad(f"the curve of layer {name!r} has mismatched lists")
            curve = (xs, ys)
        parsed.append(_Layer(name, int(size), ratio, curve))
    settings = report.get("settings")
    settings = settings if isinstance(settings, Mapping) else {}
    return _Report(
        layers=parsed,
        target=_number(report.get("target_ratio")),
        achieved=_number(report.get("achieved_ratio")),
        method=str(settings.get("method", "?")),
        metric=str(settings.get("metric", "distortion")),
    )


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON report written by ``rdprune-onnx prune --report``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"report {str(p)!r} does not exist", "check the path")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"cannot read {str(p)!r} as JSON ({type(exc).__name__})",
            "pass the JSON file written by `rdprune-onnx prune --report`",
        ) from None
    if not isinstance(data, dict):
        raise _bad(f"{str(p)!r} holds a JSON {type(data).__name__}, not an object")
    return data


_SEPARATORS = "/.:_-"


def _common_prefix(strings: Sequence[str]) -> str:
    """The longest string that starts every one of ``strings`` (character by character)."""
    first, last = min(strings), max(strings)
    end = next((i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first))
    return first[:end]


def distinct_parts(names: Sequence[str]) -> tuple[str, list[str], str]:
    """Split off the prefix and suffix that all ``names`` share (at separators such as
    ``/`` or ``.``), so that labels show what tells the layers apart.

    Returns (prefix, middles, suffix); nothing is split off when that would leave a name
    empty (one layer, or one name the prefix of another).
    """
    if len(names) < 2:
        return "", list(names), ""
    prefix = _common_prefix(names)
    prefix = prefix[: max(prefix.rfind(c) for c in _SEPARATORS) + 1]
    suffix = _common_prefix([name[::-1] for name in names])[::-1]
    cut = [suffix.find(c) for c in _SEPARATORS if c in suffix]
    suffix = suffix[min(cut) :] if cut else ""
    middles = [name[len(prefix) : len(name) - len(suffix)] for name in names]
    if not all(middles) or any(len(prefix) + len(suffix) > len(name) for name in names):
        return "", list(names), ""
    return prefix, middles, suffix


def short_name(name: str, width: int = 24) -> str:
    """``name`` cut to at most ``width`` characters, keeping more of its (telling) end."""
    if len(name) <= width:
        return name
    head = (width - 1) // 3
    tail = width - 1 - head
    return name[:head] + "…" + name[-tail:]


def short_names(names: Sequence[str], width: int = 24) -> list[str]:
    """:func:`short_name` of each, made distinct: where two shortened labels clash, their
    layer numbers (``#i``) are appended so that no two layers share a label."""
    labels = [short_name(name, width) for name in names]
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return [
        f"{short_name(name, width - 4)}#{i}" if counts[label] > 1 else label
        for i, (name, label) in enumerate(zip(names, labels, strict=True))
    ]


def _floor(layers: Sequence[_Layer]) -> float:
    """A positive stand-in for zero distortion: a decade below the smallest positive value."""
    positive = [
        float(ys[(ys > 0) & np.isfinite(ys)].min())
        for layer in layers
        if layer.curve is not None
        for ys in [layer.curve[1]]
        if np.any((ys > 0) & np.isfinite(ys))
    ]
    return min(positive) / 10 if positive else 1e-12


def _percent(value: float | None) -> str:
    return "?" if value is None else f"{value:.1%}"


def _check_output(path: Path, force: bool, formats: Mapping[str, str]) -> str:
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"plot folder {str(folder)!r} does not exist", "create it first")
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in formats:
        raise UserError(
            f"cannot tell the image format of {str(path)!r}",
            f"end the name with one of .{', .'.join(sorted(formats))} (e.g. .png)",
        )
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a directory", "name an image file")
    files.check_existing(path, "plot", force=force, force_hint=files.FORCE_HINT)
    return fmt


def plot_result(
    result: Mapping[str, Any] | _HasToDict,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    size: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
    protect: Sequence[files.Identity] = (),
) -> Path:
    """Draw a prune report to ``path`` (format from the suffix: .png, .svg, .pdf, ...).

    Top: every layer's distortion against its pruning ratio (log scale; zero drawn at a
    floor a decade below the smallest positive value), with the chosen ratio marked.
    Bottom: the chosen ratio of each layer as bars (same colours), and the layer's number of
    weights as a line on a log axis. Without curves (baseline methods) only the bottom
    panel is drawn. The file is written through a temporary file and a rename; an existing
    file is replaced only with ``force``. ``result`` may also be a ``PruneResult``.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError(
            "plotting needs matplotlib, which is not installed",
            "pip install 'rdprune-onnx[plot]'",
        ) from None

    report = _parse(result.to_dict() if hasattr(result, "to_dict") else result)
    out = Path(path)
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    fmt = _check_output(out, force, canvas.get_supported_filetypes())

    layers = report.layers
    n = len(layers)
    prefix, middles, suffix = distinct_parts([layer.name for layer in layers])
    named = n <= NAMED_LAYERS
    colors = colormaps["viridis"](np.linspace(0.0, 0.88, n)) if n > 1 else ["tab:blue"]
    cmap = ListedColormap(colors)
    with_curves = any(layer.curve is not None for layer in layers)

    total = sum(layer.size for layer in layers)
    fig.suptitle(
        f"{report.method} allocation, metric {report.metric}: "
        f"{_percent(report.achieved)} of {total:,} weights pruned "
        f"(target {_percent(report.target)}) over {n} layer{'s' if n != 1 else ''}",
        fontsize=12,
    )
    if with_curves:
        ax_curves, ax_bars = fig.subplots(2, 1, height_ratios=[3, 2])
    else:
        ax_bars = fig.subplots(1, 1)

    if with_curves:
        floor = _floor(layers)
        many = n > 20
        clipped = False
        curve_labels = short_names(middles, 32)
        for i, layer in enumerate(layers):
            if layer.curve is None:
                continue
            xs, ys = layer.curve
            clipped = clipped or bool(np.any(ys <= 0))
            shown = np.where(ys > 0, ys, floor)
            ax_curves.plot(
                xs,
                shown,
                color=colors[i],
                lw=0.8 if many else 1.4,
                alpha=0.75 if many else 0.95,
                label=curve_labels[i],
            )
            point = float(np.interp(layer.ratio, xs, shown))
            ax_curves.scatter(
                [layer.ratio],
                [point],
                s=22 if many else 40,
                color=colors[i],
                edgecolors="black",
                linewidths=0.6,
                zorder=3,
            )
        ax_curves.set_yscale("log")
        ax_curves.set_xlim(0.0, 1.0)
        ax_curves.set_xlabel("pruning ratio of the layer")
        ylabel = f"output distortion ({report.metric})"
        if clipped:
            ylabel += f"\nzero drawn at {floor:.1g}"
        ax_curves.set_ylabel(ylabel)
        ax_curves.grid(True, which="major", alpha=0.3)
        ax_curves.set_title("distortion when pruning one layer alone; dots: chosen ratios")
        if named:
            ax_curves.legend(
                fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0
            )
        else:
            norm = BoundaryNorm(np.arange(-0.5, n + 0.5), n)
            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax_curves, pad=0.01)
            bar.set_label("layer index (as in the bar chart)")
            bar.locator = MaxNLocator(nbins=10, integer=True)
            bar.update_ticks()

    index = np.arange(n)
    ratios = [layer.ratio for layer in layers]
    ax_bars.bar(index, ratios, width=0.8, color=colors, edgecolor="none")
    if report.achieved is not None:
        ax_bars.axhline(report.achieved, color="tab:red", lw=1.0, ls="--")
    ax_bars.set_ylim(0.0, 1.08)
    pad = max(0.0, (4 - n) / 2)  # keep one or two bars from filling the whole width
    ax_bars.set_xlim(-0.6 - pad, n - 0.4 + pad)
    ax_bars.set_ylabel("chosen pruning ratio")
    ax_bars.grid(True, axis="y", alpha=0.3)
    ax_size = ax_bars.twinx()
    sizes = [max(layer.size, 1) for layer in layers]
    ax_size.plot(
        index,
        sizes,
        ls="none",
        marker="D",
        ms=3 if n > 20 else 5,
        mfc="black",
        mec="white",
        mew=0.5,
    )
    ax_size.set_yscale("log")
    if named:
        # On the twin axes (which lie above the bars' axes) so that the labels sit above
        # the bars, but below the size markers.
        for x, ratio in zip(index, ratios, strict=True):
            ax_size.text(
                float(x),
                ratio + 0.015,
                f"{ratio:.0%}",
                transform=ax_bars.transData,
                ha="center",
                va="bottom",
                fontsize=8,
                zorder=1.5,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
            )
    ax_size.set_ylim(min(sizes) / 2, max(sizes) * 2)
    ax_size.set_ylabel("weights in the layer (log scale)")
    if named:
        labels = short_names(middles, 20)
        tilt = n * max(len(label) for label in labels) > 100
        ax_bars.set_xticks(
            index,
            labels,
            rotation=30 if tilt else 0,
            ha="right" if tilt else "center",
            fontsize=8,
        )
        common = [
            f"{what} {short_name(part, 40)!r}"
            for what, part in (("prefix", prefix), ("suffix", suffix))
            if part
        ]
        ax_bars.set_xlabel(f"layer (common {' and '.join(common)} left out)" if common else "layer")
    else:
        ax_bars.set_xticks(index[:: max(1, math.ceil(n / MAX_TICKS))])
        ax_bars.set_xlabel("layer index (order in the report)")
    handles = [
        Patch(color=colors[n // 2], label="pruning ratio (bars)"),
        Line2D(
            [],
            [],
            ls="none",
            marker="D",
            ms=5,
            mfc="black",
            mec="white",
            label="weights in the layer (right axis)",
        ),
    ]
    if report.achieved is not None:
        handles.append(Line2D([], [], color="tab:red", ls="--", label="overall ratio"))
    ax_bars.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=len(handles),
        frameon=False,
        fontsize=9,
    )

    files.write_file(
        out,
        lambda fh: canvas.print_figure(fh, format=fmt, dpi=dpi),
        force=force,
        label="plot",
        protect=protect,
    )
    return out


def matplotlib_canvas() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and Agg canvas classes, or one line saying how to get them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "plotting needs matplotlib, which is not installed",
            "pip install 'rdprune-onnx[plot]'",
        ) from None
    return Figure, FigureCanvasAgg


def _formats() -> Mapping[str, str]:
    figure, canvas = matplotlib_canvas()
    formats: Mapping[str, str] = canvas(figure()).get_supported_filetypes()
    return formats


def check_plot_target(path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Refuse a bad plot path before a long run: folder, image format, existing file."""
    _check_output(Path(path), force, _formats())
