"""The ``eval`` and ``plot`` commands, run through the real group class of the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rdprune_onnx_cli.eval_cmd import eval_command, plot_command
from rdprune_onnx_cli.main import _Group
from tests.graphs_eval import (
    LABELS,
    W1,
    W1_PRUNED,
    W2,
    X,
    needs_matplotlib,
    png_size,
    report,
    save,
    two_matmuls,
)

# The commands as the lead registers them: on a group that turns UserError into exit 1.
group = _Group(name="rdprune-onnx", commands=[eval_command, plot_command])


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(group, list(args))
    return result.exit_code, result.output


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str, str]:
    dense = save(two_matmuls(W1, W2), tmp_path / "dense.onnx")
    pruned = save(two_matmuls(W1_PRUNED, W2), tmp_path / "pruned.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=X, label=LABELS)
    return str(dense), str(pruned), str(data)


def test_eval_table(files: tuple[str, str, str]) -> None:
    dense, pruned, data = files
    code, out = run("eval", dense, pruned, "--data", data, "--labels", "label", "--repeats", "3")
    assert code == 0, out
    assert "output" in out and "mse" in out and "cosine" in out
    assert "25.00%" in out  # top-1 agreement
    assert "dense 50.00%, pruned 75.00%" in out
    assert "w1" in out and "w2" in out
    assert "sparsity dense 25.00%, pruned 37.50%" in out
    assert "latency (cpu" in out and "pruned/dense" in out


def test_eval_json(files: tuple[str, str, str]) -> None:
    dense, pruned, data = files
    code, out = run(
        "eval", dense, pruned, "--data", data, "--labels", "label", "--json", "--provider", "cpu"
    )
    assert code == 0, out
    result = json.loads(out)
    assert result["evaluation"]["outputs"][0]["mse"] == pytest.approx(6.0)
    assert result["evaluation"]["dense_accuracy"] == pytest.approx(0.5)
    assert result["sparsity"]["pruned"] == pytest.approx(3 / 8)
    assert result["latency"]["repeats"] == 20
    assert result["latency"]["dense_ms"] > 0 and result["latency"]["pruned_ms"] > 0
    assert result["provider"] == "cpu"


def test_eval_errors_exit_1_without_traceback(files: tuple[str, str, str]) -> None:
    dense, pruned, data = files
    code, out = run("eval", dense, pruned, "--data", data, "--labels", "nope")
    assert code == 1
    assert out.startswith("Error: ") and "'nope'" in out
    assert "Traceback" not in out
    code, out = run("eval", dense, pruned)  # --data is required: a usage error, also exit 1
    assert code == 1 and out.startswith("Error: ") and "Traceback" not in out


@needs_matplotlib
def test_plot_command(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report(7)))
    code, out = run("plot", str(path), "-o", str(tmp_path / "fig.png"))
    assert code == 0, out
    assert png_size(tmp_path / "fig.png") == (1200, 900)
    code, out = run("plot", str(path))  # default: the report's name with .png
    assert code == 0, out
    assert (tmp_path / "report.png").stat().st_size > 0


@needs_matplotlib
def test_plot_errors(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report(3)))
    (tmp_path / "fig.png").write_bytes(b"x")
    code, out = run("plot", str(path), "-o", str(tmp_path / "fig.png"))
    assert code == 1 and "already exists" in out and "Traceback" not in out
    code, out = run("plot", str(path), "-o", str(tmp_path / "fig.png"), "--force")
    assert code == 0, out
    code, out = run("plot", str(path), "-o", str(path), "--force")
    assert code == 1 and "overwrite the report" in out
    code, out = run("plot", str(tmp_path / "missing.json"))
    assert code == 1 and "does not exist" in out
