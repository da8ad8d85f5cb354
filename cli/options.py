"""Option groups shared by several commands; each builds one library object."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from rdprune_onnx.allocate import METHODS
from rdprune_onnx.calibration import parse_input_ranges, parse_input_shapes
from rdprune_onnx.distortion import METRICS
from rdprune_onnx.errors import UserError
from rdprune_onnx.export import STORAGES
from rdprune_onnx.grid import GRIDS
from rdprune_onnx.pipeline import BUDGETS, CalibrationSpec, PruneSettings, read_overrides
from rdprune_onnx.reconstruct import SOLVERS
from rdprune_onnx.runtime import PROVIDERS

F = TypeVar("F", bound=Callable[..., Any])


def _apply(func: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def calibration_options(func: F) -> F:
    return _apply(
        func,
        [
            click.option(
                "--data",
                type=click.Path(dir_okay=False),
                help=".npz with one array per model input (first axis = samples).",
            ),
            click.option(
                "--synthetic",
                type=int,
                metavar="N",
                help="Use N random samples instead of data (standard normal for float inputs).",
            ),
            click.option(
                "--input-shape",
                "input_shapes",
                multiple=True,
                metavar="NAME:DIMS",
                help="Shape for dynamic dimensions, e.g. input:1x3x224x224 (repeatable).",
            ),
            click.option(
                "--input-range",
                "input_ranges",
                multiple=True,
                metavar="NAME:LOW:HIGH",
                help="Value range [LOW, HIGH) for a synthetic integer input (repeatable).",
            ),
            click.option("--batch-size", default=32, show_default=True, help="Samples per run."),
            click.option("--seed", default=0, show_default=True, help="Seed for synthetic data."),
        ],
    )


def measurement_options(func: F) -> F:
    return _apply(
        func,
        [
            click.option("--metric", type=click.Choice(METRICS), default="mse", show_default=True),
            click.option("--levels", default=101, show_default=True, help="Grid points, 0 to 1."),
            click.option(
                "--grid",
                type=click.Choice(GRIDS),
                default="adaptive",
                show_default=True,
                help="adaptive: measure only the levels the allocation needs (refined in "
                "rounds, --levels is the finest); full: every level.",
            ),
            click.option(
                "--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True
            ),
            click.option(
                "--refit-curves",
                is_flag=True,
                help="Measure each rd point with the layer pruned and refit (as --reconstruct "
                "refits it; prune: implies --reconstruct). Needs calibration data.",
            ),
        ],
    )


def allocation_options(func: F) -> F:
    return _apply(
        func,
        [
            click.option("--method", type=click.Choice(METHODS), default="rd", show_default=True),
            click.option(
                "--budget",
                type=click.Choice(BUDGETS),
                default="params",
                show_default=True,
                help="What --ratio counts: weights, or multiply-accumulates.",
            ),
            click.option(
                "--exclude", multiple=True, metavar="PATTERN", help="Keep matching layers dense."
            ),
            click.option("--min-layer-ratio", type=float, help="Every layer prunes at least this."),
            click.option("--max-layer-ratio", type=float, help="No layer prunes more than this."),
            click.option(
                "--overrides",
                type=click.Path(dir_okay=False),
                help='JSON/YAML: {"PATTERN": {"min_ratio": a, "max_ratio": b}}.',
            ),
            click.option(
                "--allow-layer-removal", is_flag=True, help="Let rd prune a layer entirely."
            ),
            click.option(
                "--reconstruct",
                is_flag=True,
                help="Refit each layer's kept weights to its dense outputs after masking.",
            ),
            click.option(
                "--refit-solver",
                type=click.Choice(SOLVERS),
                default="auto",
                show_default=True,
                help="exact per-row least squares, or blockwise sparsegpt for wide layers.",
            ),
        ],
    )


def output_options(func: F) -> F:
    return _apply(
        func,
        [
            click.option("--eval-data", type=click.Path(), help="Labelled .npz: dense vs pruned."),
            click.option("--labels", metavar="KEY", help="Array of labels in --eval-data."),
            click.option("--report", type=click.Path(), help="Write a JSON report here."),
            click.option("--force", is_flag=True, help="Replace existing output files."),
            click.option(
                "--storage",
                type=click.Choice(STORAGES),
                default="dense",
                show_default=True,
                help="compact: a file that shrinks with sparsity (rebuilt by ORT at load).",
            ),
            click.option(
                "--cache-dir",
                type=click.Path(file_okay=False),
                help="Where measured curves are kept for reuse and resume "
                "[$RDPRUNE_CACHE_DIR or ~/.cache/rdprune-onnx].",
            ),
            click.option("--no-cache", is_flag=True, help="Neither read nor write the cache."),
            click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
        ],
    )


def build_calibration(kwargs: dict[str, Any]) -> CalibrationSpec:
    return CalibrationSpec(
        data=kwargs.pop("data"),
        synthetic=kwargs.pop("synthetic"),
        input_shapes=parse_input_shapes(kwargs.pop("input_shapes")),
        input_ranges=parse_input_ranges(kwargs.pop("input_ranges")),
        batch_size=kwargs.pop("batch_size"),
        seed=kwargs.pop("seed"),
    )


def build_settings(kwargs: dict[str, Any], *, ratio: float) -> PruneSettings:
    """Pop the allocation and measurement options that a command has into settings."""
    overrides = kwargs.pop("overrides", None)
    return PruneSettings(
        ratio=ratio,
        method=kwargs.pop("method", "rd"),
        metric=kwargs.pop("metric", "mse"),
        levels=kwargs.pop("levels", 101),
        provider=kwargs.pop("provider", "auto"),
        exclude=kwargs.pop("exclude", ()),
        allow_layer_removal=kwargs.pop("allow_layer_removal", False),
        steps=kwargs.pop("steps", 1),
        budget=kwargs.pop("budget", "params"),
        min_layer_ratio=kwargs.pop("min_layer_ratio", None),
        max_layer_ratio=kwargs.pop("max_layer_ratio", None),
        overrides=read_overrides(overrides) if overrides else {},
        reconstruct=kwargs.pop("reconstruct", False),
        refit_solver=kwargs.pop("refit_solver", "auto"),
        refit_curves=kwargs.pop("refit_curves", False),
        grid=kwargs.pop("grid", "adaptive"),
    )


def parse_ratios(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"cannot read --ratio {text!r}", "e.g. --ratio 0.5,0.7,0.9") from None
    if not values:
        raise UserError("--ratio is empty", "e.g. --ratio 0.8")
    return values
