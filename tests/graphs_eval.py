"""Files the evaluate, plot and eval/plot command-line tests share: the hand case of
``evaluate`` (two MatMuls whose answers are known by hand) and report dicts to plot."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# The hand case: y = (x @ W1) @ W2 with W2 the identity, four samples, two classes.
W1 = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
W1_PRUNED = np.array([[1.0, 2.0], [3.0, 0.0]], np.float32)  # one weight of four zeroed
W2 = np.eye(2, dtype=np.float32)  # already half zeros in both files
X = np.array([[1, 0], [0, 1], [1, 1], [2, 1]], np.float32)
LABELS = np.array([1, 0, 0, 1], np.int64)


def two_matmuls(
    w1: np.ndarray, w2: np.ndarray, *, batch: int | str = "N", w1_name: str = "w1"
) -> onnx.ModelProto:
    k = w1.shape[0]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", w1_name], ["h"], name="mm1"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
        ],
        "two_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, w2.shape[1]])],
        [numpy_helper.from_array(w1, w1_name), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed"
)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, from its IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def report(n: int, *, curves: bool = True, seed: int = 0) -> dict[str, Any]:
    """A prune report with ``n`` layers (long, transformer-like names), as plots read it."""
    rng = np.random.default_rng(seed)
    ratios = np.linspace(0.0, 1.0, 11)
    layers, curve_map = [], {}
    for i in range(n):
        name = f"/encoder/layer.{i}/attention/output/dense/MatMul_weight"
        distortion = (10.0 ** rng.uniform(-6, -1)) * ratios**2
        ratio = float(rng.uniform(0.2, 0.95))
        layers.append(
            {"name": name, "size": int(rng.integers(100, 10**6)), "ratio": ratio, "predicted": 0.1}
        )
        curve_map[name] = {"ratios": ratios.tolist(), "distortion": distortion.tolist()}
    return {
        "layers": layers,
        "curves": curve_map if curves else None,
        "target_ratio": 0.7,
        "achieved_ratio": 0.7,
        "settings": {"method": "rd" if curves else "uniform", "metric": "mse"},
    }
