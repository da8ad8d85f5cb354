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


@dataclass
class _Look:
    """What every panel shares: the layers' colours and how their names are shown."""

    colors: Any  # one RGBA row per layer (or a single named colour for one layer)
    named: bool  # few enough layers for a legend and named bars
    prefix: str
    middles: list[str]
    suffix: str

    @classmethod
    def of(cls, layers: Sequence[_Layer]) -> _Look:
        from matplotlib import colormaps

        n = len(layers)
        prefix, middles, suffix = distinct_parts([layer.name for layer in layers])
        colors = colormaps["viridis"](np.linspace(0.0, 0.88, n)) if n > 1 else ["tab:blue"]
        return cls(colors, n <= NAMED_LAYERS, prefix, middles, suffix)


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
    figure_cls, canvas_cls = matplotlib_canvas()
    report = _parse(result.to_dict() if hasattr(result, "to_dict") else result)
    out = Path(path)
    fig = figure_cls(figsize=size, dpi=dpi, layout="constrained")
    canvas = canvas_cls(fig)
    fmt = _check_output(out, force, canvas.get_supported_filetypes())

    look = _Look.of(report.layers)
    _title(fig, report)
    if any(layer.curve is not None for layer in report.layers):
        ax_curves, ax_bars = fig.subplots(2, 1, height_ratios=[3, 2])
        _draw_curves(fig, ax_curves, report, look)
    else:
        ax_bars = fig.subplots(1, 1)
    _draw_bars(ax_bars, report, look)
    write_figure(canvas, out, fmt, dpi, force=force, protect=protect)
    return out


def _title(fig: Any, report: _Report) -> None:
    n = len(report.layers)
    total = sum(layer.size for layer in report.layers)
    fig.suptitle(
        f"{report.method} allocation, metric {report.metric}: "
        f"{_percent(report.achieved)} of {total:,} weights pruned "
        f"(target {_percent(report.target)}) over {n} layer{'s' if n != 1 else ''}",
        fontsize=12,
    )


def _draw_curves(fig: Any, ax: Any, report: _Report, look: _Look) -> None:
    """The top panel: each layer's curve (zero at a floor) and a dot at its chosen ratio."""
    layers = report.layers
    floor = _floor(layers)
    many = len(layers) > 20
    clipped = False
    curve_labels = short_names(look.middles, 32)
    for i, layer in enumerate(layers):
        if layer.curve is None:
            continue
        xs, ys = layer.curve
        clipped = clipped or bool(np.any(ys <= 0))
        shown = np.where(ys > 0, ys, floor)
        ax.plot(
            xs,
            shown,
            color=look.colors[i],
            lw=0.8 if many else 1.4,
            alpha=0.75 if many else 0.95,
            label=curve_labels[i],
        )
        point = float(np.interp(layer.ratio, xs, shown))
        ax.scatter(
            [layer.ratio],
            [point],
            s=22 if many else 40,
            color=look.colors[i],
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
        )
    _curve_axes(fig, ax, report.metric, floor if clipped else None, look)


def _curve_axes(fig: Any, ax: Any, metric: str, floor: float | None, look: _Look) -> None:
    """Scales, labels and the key of the curves panel (``floor``: where zero is drawn, if
    any curve reached zero): a legend for a few layers, a colour bar of indices for many."""
    ax.set_yscale("log")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("pruning ratio of the layer")
    ylabel = f"output distortion ({metric})"
    if floor is not None:
        ylabel += f"\nzero drawn at {floor:.1g}"
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("distortion when pruning one layer alone; dots: chosen ratios")
    if look.named:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        return
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.ticker import MaxNLocator

    n = len(look.middles)
    norm = BoundaryNorm(np.arange(-0.5, n + 0.5), n)
    cmap = ListedColormap(look.colors)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01)
    bar.set_label("layer index (as in the bar chart)")
    bar.locator = MaxNLocator(nbins=10, integer=True)
    bar.update_ticks()


def _draw_bars(ax: Any, report: _Report, look: _Look) -> None:
    """The bottom panel: chosen ratios as bars, the layers' sizes on a twin log axis."""
    layers = report.layers
    n = len(layers)
    index = np.arange(n)
    ratios = [layer.ratio for layer in layers]
    ax.bar(index, ratios, width=0.8, color=look.colors, edgecolor="none")
    if report.achieved is not None:
        ax.axhline(report.achieved, color="tab:red", lw=1.0, ls="--")
    ax.set_ylim(0.0, 1.08)
    pad = max(0.0, (4 - n) / 2)  # keep one or two bars from filling the whole width
    ax.set_xlim(-0.6 - pad, n - 0.4 + pad)
    ax.set_ylabel("chosen pruning ratio")
    ax.grid(True, axis="y", alpha=0.3)
    _draw_sizes(ax, index, ratios, [max(layer.size, 1) for layer in layers], look.named)
    _layer_axis(ax, index, look)
    _bar_legend(ax, look.colors[n // 2], report.achieved is not None)


def _draw_sizes(
    ax_bars: Any, index: np.ndarray, ratios: Sequence[float], sizes: Sequence[int], named: bool
) -> None:
    """The layers' sizes as markers on a twin log axis, and (``named``) each bar's ratio."""
    ax_size = ax_bars.twinx()
    ax_size.plot(
        index,
        sizes,
        ls="none",
        marker="D",
        ms=3 if len(sizes) > 20 else 5,
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


def _layer_axis(ax: Any, index: np.ndarray, look: _Look) -> None:
    """The bars' layer axis: short distinct names (common prefix and suffix said in the
    axis label) for a few layers, thinned-out indices for many."""
    n = len(index)
    if not look.named:
        ax.set_xticks(index[:: max(1, math.ceil(n / MAX_TICKS))])
        ax.set_xlabel("layer index (order in the report)")
        return
    labels = short_names(look.middles, 20)
    tilt = n * max(len(label) for label in labels) > 100
    ax.set_xticks(
        index,
        labels,
        rotation=30 if tilt else 0,
        ha="right" if tilt else "center",
        fontsize=8,
    )
    common = [
        f"{what} {short_name(part, 40)!r}"
        for what, part in (("prefix", look.prefix), ("suffix", look.suffix))
        if part
    ]
    ax.set_xlabel(f"layer (common {' and '.join(common)} left out)" if common else "layer")


def _bar_legend(ax: Any, bar_color: Any, overall: bool) -> None:
    """The key above the bars: bars, size markers and (``overall``) the overall ratio."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Patch(color=bar_color, label="pruning ratio (bars)"),
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
    if overall:
        handles.append(Line2D([], [], color="tab:red", ls="--", label="overall ratio"))
    ax.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=len(handles),
        frameon=False,
        fontsize=9,
    )


def write_figure(
    canvas: Any,
    out: Path,
    fmt: str,
    dpi: int,
    *,
    force: bool,
    protect: Sequence[files.Identity],
) -> None:
    """Render ``canvas`` as ``fmt`` to ``out`` through :func:`rdprune_onnx.files.write_file`
    (atomic; an existing file replaced only with ``force``, never one of ``protect``)."""
    files.write_file(
        out,
        lambda fh: canvas.print_figure(fh, format=fmt, dpi=dpi),
        force=force,
        label="plot",
        protect=protect,
    )


def matplotlib_canvas() -> tuple[Any, Any]:
    """matplotlib's ``Figure`` and Agg canvas classes, or one line saying how to get them."""
    try:
        # The package itself first: its submodules can stay importable (cached) without it.
        from matplotlib import colormaps  # noqa: F401  (needed by plot_result's panels)
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
