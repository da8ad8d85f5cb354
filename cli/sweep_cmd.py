"""``sweep`` (quality against ratio for several methods) and the quality-target options of
``prune`` (``--max-drop``, ``--max-distortion``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from rdprune_onnx.cache import default_cache_dir
from rdprune_onnx.errors import UserError
from rdprune_onnx.quality import QUALITY_METRICS
from rdprune_onnx.search import QualityTarget
from rdprune_onnx.settings import EvalSpec, OutputSpec
from rdprune_onnx.sweep import SweepResult, parse_methods, parse_ratio_grid, sweep

from .options import (
    allocation_options,
    build_calibration,
    build_evaluation,
    build_settings,
    calibration_options,
    default,
    field_option,
    mask_options,
    measurement_options,
)
from .render import table

F = TypeVar("F", bound=Callable[..., Any])

_QUALITY_HELP = (
    "Held-out metric: accuracy (needs --labels), agreement (top-1 with the dense model) or "
    "cosine (mean output cosine) [accuracy with --labels, else agreement, else cosine]."
)


def _allocation_options_but_method(func: F) -> F:
    """``allocation_options`` without ``--method`` (sweep takes a comma list of methods)."""

    def holder() -> None: ...

    allocation_options(holder)
    params = [p for p in getattr(holder, "__click_params__", []) if p.name != "method"]
    func.__click_params__ = [*getattr(func, "__click_params__", []), *params]  # type: ignore[attr-defined]
    return func


def target_options(func: F) -> F:
    """Options of ``prune`` that replace ``--ratio`` by a quality target."""
    for option in reversed(
        [
            click.option(
                "--max-drop",
                type=float,
                metavar="D",
                help="Instead of --ratio: the highest ratio whose held-out metric (--eval-data) "
                "stays within D of the dense model's (bisection over ratios).",
            ),
            click.option(
                "--max-distortion",
                type=float,
                metavar="X",
                help="Instead of --ratio: the highest ratio whose measured calibration "
                "distortion stays <= X (rd: dual DP, then verified).",
            ),
            click.option(
                "--quality-metric", type=click.Choice(QUALITY_METRICS), help=_QUALITY_HELP
            ),
            click.option(
                "--search-range",
                metavar="LOW:HIGH",
                help="Ratios searched by --max-drop / --max-distortion "
                f"[{default(QualityTarget, 'low'):g}:{default(QualityTarget, 'high'):g}].",
            ),
            click.option(
                "--resolution",
                type=float,
                help=f"Step of the searched ratio grid [{default(QualityTarget, 'resolution'):g}].",
            ),
        ]
    ):
        func = option(func)
    return func


def build_target(
    kwargs: dict[str, Any], ratio: float | None, evaluation: EvalSpec
) -> QualityTarget | None:
    """Pop the target options; refuse the combinations that make no sense, in one line."""
    max_drop = kwargs.pop("max_drop")
    max_distortion = kwargs.pop("max_distortion")
    metric = kwargs.pop("quality_metric")
    search_range = kwargs.pop("search_range")
    resolution = kwargs.pop("resolution")
    if max_drop is None and max_distortion is None:
        if ratio is None:
            raise UserError(
                "give --ratio, or a quality target (--max-drop D with --eval-data, or "
                "--max-distortion X)",
                "e.g. --ratio 0.8, or --max-drop 0.01 --eval-data test.npz --labels y",
            )
        for name, value in (
            ("--quality-metric", metric),
            ("--search-range", search_range),
            ("--resolution", resolution),
        ):
            if value is not None:
                raise UserError(f"{name} applies to --max-drop / --max-distortion", f"drop {name}")
        return None
    given = "--max-drop" if max_drop is not None else "--max-distortion"
    if ratio is not None:
        raise UserError(
            f"--ratio and {given} are alternatives: the target chooses the ratio",
            f"drop --ratio, or drop {given}",
        )
    if max_drop is not None and max_distortion is not None:
        raise UserError(
            "--max-drop and --max-distortion are alternatives", "give one quality target"
        )
    if max_drop is not None and evaluation.data is None:
        raise UserError(
            "--max-drop needs held-out data to measure the drop on",
            "pass --eval-data FILE.npz (and --labels KEY for accuracy)",
        )
    target = QualityTarget(max_drop=max_drop, max_distortion=max_distortion, metric=metric)
    if search_range is not None:
        try:
            low, high = (float(p) for p in search_range.split(":"))
        except ValueError:
            raise UserError(
                f"cannot read --search-range {search_range!r}", "e.g. --search-range 0.05:0.99"
            ) from None
        target.low, target.high = low, high
    if resolution is not None:
        target.resolution = resolution
    target.check()
    return target


def show_search(search: dict[str, Any]) -> str:
    """The probes of a quality-target search and what it chose."""
    drop = search["criterion"] == "max_drop"
    value_name = f"{search['metric']} drop" if drop else "measured"
    rows = []
    for p in search["probes"]:
        rows.append(
            (
                f"{p['ratio']:.4g}",
                "-" if p["pruned_metric"] is None else f"{p['pruned_metric']:.4f}",
                "-" if p["value"] is None else f"{p['value']:.4g}",
                "pass" if p["passed"] else "fail" + (f" ({p['error']})" if p["error"] else ""),
                f"{p['seconds']:.2f}",
            )
        )
    lines = [
        "",
        f"search: {search['criterion'].replace('_', '-')} {search['limit']:g}"
        + (f" on {search['metric']} (dense {search['dense_metric']:.4f})" if drop else ""),
        table(["ratio", search["metric"] or "metric", value_name, "", "s"], rows, "rrrlr"),
    ]
    nxt = search["next_failing_ratio"]
    lines.append(
        f"chosen ratio {search['chosen_ratio']:.4g} ({value_name} {search['chosen_value']:.4g}); "
        + (
            f"next ratio up {nxt:.4g} failed ({value_name} "
            + (
                "-"
                if search["next_failing_value"] is None
                else f"{search['next_failing_value']:.4g}"
            )
            + ")"
            if nxt is not None
            else "the top of the search range passed"
        )
    )
    return "\n".join(lines)


def show_sweep(result: SweepResult) -> str:
    rows = []
    for p in result.points:
        if p.error is not None:
            rows.append((p.method, f"{p.ratio:.4g}", "-", "-", "-", "-", "-", "infeasible"))
            continue
        rows.append(
            (
                p.method,
                f"{p.ratio:.4g}",
                f"{p.achieved_ratio:.4f}",
                f"{p.metric:.4f}",
                f"{p.drop:+.4f}",
                "-" if p.predicted is None else f"{p.predicted:.4g}",
                "-" if p.measured is None else f"{p.measured:.4g}",
                "cached" if p.cached else f"{p.seconds:.2f}",
            )
        )
    done = sum(not p.cached for p in result.points)
    t = result.timings
    lines = [
        f"dense {result.metric}: {result.dense_metric:.4f} on {result.eval_samples} held-out "
        "samples",
        table(
            ["method", "ratio", "achieved", result.metric, "drop", "predicted", "measured", "s"],
            rows,
            "lrrrrrrr",
        ),
        f"{done} points evaluated in {t.get('points', 0.0):.1f}s "
        f"({len(result.points) - done} from the cache); curves {t.get('curves', 0.0):.1f}s; "
        f"total {t.get('total', 0.0):.1f}s",
    ]
    if result.output is not None:
        lines.append(f"wrote {result.output}")
    return "\n".join(lines)


@click.command("sweep")
@click.argument("model", type=click.Path())
@click.option(
    "--ratios",
    default="0.3:0.95:0.05",
    show_default=True,
    help="start:stop:step (stop included) or a comma list.",
)
@click.option(
    "--method",
    "methods",
    default="rd,lamp,global",
    show_default=True,
    help="Comma list of allocation methods.",
)
@_allocation_options_but_method
@mask_options
@measurement_options
@calibration_options
@click.option("--eval-data", type=click.Path(), required=True, help="Held-out .npz.")
@click.option("--labels", metavar="KEY", help="Array of labels in --eval-data.")
@click.option("--quality-metric", type=click.Choice(QUALITY_METRICS), help=_QUALITY_HELP)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the sweep as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the sweep (.png/.svg/.pdf).")
@field_option(OutputSpec, "--force", is_flag=True, help="Replace existing output files.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Curves and finished points are kept here (a killed sweep resumes) "
    "[$RDPRUNE_CACHE_DIR or ~/.cache/rdprune-onnx].",
)
@click.option("--no-cache", is_flag=True, help="Neither read nor write the cache.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def sweep_command(model: str, **kwargs: Any) -> None:
    """Prune MODEL at every ratio with every method; table, JSON and picture of the
    held-out metric (and the distortions) against the ratio."""
    calibration = build_calibration(kwargs)
    plot = kwargs["plot"]
    ratios = parse_ratio_grid(kwargs.pop("ratios"))
    methods = parse_methods(kwargs.pop("methods"))
    settings = build_settings(kwargs, ratio=ratios[0])
    cache_dir = kwargs.pop("cache_dir") or default_cache_dir()
    result = sweep(
        model,
        settings,
        calibration,
        evaluation=build_evaluation(kwargs),
        metric=kwargs.pop("quality_metric"),
        ratios=ratios,
        methods=methods,
        output=kwargs.pop("output"),
        plot=kwargs.pop("plot"),
        force=kwargs.pop("force"),
        cache_dir=None if kwargs.pop("no_cache") else cache_dir,
        progress=not kwargs.pop("no_progress"),
    )
    click.echo(show_sweep(result))
    if plot is not None:
        click.echo(f"plotted {plot}")
