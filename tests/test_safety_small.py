"""The smaller items of issue 12, each with its test."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from rdprune_onnx.errors import UserError
from rdprune_onnx.masks import apply_mask
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, measure, prune, prune_from_curves
from rdprune_onnx_cli.main import cli
from tests import graphs

SPEC = CalibrationSpec(synthetic=8)


def _save(model: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> Path:
    path = tmp_path / name
    onnx.save_model(model, str(path))
    return path


def test_nan_weight_is_blamed_on_the_weight(tmp_path: Path) -> None:
    model = graphs.cnn()
    w = numpy_helper.to_array(model.graph.initializer[2]).copy()
    w.reshape(-1)[5] = np.nan
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[2].name))
    path = _save(model, tmp_path)
    with pytest.raises(UserError, match=r"weight 'w2' holds 1 NaN") as info:
        prune(path, PruneSettings(0.5, levels=5), SPEC, write=False)
    assert "calibration" not in str(info.value)


def test_patterns_matching_nothing_are_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _save(graphs.cnn(), tmp_path)
    with caplog.at_level(logging.WARNING):
        prune(path, PruneSettings(0.5, levels=5, exclude=["conv*"]), SPEC, write=False)
    assert any("'conv*' matches no prunable layer" in r.message for r in caplog.records)


def test_already_sparser_than_the_target_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = graphs.cnn()
    for tensor in model.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if w.ndim >= 2:
            tensor.CopyFrom(numpy_helper.from_array(apply_mask(w, int(0.8 * w.size)), tensor.name))
    path = _save(model, tmp_path)
    with caplog.at_level(logging.WARNING):
        result = prune(path, PruneSettings(0.5, levels=5), SPEC, write=False)
    assert result.achieved_ratio > 0.79
    assert any("already sparser than --ratio 0.5" in r.message for r in caplog.records)


def test_a_json_named_output_is_still_protobuf(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _save(graphs.cnn(), tmp_path)
    with caplog.at_level(logging.WARNING):
        prune(path, PruneSettings(0.5, levels=5), SPEC, output=tmp_path / "out.json")
    onnx.load_model(str(tmp_path / "out.json"), format="protobuf")  # not JSON text
    assert any("does not end in .onnx" in r.message for r in caplog.records)


def test_flops_budget_without_data_uses_batch_one(tmp_path: Path) -> None:
    """graphs.cnn's only dynamic axis is the batch: MACs per sample need no data."""
    path = _save(graphs.cnn(), tmp_path)
    curves = tmp_path / "c.json"
    measure(path, PruneSettings(0.5, levels=5), SPEC, output=curves)
    result = prune_from_curves(
        curves, path, PruneSettings(0.5, levels=5, budget="flops"), write=False
    )
    assert result.allocation_info["budget"] == "flops"
    out = CliRunner().invoke(
        cli, ["allocate", str(curves), "--model", str(path), "--ratio", "0.5", "-o",
              str(tmp_path / "o.onnx")]
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "no calibration data (saved curves; nothing measured)" in out.output
    assert "0 calibration samples" not in out.output


def test_an_all_zero_layer_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It used to be given a "min_ratio 1" the user never set, and the rd allocator failed."""
    model = graphs.cnn()
    tensor = model.graph.initializer[2]
    zeros = np.zeros_like(numpy_helper.to_array(tensor))
    tensor.CopyFrom(numpy_helper.from_array(zeros, tensor.name))
    path = _save(model, tmp_path)
    with caplog.at_level(logging.WARNING):
        result = prune(path, PruneSettings(0.5, levels=5), SPEC, write=False)
    assert "w2" not in {layer.name for layer in result.layers}
    assert any("all zeros already" in r.message and "w2" in r.message for r in caplog.records)


def test_inspect_names_the_gru_weights(tmp_path: Path) -> None:
    from tests.graphs_safety import gru

    path = _save(gru(), tmp_path)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "GRU" in line]
    assert len(lines) == 3 and len(set(lines)) == 3
    for role in ("W (input weights)", "R (recurrence weights)", "B (biases)"):
        assert sum(role in line for line in lines) == 1, result.output


def test_zipmap_output_gets_the_skl2onnx_hint(tmp_path: Path) -> None:
    from tests.graphs_safety import zipmap

    path = _save(zipmap(), tmp_path)
    with pytest.raises(UserError, match="ZipMap") as info:
        prune(path, PruneSettings(0.5, levels=5), SPEC, write=False)
    assert "zipmap" in str(info.value) and "False" in str(info.value)


def test_plot_labels_never_clash() -> None:
    from rdprune_onnx.plot import short_name, short_names

    names = [
        "encoder.layer.0.attention.output.dense.weight_quantized",
        "encoder.layer.0.attention.self.dense.weight_quantized",
        "short",
    ]
    assert short_name(names[0], 20) == short_name(names[1], 20)  # the old clash
    labels = short_names(names, 20)
    assert len(set(labels)) == 3 and labels[2] == "short"
    assert all(len(label) <= 20 for label in labels)


def test_eval_latency_reports_the_spread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pruned/dense ratios of interleaved pairs that straddle 1 are called noise."""
    import rdprune_onnx.evaluate as ev

    def fake(*args: object, **kwargs: object) -> tuple[list[float], list[float]]:
        return [1.0, 1.0, 1.0, 1.0], [0.8, 0.9, 1.1, 1.2]

    monkeypatch.setattr(ev, "measure_latency", fake)
    dense = _save(graphs.cnn(), tmp_path, "d.onnx")
    pruned = _save(graphs.cnn(), tmp_path, "p.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    result = CliRunner().invoke(cli, ["eval", str(dense), str(pruned), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "middle half of the pairs 0.88-1.12; within noise" in result.output, result.output
