"""Option groups shared by several commands; each builds one library object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any, TypeVar

import click

from rdprune_onnx.allocate import METHODS
from rdprune_onnx.calibration import parse_input_ranges, parse_input_shapes, parse_input_values
from rdprune_onnx.compact import STORAGES
from rdprune_onnx.distortion import METRICS, OUTPUT_KINDS
from rdprune_onnx.errors import UserError
from rdprune_onnx.grid import GRIDS
from rdprune_onnx.masks import MASK_INPUTS, MASKS
from rdprune_onnx.reconstruct import INPUTS as REFIT_INPUTS
from rdprune_onnx.reconstruct import SOLVERS
from rdprune_onnx.runtime import PROVIDERS
from rdprune_onnx.settings import (
    BUDGETS,
    CalibrationSpec,
    EvalSpec,
    OutputSpec,
    PruneSettings,
    read_overrides,
)

F = TypeVar("F", bound=Callable[..., Any])


def _apply(func: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def default(cls: Any, name: str) -> Any:
    """The default of the dataclass field ``cls.name``: the one place a default is written."""
    value = cls.__dataclass_fields__[name].default
    if value is MISSING:
        raise AssertionError(f"{cls.__name__}.{name} has no default")  # a bug in cli/
    return value


def field_option(cls: Any, *decls: str, **attrs: Any) -> Callable[[F], F]:
    """A click option whose default is the field's own (``--refit-solver`` ->
    ``cls.refit_solver``; ``is_flag`` options default to the field's False)."""
    name = attrs.get("name") or decls[-1].lstrip("-").replace("-", "_")
    attrs.pop("name", None)
    if not attrs.get("is_flag"):
        attrs.setdefault("show_default", True)
    return click.option(*decls, default=default(cls, name), **attrs)


def setting(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """An option for a :class:`PruneSettings` field, defaulting to the field's default."""
    return field_option(PruneSettings, *decls, **attrs)


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
            click.option(
                "--input-value",
                "input_values",
                multiple=True,
                metavar="NAME=VALUE",
                help="Fix a synthetic input to one value, e.g. sr=16000 (repeatable).",
            ),
            field_option(CalibrationSpec, "--batch-size", help="Samples per run."),
            field_option(CalibrationSpec, "--seed", help="Seed for synthetic data."),
        ],
    )


def output_kind_option(func: F) -> F:
    """What the outputs hold, for --metric kl / prob-mse (auto: from the graph or data)."""
    return setting(
        "--output-kind",
        type=click.Choice(OUTPUT_KINDS),
        help="What the outputs hold, for kl / prob-mse: auto detects a final Softmax / "
        "LogSoftmax / Sigmoid or judges by the data.",
    )(func)


def measurement_options(func: F) -> F:
    return _apply(
        func,
        [
            setting("--metric", type=click.Choice(METRICS)),
            output_kind_option,
            setting("--levels", help="Grid points, 0 to 1."),
            setting(
                "--grid",
                type=click.Choice(GRIDS),
                help="adaptive: measure only the levels the allocation needs (refined in "
                "rounds, --levels is the finest); full: every level.",
            ),
            setting("--provider", type=click.Choice(PROVIDERS)),
            setting(
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
            setting("--method", type=click.Choice(METHODS)),
            setting(
                "--budget",
                type=click.Choice(BUDGETS),
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
            setting("--allow-layer-removal", is_flag=True, help="Let rd prune a layer entirely."),
            setting(
                "--prune-unused-layers",
                is_flag=True,
                help="Prune layers with a zero curve freely (default: the others' median).",
            ),
            setting(
                "--reconstruct",
                is_flag=True,
                help="Refit each layer's kept weights to its dense outputs after masking.",
            ),
            refit_solver_option(
                "exact per-row least squares, or blockwise sparsegpt for wide layers.",
            ),
            setting(
                "--refit-inputs",
                type=click.Choice(REFIT_INPUTS),
                help="Hessians of the refit (and of --mask sparsegpt): each layer's inputs in "
                "the model pruned and refit so far, or the dense model's. sequential by "
                "measurement (digits: best or tied at 0.8-0.95, uniform and rd).",
            ),
        ],
    )


def mask_options(func: F) -> F:
    return _apply(
        func,
        [
            setting(
                "--mask",
                type=click.Choice(MASKS),
                help="Which weights go inside a layer: smallest |w|; wanda (|w| x input "
                "feature norm on the calibration data, per output row; also the rd curves' "
                "mask and what global/lamp rank); or sparsegpt (OBS selection from each "
                "layer's Hessian with the kept weights updated: implies --reconstruct; its "
                "rd curves are magnitude ones unless --refit-curves). wanda and sparsegpt "
                "need calibration data.",
            ),
            setting(
                "--mask-inputs",
                type=click.Choice(MASK_INPUTS),
                help="wanda statistics of the final masking: from the dense model (one pass) "
                "or sequential (each layer's inputs in the model pruned so far, one pass per "
                "layer depth). dense by measurement: sequential lost on the digits CNN at "
                "0.8-0.95 (rd and lamp) and tied on MiniLM, at 30x the cost.",
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
            field_option(
                OutputSpec, "--force", is_flag=True, help="Replace existing output files."
            ),
            field_option(
                OutputSpec,
                "--storage",
                type=click.Choice(STORAGES),
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
        input_values=parse_input_values(kwargs.pop("input_values")),
        batch_size=kwargs.pop("batch_size"),
        seed=kwargs.pop("seed"),
    )


def refit_solver_option(help: str) -> Callable[[F], F]:
    return setting("--refit-solver", type=click.Choice(SOLVERS), help=help)


def steps_option(func: F) -> F:
    return setting("--steps", help="Iterative rd: re-measure K times.")(func)


_SETTINGS = [f.name for f in fields(PruneSettings) if f.name != "ratio"]


def build_settings(kwargs: dict[str, Any], *, ratio: float) -> PruneSettings:
    """Pop the allocation and measurement options that a command has into settings (the
    others keep the fields' defaults)."""
    values = {name: kwargs.pop(name) for name in _SETTINGS if name in kwargs}
    overrides = values.pop("overrides", None)
    return PruneSettings(
        ratio=ratio, overrides=read_overrides(overrides) if overrides else {}, **values
    )


def build_output(kwargs: dict[str, Any]) -> OutputSpec:
    """Pop the options of what a prune writes."""
    return OutputSpec(
        path=kwargs.pop("output"),
        report=kwargs.pop("report"),
        plot=kwargs.pop("plot", None),
        storage=kwargs.pop("storage"),
        force=kwargs.pop("force"),
    )


def build_evaluation(kwargs: dict[str, Any]) -> EvalSpec:
    return EvalSpec(data=kwargs.pop("eval_data"), labels=kwargs.pop("labels"))


def parse_ratios(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"cannot read --ratio {text!r}", "e.g. --ratio 0.5,0.7,0.9") from None
    if not values:
        raise UserError("--ratio is empty", "e.g. --ratio 0.8")
    return values
