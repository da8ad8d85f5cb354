"""The ``rdprune-onnx`` command line: a thin layer over the library."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import click

from rdprune_onnx import InternalError, UserError, inspect_model
from rdprune_onnx.cache import default_cache_dir
from rdprune_onnx.job import check_targets
from rdprune_onnx.pipeline import DEFAULT_TARGETS, measure, prune, prune_from_curves
from rdprune_onnx.plot import plot_result
from rdprune_onnx.report import to_json
from rdprune_onnx.settings import OutputSpec, output_for_ratio

from . import interrupts
from .eval_cmd import eval_command, plot_command
from .options import (
    allocation_options,
    build_calibration,
    build_evaluation,
    build_output,
    build_settings,
    calibration_options,
    field_option,
    mask_options,
    measurement_options,
    output_kind_option,
    output_options,
    parse_ratios,
    refit_solver_option,
    setting,
    steps_option,
)
from .render import show_curves, show_prune, show_summary
from .sweep_cmd import build_target, show_search, sweep_command, target_options


class _UsageError(click.UsageError):
    """A usage mistake, shown as one line like every other bad input."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"Error: {self.format_message()}{hint}", err=True, file=file)


class _Group(click.Group):
    """Turns the library's UserError into click's one-line "Error: ..." with exit code 1.

    Usage mistakes (unknown option, missing argument) also exit with 1, like every other
    bad input; bugs keep their traceback.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if exc.exit_code == 1:
                raise
            raise _UsageError(exc.format_message(), exc.ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        with interrupts.handled():
            try:
                return super().invoke(ctx)
            except UserError as exc:
                raise click.ClickException(str(exc)) from None
            except click.UsageError as exc:
                if exc.exit_code == 1:
                    raise
                raise _UsageError(exc.format_message(), exc.ctx) from None
            except (click.exceptions.Exit, click.Abort, click.ClickException, SystemExit):
                raise
            except KeyboardInterrupt:
                interrupts.exit_interrupted()
            except InternalError as exc:  # a bug in a graph we built: its traceback is kept
                if interrupts.DEBUG:
                    raise
                interrupts.exit_internal_error(exc)
            except Exception as exc:  # a bug: ours to fix, not the user's
                if interrupts.DEBUG:
                    raise
                interrupts.exit_internal(exc)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rdprune-onnx")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
def cli(verbose: bool, debug: bool) -> None:
    """Prune ONNX model weights with rate-distortion layer-adaptive allocation."""
    interrupts.DEBUG = debug
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _cache_dir(kwargs: dict[str, Any]) -> Any:
    cache_dir = kwargs.pop("cache_dir") or default_cache_dir()
    cache = None if kwargs.pop("no_cache") else cache_dir
    interrupts.CACHE = cache  # named in the one line printed on Ctrl-C
    interrupts.MEASURES = True
    return cache


@cli.command("inspect")
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_command(model: str, as_json: bool) -> None:
    """List the layers of MODEL, prunable or not (and why)."""
    summary = inspect_model(model)
    click.echo(to_json(summary.to_dict()) if as_json else show_summary(summary))


@cli.command("prune")
@click.argument("model", type=click.Path())
@click.option("--ratio", type=float, help="Fraction of prunable weights to zero.")
@target_options
@click.option("-o", "--output", type=click.Path(), help="Output file [MODEL.pruned.onnx].")
@allocation_options
@mask_options
@measurement_options
@steps_option
@calibration_options
@output_options
@click.option("--plot", type=click.Path(dir_okay=False), help="Curves and ratios as a PNG.")
def prune_command(model: str, **kwargs: Any) -> None:
    """Prune MODEL to --ratio (or to a quality target) and write the sparsified ONNX file."""
    calibration = build_calibration(kwargs)
    ratio = kwargs.pop("ratio")
    evaluation = build_evaluation(kwargs)
    target = build_target(kwargs, ratio, evaluation)
    settings = build_settings(kwargs, ratio=0.5 if ratio is None else ratio)
    output = build_output(kwargs)
    progress = not kwargs.pop("no_progress")
    result = prune(
        model,
        settings,
        calibration,
        output=output,
        evaluation=evaluation,
        cache_dir=_cache_dir(kwargs),
        progress=progress,
        target=target,
    )
    if output.plot is not None:
        try:
            plot_result(result, output.plot, force=output.force)
        except BaseException:
            # All or nothing, as for the report: no model and report without their plot.
            for path in result.files:
                Path(path).unlink(missing_ok=True)
            raise
    click.echo(show_prune(result))
    if result.search is not None:
        click.echo(show_search(result.search))
    if output.plot is not None:
        click.echo(f"plotted {output.plot}")


@cli.command("curves")
@click.argument("model", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="Curves file (JSON).")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Layers not to measure.")
@click.option(
    "--ratio",
    "ratios",
    default=",".join(f"{r:g}" for r in DEFAULT_TARGETS),
    show_default=True,
    help="With --grid adaptive: the target ratios the curves are refined for.",
)
@measurement_options
@mask_options
@refit_solver_option("With --refit-curves: the solver of each point's refit.")
@calibration_options
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Curve cache folder.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the curve cache.")
@field_option(OutputSpec, "--force", is_flag=True, help="Replace an existing curves file.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def curves_command(model: str, **kwargs: Any) -> None:
    """Measure the rate-distortion curves of MODEL once, for `allocate` to reuse."""
    calibration = build_calibration(kwargs)
    settings = build_settings(kwargs, ratio=0.5)
    entry = measure(
        model,
        settings,
        calibration,
        targets=parse_ratios(kwargs.pop("ratios")),
        output=kwargs.pop("output"),
        force=kwargs.pop("force"),
        cache_dir=_cache_dir(kwargs),
        progress=not kwargs.pop("no_progress"),
    )
    click.echo(show_curves(entry))


@cli.command("allocate")
@click.argument("curves", type=click.Path())
@click.option("--model", "model", type=click.Path(), required=True, help="The measured model.")
@click.option("--ratio", "ratios", required=True, help="Target ratio, or several: 0.5,0.7,0.9.")
@click.option("-o", "--output", type=click.Path(), help="Output file [MODEL.pruned.onnx].")
@allocation_options
@mask_options
@setting("--metric", hidden=True)
@output_kind_option
@setting("--provider", help="For verification runs.")
@calibration_options
@output_options
def allocate_command(curves: str, model: str, ratios: str, **kwargs: Any) -> None:
    """Prune MODEL with saved CURVES, measuring nothing (one file per --ratio)."""
    calibration = build_calibration(kwargs)
    evaluation = build_evaluation(kwargs)
    values = parse_ratios(ratios)
    for unused in ("no_progress", "cache_dir", "no_cache"):
        kwargs.pop(unused)
    output = build_output(kwargs)
    plans = []
    for ratio in values:
        settings = build_settings(dict(kwargs), ratio=ratio)
        settings.check()
        plans.append((settings, _output_for(output, model, ratio, several=len(values) > 1)))
    # Every target checked before the first ratio runs; nothing left behind on a failure.
    check_targets(
        model,
        [target for _, target in plans],
        force=output.force,
        inputs={
            "curves file": curves,
            "calibration data": calibration.data,
            "evaluation data": evaluation.data,
        },
    )
    written: list[Path] = []
    try:
        for settings, target in plans:
            result = prune_from_curves(
                curves,
                model,
                settings,
                calibration=calibration,
                output=target,
                evaluation=evaluation,
            )
            written += [Path(path) for path in result.files]
            click.echo(show_prune(result))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _output_for(output: OutputSpec, model: str, ratio: float, *, several: bool) -> OutputSpec:
    """One ratio's outputs: with several ratios, ``out.onnx`` -> ``out.r0.7.onnx`` (and the
    same for the report)."""
    if not several:
        return output
    return dataclasses.replace(
        output,
        path=output_for_ratio(output.path or f"{model.removesuffix('.onnx')}.pruned.onnx", ratio),
        report=None if output.report is None else output_for_ratio(output.report, ratio),
    )


cli.add_command(eval_command)
cli.add_command(plot_command)
cli.add_command(sweep_command)


def main() -> None:
    cli(prog_name="rdprune-onnx")


if __name__ == "__main__":
    main()
