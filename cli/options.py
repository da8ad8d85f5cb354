"""Option groups shared by several commands; each builds one library object."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from rdprune_onnx.calibration import parse_input_ranges, parse_input_shapes
from rdprune_onnx.pipeline import CalibrationSpec

F = TypeVar("F", bound=Callable[..., Any])


def calibration_options(func: F) -> F:
    options = [
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
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_calibration(kwargs: dict[str, Any]) -> CalibrationSpec:
    return CalibrationSpec(
        data=kwargs.pop("data"),
        synthetic=kwargs.pop("synthetic"),
        input_shapes=parse_input_shapes(kwargs.pop("input_shapes")),
        input_ranges=parse_input_ranges(kwargs.pop("input_ranges")),
        batch_size=kwargs.pop("batch_size"),
        seed=kwargs.pop("seed"),
    )
