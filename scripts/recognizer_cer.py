"""Character error rate of a CTC text-line recognizer (numpy + onnxruntime, no torch).

The recognizer (``models/recognizer.onnx``, built by ``models/train_recognizer.py``) maps an
image batch (N, 1, H, W) to per-time-step class scores (N, T, C); class 0 is the CTC blank.
Greedy decoding takes the best class at each step, merges repeats and drops blanks; the
character error rate is the total Levenshtein distance between decoded and true label
sequences over the total true length (so one wrong character in the whole set is
1 / total characters, and one wrong line changes it by at most its length over that total).

The test set (``models/recognizer_test.npz``) holds ``input`` (N, 1, H, W) float32,
``label`` (N, L) int32 padded with 0 (the blank, never a character) and ``label_length``
(N,) int32.

    python scripts/recognizer_cer.py models/recognizer.onnx models/recognizer_test.npz
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

BLANK = 0


def greedy_decode(scores: np.ndarray, blank: int = BLANK) -> list[list[int]]:
    """Best path per sample of (N, T, C) scores: argmax, merge repeats, drop blanks."""
    if scores.ndim != 3:
        raise ValueError(f"expected (N, T, C) scores, got shape {scores.shape}")
    best = scores.argmax(axis=-1)
    decoded = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        decoded.append([int(c) for c in row[keep] if c != blank])
    return decoded


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance (unit cost insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def labels_of(label: np.ndarray, length: np.ndarray) -> list[list[int]]:
    return [[int(c) for c in row[:n]] for row, n in zip(label, length, strict=True)]


def cer_of(decoded: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> float:
    """Total edit distance over total true length."""
    errors = sum(edit_distance(d, t) for d, t in zip(decoded, truth, strict=True))
    total = sum(len(t) for t in truth)
    return errors / total if total else 0.0


def predict(model_path: str | os.PathLike[str], inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    """The model's (N, T, C) output on ``inputs`` with ONNX Runtime on the CPU, one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [
        session.run(None, {name: inputs[i : i + batch]})[0] for i in range(0, len(inputs), batch)
    ]
    return np.concatenate(parts)


def cer(model_path: str | os.PathLike[str], test_npz: str | os.PathLike[str]) -> float:
    """Character error rate of ``model_path`` on ``test_npz`` (greedy CTC decoding)."""
    with np.load(test_npz) as data:
        inputs, label, length = data["input"], data["label"], data["label_length"]
    return cer_of(greedy_decode(predict(model_path, inputs)), labels_of(label, length))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="+", help="one or more .onnx recognizers")
    parser.add_argument("test", help="test .npz (input, label, label_length)")
    args = parser.parse_args(argv)
    with np.load(args.test) as data:
        chars = int(data["label_length"].sum())
    for path in args.model:
        print(f"{path}: CER {cer(path, args.test):.4f}  ({chars} characters)")


if __name__ == "__main__":
    main()
