"""End to end on the shipped digits CNN, through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner

from rdprune_onnx_cli.main import cli

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_prune_shipped_model_reports_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "digits.pruned.onnx"
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        cli,
        [
            "prune",
            str(MODELS / "digits_cnn.onnx"),
            "--ratio",
            "0.8",
            "--data",
            str(MODELS / "digits_calib.npz"),
            "--eval-data",
            str(MODELS / "digits_test.npz"),
            "--labels",
            "label",
            "-o",
            str(out),
            "--report",
            str(report),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "accuracy on 450 samples" in result.output
    data = json.loads(report.read_text())
    evaluation = data["evaluation"]
    assert evaluation["dense_accuracy"] > 0.97
    # rd keeps the digits CNN useful at 80% sparsity (uniform falls to chance here).
    assert evaluation["pruned_accuracy"] > 0.9
    # The written file's prunable weights are 80% zeros, to the whole weight.
    model = onnx.load_model(str(out))
    names = {layer["name"] for layer in data["layers"]}
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names]
    total = sum(w.size for w in weights)
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights)
    assert zeros == int(np.ceil(0.8 * total))
    # It runs in ONNX Runtime and its accuracy is what the report says.
    test = np.load(MODELS / "digits_test.npz")
    session = ort.InferenceSession(out.read_bytes())
    logits = session.run(None, {"input": test["input"]})[0]
    accuracy = float(np.mean(logits.argmax(axis=1) == test["label"]))
    assert accuracy == evaluation["pruned_accuracy"]
