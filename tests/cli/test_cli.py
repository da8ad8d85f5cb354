from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rdprune_onnx_cli.main import cli
from tests import graphs


@pytest.fixture
def cnn_file(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save_model(graphs.cnn(), str(path))
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_inspect_table_and_json(cnn_file: Path) -> None:
    code, out = run("inspect", str(cnn_file))
    assert code == 0
    assert "w3" in out and "16x288" in out and "4 prunable layers" in out
    code, out = run("inspect", str(cnn_file), "--json")
    data = json.loads(out)
    assert data["prunable_weights"] == 8 * 27 + 8 * 18 + 16 * 288 + 160
    assert [r["layer"] for r in data["layers"]] == ["w1", "w2", "w3", "w4"]


def test_prune_writes_model_and_report(cnn_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.onnx"
    report = tmp_path / "r.json"
    code, text = run(
        "prune",
        str(cnn_file),
        "--ratio",
        "0.6",
        "--synthetic",
        "16",
        "--levels",
        "11",
        "-o",
        str(out),
        "--report",
        str(report),
        "--no-progress",
    )
    assert code == 0, text
    assert "predicted" in text and "measured" in text
    data = json.loads(report.read_text())
    assert data["achieved_ratio"] >= 0.6
    assert data["distortion"]["measured"] > 0
    assert {layer["name"] for layer in data["layers"]} == {"w1", "w2", "w3", "w4"}
    model = onnx.load_model(str(out))
    onnx.checker.check_model(model)
    zeros = sum(
        int(np.count_nonzero(onnx.numpy_helper.to_array(t) == 0))
        for t in model.graph.initializer
        if t.name in {"w1", "w2", "w3", "w4"}
    )
    assert zeros == data["layers"][0]["pruned"] + sum(
        layer["pruned"] for layer in data["layers"][1:]
    )


def test_default_output_name_and_force(cnn_file: Path) -> None:
    args = [
        "prune",
        str(cnn_file),
        "--ratio",
        "0.5",
        "--synthetic",
        "8",
        "--method",
        "uniform",
        "--no-progress",
    ]
    code, _ = run(*args)
    assert code == 0
    assert (cnn_file.parent / "cnn.pruned.onnx").is_file()
    code, text = run(*args)
    assert code == 1 and "already exists" in text and "--force" in text
    code, _ = run(*args, "--force")
    assert code == 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--ratio", "1.0", "--synthetic", "4"], "between 0 and 1"),
        (["--ratio", "0", "--synthetic", "4"], "between 0 and 1"),
        (["--ratio", "0.5"], "no calibration data"),
        (["--ratio", "0.5", "--data", "nope.npz"], "does not exist"),
        (["--ratio", "0.5", "--synthetic", "4", "--input-shape", "bad"], "NAME:DIMS"),
        (["--ratio", "0.5", "--synthetic", "4", "--exclude", "w*"], "no prunable layer"),
        (["--ratio", "0.5", "--synthetic", "4", "-o", "/nonexistent/x.onnx"], "does not exist"),
        (["--ratio", "0.5", "--bogus"], "No such option"),
    ],
)
def test_user_errors_are_one_line(cnn_file: Path, extra: list[str], needle: str) -> None:
    code, text = run("prune", str(cnn_file), *extra)
    assert code == 1
    assert needle in text
    assert "Traceback" not in text


def test_refuses_to_overwrite_input(cnn_file: Path) -> None:
    before = cnn_file.read_bytes()
    code, text = run(
        "prune",
        str(cnn_file),
        "--ratio",
        "0.5",
        "--synthetic",
        "4",
        "-o",
        str(cnn_file),
        "--force",
    )
    assert code == 1 and "overwrite the input" in text
    assert cnn_file.read_bytes() == before


def test_mismatched_data_lists_expected_inputs(cnn_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 3, 9, 9), np.float32))
    code, text = run("prune", str(cnn_file), "--ratio", "0.5", "--data", str(data))
    assert code == 1
    assert "x: float32[Nx3x8x8]" in text


def test_missing_and_corrupt_model(tmp_path: Path) -> None:
    code, text = run("inspect", str(tmp_path / "none.onnx"))
    assert code == 1 and "does not exist" in text
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage" * 100)
    code, text = run("inspect", str(bad))
    assert code == 1 and "Error:" in text and "Traceback" not in text
