from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from rdprune_onnx_cli.main import cli
from tests.graphs_outputs import head

COMMON = ("--synthetic", "8", "--levels", "11", "--no-progress", "--no-cache")


@pytest.fixture
def softmax_file(tmp_path: Path) -> Path:
    path = tmp_path / "head.onnx"
    onnx.save_model(head("softmax_transpose"), str(path))
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(("flag", "kind"), [("auto", "probs"), ("logits", "logits")])
def test_prune_output_kind(softmax_file: Path, tmp_path: Path, flag: str, kind: str) -> None:
    report = tmp_path / "r.json"
    code, text = run(
        "prune", str(softmax_file), "--ratio", "0.5", "--metric", "kl", "--output-kind", flag,
        "-o", str(tmp_path / "p.onnx"), "--report", str(report), *COMMON,
    )  # fmt: skip
    assert code == 0, text
    assert json.loads(report.read_text())["distortion"]["output_kinds"]["y"]["kind"] == kind


def test_curves_key_and_allocate(softmax_file: Path, tmp_path: Path) -> None:
    curves = tmp_path / "c.json"
    code, text = run("curves", str(softmax_file), "--metric", "kl", "-o", str(curves), *COMMON)
    assert code == 0, text
    assert json.loads(curves.read_text())["settings"]["output_kinds"] == {"y": "probs@-1"}
    code, text = run(
        "allocate", str(curves), "--model", str(softmax_file), "--ratio", "0.5",
        "--output-kind", "probs", "-o", str(tmp_path / "a.onnx"), "--no-progress",
    )  # fmt: skip
    assert code == 0, text
    code, text = run("prune", str(softmax_file), "--ratio", "0.5", "--output-kind", "x", *COMMON)
    assert code != 0 and "output-kind" in text
