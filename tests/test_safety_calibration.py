"""Calibration sanity (issue 12, item 6): data that cannot measure anything is refused or
warned about; layers whose whole curve is zero are named and held back."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rdprune_onnx.errors import UserError
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, prune
from rdprune_onnx_cli.main import cli
from tests import graphs
from tests.graphs_safety import dead_output, two_modes


def _save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    return path


def test_all_constant_data_is_refused(tmp_path: Path) -> None:
    model = _save(graphs.cnn(), tmp_path)
    data = tmp_path / "zeros.npz"
    np.savez(data, x=np.zeros((8, 3, 8, 8), np.float32))
    result = CliRunner().invoke(
        cli, ["prune", str(model), "--ratio", "0.5", "--data", str(data), "--no-cache"]
    )
    assert result.exit_code == 1 and "constant" in result.output, result.output
    assert not (tmp_path / "m.pruned.onnx").exists()


def test_constant_reference_output_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every sample the same (values vary inside a sample): the output is constant."""
    model = _save(graphs.cnn(), tmp_path)
    row = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    data = tmp_path / "same.npz"
    np.savez(data, x=np.repeat(row, 8, axis=0))
    with caplog.at_level(logging.WARNING):
        prune(model, PruneSettings(0.5, levels=5), CalibrationSpec(data=data), write=False)
    assert any(
        "one constant value on every calibration sample" in r.message for r in caplog.records
    )


def _ratios(result: object) -> dict[str, float]:
    return {layer.name: layer.ratio for layer in result.layers}  # type: ignore[attr-defined]


def test_unused_branch_is_kept_at_the_median_unless_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _save(two_modes(), tmp_path)
    spec = CalibrationSpec(synthetic=16, input_values={"mode": 1.0})
    with caplog.at_level(logging.WARNING):
        held = prune(model, PruneSettings(0.5, levels=21), spec, write=False)
    ratios = _ratios(held)
    assert held.allocation_info["unused_layers"] == {"layers": ["wb"], "pruned_freely": False}
    assert ratios["wb"] <= max(ratios["wa"], ratios["wc"]) + 1e-9
    assert any("wb" in r.message and "median" in r.message for r in caplog.records)
    free = prune(model, PruneSettings(0.5, levels=21, prune_unused_layers=True), spec, write=False)
    assert free.allocation_info["unused_layers"]["pruned_freely"] is True
    assert _ratios(free)["wb"] > ratios["wb"]


def test_input_value_fixes_a_synthetic_input_from_the_command_line(tmp_path: Path) -> None:
    model = _save(two_modes(), tmp_path)
    args = ["prune", str(model), "--ratio", "0.5", "--synthetic", "8", "--levels", "5"]
    result = CliRunner().invoke(cli, [*args, "--input-value", "mode=1", "--no-cache"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(cli, [*args, "--input-value", "mode", "--no-cache"])
    assert bad.exit_code == 1 and "NAME=VALUE" in bad.output
    with pytest.raises(UserError, match="no input named"):
        prune(
            model,
            PruneSettings(0.5),
            CalibrationSpec(synthetic=4, input_values={"nope": 1.0}),
            write=False,
        )


def test_zero_predicted_distortion_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _save(dead_output(), tmp_path)
    with caplog.at_level(logging.WARNING):
        prune(model, PruneSettings(0.5, levels=5), CalibrationSpec(synthetic=8), write=False)
    messages = " ".join(r.message for r in caplog.records)
    assert "predicted distortion is exactly 0" in messages
    assert "zero curve" in messages and "w" in messages
