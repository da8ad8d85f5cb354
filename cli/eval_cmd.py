"""The ``eval`` and ``plot`` commands (registered on the group in :mod:`.main`)."""

from __future__ import annotations

from pathlib import Path

import click

from rdprune_onnx.evaluate import Evaluation, FileEvaluation, Latency, evaluate_files
from rdprune_onnx.files import RunFiles
from rdprune_onnx.plot import plot_result, read_report
from rdprune_onnx.report import to_json
from rdprune_onnx.runtime import PROVIDERS, user_model

from .render import table


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _files(count: int) -> str:
    return "" if count == 1 else f" in {count} files"


def show_eval(result: FileEvaluation) -> None:
    """Print the comparison in the order: files, outputs, accuracy, layers, latency."""
    _show_files(result)
    _show_outputs(result.evaluation)
    click.echo()
    _show_layers(result)
    _show_latency(result.latency)


def _show_files(result: FileEvaluation) -> None:
    click.echo(
        f"dense:  {result.dense.path}  ({_bytes(result.dense.bytes)}"
        f"{_files(len(result.dense.files))})"
    )
    click.echo(
        f"pruned: {result.pruned.path}  ({_bytes(result.pruned.bytes)}"
        f"{_files(len(result.pruned.files))}, {result.size_ratio:.2f}x the dense size)"
    )
    click.echo(
        f"data:   {result.data}, {result.evaluation.samples} samples, "
        f"batch size {result.batch_size}"
    )
    click.echo()


def _show_outputs(ev: Evaluation) -> None:
    rows = [
        (
            out.name,
            f"{out.mse:.4g}",
            f"{out.cosine:.5f}",
            "-" if out.top1_agreement is None else f"{out.top1_agreement:.2%}",
        )
        for out in ev.outputs
    ]
    click.echo(table(["output", "mse", "cosine", "top-1 agreement"], rows, "lrrr"))
    if ev.dense_accuracy is not None and ev.pruned_accuracy is not None:
        click.echo()
        click.echo(
            f"accuracy on {ev.accuracy_output}: dense {_pct(ev.dense_accuracy)}, "
            f"pruned {_pct(ev.pruned_accuracy)} "
            f"({(ev.pruned_accuracy - ev.dense_accuracy) * 100:+.2f} points)"
        )


def _show_layers(result: FileEvaluation) -> None:
    layer_rows = [
        (
            layer.name,
            "x".join(map(str, layer.shape)),
            f"{layer.size:,}",
            _pct(layer.dense_sparsity),
            _pct(layer.pruned_sparsity),
        )
        for layer in result.layers
    ]
    click.echo(
        table(["layer", "shape", "params", "dense zeros", "pruned zeros"], layer_rows, "llrrr")
    )
    click.echo()
    click.echo(
        f"{len(result.layers)} prunable layers, {result.weights:,} weights: "
        f"sparsity dense {_pct(result.dense_sparsity)}, pruned {_pct(result.pruned_sparsity)}"
        + (" (compact weights expanded)" if result.densified else "")
    )


def _show_latency(lat: Latency) -> None:
    click.echo(
        f"latency ({lat.provider}, batch of {lat.batch_size}, median of {lat.repeats} runs): "
        f"dense {lat.dense_ms:.3f} ms, pruned {lat.pruned_ms:.3f} ms, "
        f"pruned/dense {lat.ratio:.2f}"
        + (
            f" (middle half of the pairs {lat.ratio_low:.2f}-{lat.ratio_high:.2f}"
            + ("; within noise)" if lat.ratio_low <= 1 <= lat.ratio_high else ")")
            if lat.ratio_low == lat.ratio_low
            else ""
        )
    )


@click.command("eval")
@click.argument("dense", type=click.Path())
@click.argument("pruned", type=click.Path())
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    required=True,
    help=".npz with one array per model input (first axis = samples).",
)
@click.option("--labels", metavar="KEY", help="Array of class labels in --data (for accuracy).")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True)
@click.option("--batch-size", default=64, show_default=True, help="Samples per run.")
@click.option("--repeats", default=20, show_default=True, help="Timed runs of one batch per model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def eval_command(
    dense: str,
    pruned: str,
    data: str,
    labels: str | None,
    provider: str,
    batch_size: int,
    repeats: int,
    as_json: bool,
) -> None:
    """Compare PRUNED with its DENSE original: outputs, accuracy, sparsity, size, latency."""
    with user_model():
        result = evaluate_files(
            dense,
            pruned,
            data,
            labels=labels,
            provider=provider,
            batch_size=batch_size,
            repeats=repeats,
        )
    if as_json:
        click.echo(to_json(result.to_dict()))
    else:
        show_eval(result)


@click.command("plot")
@click.argument("report", type=click.Path())
@click.option(
    "-o", "--output", type=click.Path(), help="Image file (.png, .svg, .pdf) [REPORT.png]."
)
@click.option("--force", is_flag=True, help="Replace an existing image.")
def plot_command(report: str, output: str | None, force: bool) -> None:
    """Draw the layers' distortion curves and chosen ratios from a prune REPORT (JSON)."""
    out = Path(output) if output is not None else Path(report).with_suffix(".png")
    run = RunFiles(force=force)
    run.add_input(report, "report")
    run.claim(out, "plot")  # never the report (by path or hard link), nor a device
    written = plot_result(read_report(report), out, force=force, protect=run.protected())
    click.echo(f"wrote {written}")
