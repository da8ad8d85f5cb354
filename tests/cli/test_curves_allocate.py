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


COMMON = ("--synthetic", "12", "--levels", "11", "--no-progress")


def test_allocate_reproduces_prune_byte_for_byte(cnn_file: Path, tmp_path: Path) -> None:
    curves = tmp_path / "curves.json"
    code, text = run("curves", str(cnn_file), "-o", str(curves), *COMMON)
    assert code == 0, text
    saved = json.loads(curves.read_text())
    assert set(saved["curves"]) == {"w1", "w2", "w3", "w4"}
    assert saved["layers"]["w3"] == 16 * 288
    assert len(saved["model_fingerprint"]) == 64
    code, text = run(
        "prune",
        str(cnn_file),
        "--ratio",
        "0.7",
        "-o",
        str(tmp_path / "p.onnx"),
        "--no-cache",
        *COMMON,
    )
    assert code == 0, text
    code, text = run(
        "allocate",
        str(curves),
        "--model",
        str(cnn_file),
        "--ratio",
        "0.7",
        "-o",
        str(tmp_path / "a.onnx"),
        "--no-progress",
    )
    assert code == 0, text
    assert (tmp_path / "p.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


def test_allocate_many_ratios(cnn_file: Path, tmp_path: Path) -> None:
    curves = tmp_path / "curves.json"
    assert run("curves", str(cnn_file), "-o", str(curves), *COMMON[:2], "--levels", "21")[0] == 0
    code, text = run(
        "allocate",
        str(curves),
        "--model",
        str(cnn_file),
        "--ratio",
        "0.5,0.9",
        "-o",
        str(tmp_path / "out.onnx"),
    )
    assert code == 0, text
    sparsities = []
    for ratio in ("0.5", "0.9"):
        model = onnx.load_model(str(tmp_path / f"out.r{ratio}.onnx"))
        weights = [
            onnx.numpy_helper.to_array(t)
            for t in model.graph.initializer
            if t.name in {"w1", "w2", "w3", "w4"}
        ]
        sparsities.append(sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights))
    assert sparsities[0] >= 0.5 and sparsities[0] < 0.51
    assert sparsities[1] >= 0.9 and sparsities[1] < 0.91


def test_allocate_refuses_other_model(cnn_file: Path, tmp_path: Path) -> None:
    curves = tmp_path / "curves.json"
    assert run("curves", str(cnn_file), "-o", str(curves), *COMMON)[0] == 0
    other = tmp_path / "other.onnx"
    onnx.save_model(graphs.cnn(seed=1), str(other))
    code, text = run("allocate", str(curves), "--model", str(other), "--ratio", "0.5")
    assert code == 1 and "another model" in text
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, text = run("allocate", str(bad), "--model", str(cnn_file), "--ratio", "0.5")
    assert code == 1 and "not a curves file" in text


def test_flops_budget_and_constraints(cnn_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    overrides = tmp_path / "o.json"
    overrides.write_text(json.dumps({"w1": {"max_ratio": 0.5}, "w4": {"max_ratio": 0.3}}))
    code, text = run(
        "prune",
        str(cnn_file),
        "--ratio",
        "0.5",
        "--budget",
        "flops",
        "--overrides",
        str(overrides),
        "--max-layer-ratio",
        "0.9",
        "--report",
        str(report),
        "-o",
        str(tmp_path / "f.onnx"),
        *COMMON,
    )
    assert code == 0, text
    data = json.loads(report.read_text())
    ratios = {layer["name"]: layer["ratio"] for layer in data["layers"]}
    assert ratios["w1"] <= 0.5 and ratios["w4"] <= 0.3 and max(ratios.values()) <= 0.9
    # conv1 output 8x8 (64 MACs per weight), conv2 6x6 (36), Gemm/MatMul 1 per weight.
    costs = {"w1": 64, "w2": 36, "w3": 1, "w4": 1}
    sizes = {layer["name"]: layer["size"] for layer in data["layers"]}
    removed = sum(ratios[n] * sizes[n] * costs[n] for n in costs)
    total = sum(sizes[n] * costs[n] for n in costs)
    assert removed / total >= 0.5
    assert data["allocation"]["achieved_budget_ratio"] == pytest.approx(removed / total)


def test_infeasible_constraints_name_the_largest_ratio(cnn_file: Path) -> None:
    code, text = run("prune", str(cnn_file), "--ratio", "0.8", "--max-layer-ratio", "0.5", *COMMON)
    assert code == 1
    assert "largest feasible ratio" in text and "Traceback" not in text


def test_min_layer_ratio(cnn_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code, text = run(
        "prune",
        str(cnn_file),
        "--ratio",
        "0.5",
        "--min-layer-ratio",
        "0.3",
        "--method",
        "global",
        "--report",
        str(report),
        "-o",
        str(tmp_path / "m.onnx"),
        *COMMON,
    )
    assert code == 0, text
    data = json.loads(report.read_text())
    assert min(layer["ratio"] for layer in data["layers"]) >= 0.3 - 1e-9
    assert np.isclose(
        sum(layer["pruned"] for layer in data["layers"]),
        np.ceil(0.5 * sum(layer["size"] for layer in data["layers"])),
    )
