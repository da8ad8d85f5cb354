"""The ``rdprune-onnx`` command line: a thin layer over the library."""

from __future__ import annotations

import logging
from typing import Any

import click

from rdprune_onnx import UserError, inspect_model, prune
from rdprune_onnx.allocate import METHODS
from rdprune_onnx.cache import default_cache_dir
from rdprune_onnx.distortion import METRICS
from rdprune_onnx.pipeline import PruneSettings
from rdprune_onnx.report import to_json
from rdprune_onnx.runtime import PROVIDERS

from .options import build_calibration, calibration_options
from .render import show_prune, show_summary


class _UsageError(click.UsageError):
    exit_code = 1


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
            raise _UsageError(exc.message, exc.ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None
        except click.UsageError as exc:
            if exc.exit_code == 1:
                raise
            raise _UsageError(exc.message, exc.ctx) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rdprune-onnx")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
def cli(verbose: bool) -> None:
    """Prune ONNX model weights with rate-distortion layer-adaptive allocation."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@cli.command("inspect")
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_command(model: str, as_json: bool) -> None:
    """List the layers of MODEL, prunable or not (and why)."""
    summary = inspect_model(model)
    if as_json:
        click.echo(to_json(summary.to_dict()))
    else:
        show_summary(summary)


@cli.command("prune")
@click.argument("model", type=click.Path())
@click.option("--ratio", type=float, required=True, help="Fraction of prunable weights to zero.")
@click.option("-o", "--output", type=click.Path(), help="Output file [MODEL.pruned.onnx].")
@click.option("--method", type=click.Choice(METHODS), default="rd", show_default=True)
@click.option("--metric", type=click.Choice(METRICS), default="mse", show_default=True)
@click.option("--levels", default=101, show_default=True, help="Grid points from 0 to 1.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True)
@click.option("--steps", default=1, show_default=True, help="Iterative rd: re-measure K times.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Keep matching layers dense.")
@click.option(
    "--allow-layer-removal", is_flag=True, help="Let the allocator prune a layer entirely."
)
@calibration_options
@click.option("--eval-data", type=click.Path(), help="Labelled .npz to compare dense vs pruned.")
@click.option("--labels", metavar="KEY", help="Array of labels in --eval-data.")
@click.option("--report", type=click.Path(), help="Write a JSON report here.")
@click.option("--force", is_flag=True, help="Replace existing output and report files.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Where measured curves are kept for reuse and resume [$RDPRUNE_CACHE_DIR or "
    "~/.cache/rdprune-onnx].",
)
@click.option("--no-cache", is_flag=True, help="Neither read nor write the curve cache.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def prune_command(model: str, **kwargs: Any) -> None:
    """Prune MODEL to --ratio and write the sparsified ONNX file."""
    calibration = build_calibration(kwargs)
    settings = PruneSettings(
        ratio=kwargs.pop("ratio"),
        method=kwargs.pop("method"),
        metric=kwargs.pop("metric"),
        levels=kwargs.pop("levels"),
        provider=kwargs.pop("provider"),
        exclude=kwargs.pop("exclude"),
        allow_layer_removal=kwargs.pop("allow_layer_removal"),
        steps=kwargs.pop("steps"),
    )
    progress = not kwargs.pop("no_progress")
    cache_dir = kwargs.pop("cache_dir") or default_cache_dir()
    if kwargs.pop("no_cache"):
        cache_dir = None
    show_prune(
        prune(model, settings, calibration, progress=progress, cache_dir=cache_dir, **kwargs)
    )


def main() -> None:
    cli(prog_name="rdprune-onnx")


if __name__ == "__main__":
    main()
