"""rdprune_onnx.report: JSON for reports (numpy values, NaN, tuples, sets), written through
the safe file writer; the prune report's fields, read back as written, byte for byte the
same for the same run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from rdprune_onnx import files
from rdprune_onnx.errors import UserError
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.report import to_json, write_json
from tests import graphs


def test_numpy_values_become_plain_json() -> None:
    obj = {
        "array": np.arange(6, dtype=np.int64).reshape(2, 3),
        "float32": np.float32(0.5),
        "int64": np.int64(7),
        "bool": np.bool_(True),
        "scalar_array": np.array(2.25),
        "tuple": (1, 2),
        "nested": [{"shape": (3, 4)}],
        "path": Path("a") / "b.onnx",
    }
    assert json.loads(to_json(obj)) == {
        "array": [[0, 1, 2], [3, 4, 5]],
        "float32": 0.5,
        "int64": 7,
        "bool": True,
        "scalar_array": 2.25,
        "tuple": [1, 2],
        "nested": [{"shape": [3, 4]}],
        "path": str(Path("a") / "b.onnx"),
    }


def test_floats_round_trip_exactly_and_nan_is_kept() -> None:
    values = [0.1, 1 / 3, 1e-300, 2.0**-1074, 123456789.123456789, -0.0]
    back = json.loads(to_json({"v": values, "nan": float("nan"), "inf": -math.inf}))
    assert back["v"] == values and math.copysign(1, back["v"][-1]) == -1
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert "NaN" in to_json(float("nan"))  # a distortion that could not be measured


def test_the_text_keeps_the_key_order_and_is_indented() -> None:
    text = to_json({"b": 1, "a": {"d": [1, 2], "c": None}})
    assert (
        text
        == '{\n  "b": 1,\n  "a": {\n    "d": [\n      1,\n      2\n    ],\n    "c": null\n  }\n}'
    )


def test_equal_sets_are_written_the_same() -> None:
    first, second = {1, 9}, {9, 1}  # equal sets; 9 collides with 1 in the set's table
    assert first == second
    assert to_json({"layers": first}) == to_json({"layers": second})


# --- writing -----------------------------------------------------------------------------


def test_write_json_writes_the_text_and_a_newline(tmp_path: Path) -> None:
    obj = {"ratio": np.float64(0.7), "layers": [("w1", 3)]}
    path = write_json(obj, tmp_path / "r.json")
    assert path == tmp_path / "r.json"
    assert path.read_text() == to_json(obj) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no staging left


def test_write_json_refuses_what_it_must_not_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    with pytest.raises(UserError, match=r"report folder .* does not exist"):
        write_json({}, tmp_path / "missing" / "r.json")
    write_json({"run": 1}, target)
    with pytest.raises(UserError, match="exists") as caught:
        write_json({"run": 2}, target, label="curves file")
    assert "curves file" in str(caught.value) and "force" in caught.value.hint.lower()
    assert json.loads(target.read_text()) == {"run": 1}
    write_json({"run": 2}, target, force=True)
    assert json.loads(target.read_text()) == {"run": 2}
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    guard = [files.identity(model, "input model")]
    with pytest.raises(UserError, match="input model"):
        write_json({}, model, force=True, protect=guard)
    assert model.read_bytes() == b"model bytes"


# --- the prune report ---------------------------------------------------------------------

TOP = [
    "input",
    "output",
    "settings",
    "provider",
    "calibration_samples",
    "target_ratio",
    "achieved_ratio",
    "distortion",
    "layers",
    "skipped",
    "allocation",
    "curves",
    "evaluation",
    "search",
    "curve_points_measured",
    "curve_points_full_grid",
    "curve_grid",
    "timings_s",
    "versions",
]
LAYER = ["name", "op_types", "shape", "size", "pruned", "ratio", "sparsity_before", "predicted"]


def _without_timings(obj: Any) -> Any:
    """The report less what measures time (``*_s`` and ``seconds`` keys), which no two runs
    share."""
    if isinstance(obj, dict):
        timed = [k for k in obj if k.endswith("_s") or k == "seconds"]
        return {k: _without_timings(v) for k, v in obj.items() if k not in timed}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _prune_report(folder: Path, model: Path) -> tuple[Any, dict[str, Any]]:
    folder.mkdir()
    result = prune(
        model,
        PruneSettings(ratio=0.5, levels=5),
        CalibrationSpec(synthetic=8, seed=3),
        output=folder / "p.onnx",
        report=folder / "r.json",
        cache_dir=None,
    )
    return result, json.loads((folder / "r.json").read_text())


def test_the_prune_report_fields_and_round_trip(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(graphs.cnn(), str(model))
    result, report = _prune_report(tmp_path / "a", model)
    assert list(report) == TOP
    assert list(report["distortion"]) == [
        "metric",
        "predicted",
        "measured",
        "predicted_over_measured",
        "output_kinds",
    ]
    assert [layer["name"] for layer in report["layers"]] == ["w1", "w2", "w3", "w4"]
    for layer in report["layers"]:
        assert list(layer)[: len(LAYER)] == LAYER
    assert set(report["curves"]["w1"]) == {"ratios", "distortion"}
    assert report["input"] == str(model) and report["output"] == str(tmp_path / "a" / "p.onnx")
    assert report["settings"]["ratio"] == 0.5 and report["target_ratio"] == 0.5
    assert {"total"} <= set(report["timings_s"]) and "onnxruntime" in report["versions"]
    # The file holds what the result holds, numbers exactly.
    assert report == json.loads(to_json(result.to_dict()))
    assert report["achieved_ratio"] == result.achieved_ratio
    assert report["distortion"]["measured"] == result.measured_distortion
    # A second identical run: the same report but for the time taken, and the same bytes
    # once the times are left out.
    _, again = _prune_report(tmp_path / "b", model)
    again["output"] = report["output"]
    assert _without_timings(again) == _without_timings(report)
    write_json(_without_timings(report), tmp_path / "one.json")
    write_json(_without_timings(again), tmp_path / "two.json")
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
