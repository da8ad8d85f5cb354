"""The shipped CTC text-line recognizer and its CER evaluation (scripts/recognizer_cer.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from rdprune_onnx.graph.activation import output_activation

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@pytest.fixture(scope="module")
def cer_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "recognizer_cer", ROOT / "scripts" / "recognizer_cer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("recognizer_cer", module)
    spec.loader.exec_module(module)
    return module


def _one_hot(path: list[int], classes: int = 5) -> np.ndarray:
    scores = np.full((len(path), classes), 0.01)
    scores[np.arange(len(path)), path] = 0.9
    return scores


def test_greedy_decoding(cer_module: ModuleType) -> None:
    # Repeats merge, blanks (0) go, and a blank between two equal characters keeps both.
    paths = [[1, 1, 0, 2, 2, 2, 0, 0], [3, 0, 3, 3, 0, 1, 0, 4], [0] * 8]
    scores = np.stack([_one_hot(p) for p in paths])
    assert cer_module.greedy_decode(scores) == [[1, 2], [3, 3, 1, 4], []]
    with pytest.raises(ValueError, match=r"\(N, T, C\)"):
        cer_module.greedy_decode(scores[0])


def test_edit_distance_and_cer(cer_module: ModuleType) -> None:
    distance = cer_module.edit_distance
    assert distance([], []) == 0
    assert distance([1, 2, 3], []) == 3
    assert distance([], [4, 4]) == 2
    word = [ord(c) for c in "kitten"]
    assert distance(word, [ord(c) for c in "sitting"]) == 3  # 2 substitutions, 1 insertion
    assert distance([1, 2, 3, 4], [1, 3, 4]) == 1
    assert distance([1, 2], [2, 1]) == 2
    # Over the total true length: (1 + 0) / (3 + 2).
    assert cer_module.cer_of([[1, 2], [5, 6]], [[1, 2, 3], [5, 6]]) == pytest.approx(0.2)
    label = np.array([[1, 2, 3, 0], [5, 6, 0, 0]])
    assert cer_module.labels_of(label, np.array([3, 2])) == [[1, 2, 3], [5, 6]]


def test_shipped_recognizer(cer_module: ModuleType) -> None:
    """Unfolded BatchNormalization, a final Softmax, and the recorded dense CER."""
    meta = json.loads((MODELS / "recognizer.json").read_text())
    model = onnx.load(str(MODELS / "recognizer.onnx"))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("BatchNormalization") == meta["batch_normalization_nodes"] > 0
    assert ops.count("Conv") >= 9 and ops.count("MatMul") >= 6
    assert output_activation(model, "probs") == ("probs", -1)
    test = MODELS / "recognizer_test.npz"
    with np.load(test) as data:
        assert int(data["label_length"].sum()) == meta["test_characters"]
        calib = np.load(MODELS / "recognizer_calib.npz")["image"]
        assert calib.shape[1:] == data["input"].shape[1:] == (1, 32, 128)
    dense = cer_module.cer(MODELS / "recognizer.onnx", test)
    assert dense == pytest.approx(meta["dense_cer_onnxruntime"], abs=1e-12)
    assert dense < 0.1
