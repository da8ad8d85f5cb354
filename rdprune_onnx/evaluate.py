"""Comparing a pruned model with its dense original on a data set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from rdprune_onnx.calibration import batches, sample_count
from rdprune_onnx.runtime import Session, SessionConfig


@dataclass
class OutputComparison:
    name: str
    mse: float
    cosine: float  # mean over samples of the cosine similarity of the flattened outputs
    top1_agreement: float | None  # for class-score-like outputs (rank >= 2, last axis > 1)


@dataclass
class Evaluation:
    samples: int
    outputs: list[OutputComparison]
    dense_accuracy: float | None = None
    pruned_accuracy: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "outputs": [vars(o) for o in self.outputs],
            "dense_accuracy": self.dense_accuracy,
            "pruned_accuracy": self.pruned_accuracy,
            **self.extra,
        }


def run_all(
    session: Session, data: Mapping[str, np.ndarray], batch_size: int
) -> dict[str, np.ndarray]:
    """Run every batch and concatenate each float output along the sample axis."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in session.output_names}
    for feeds in batches(data, batch_size):
        for name, value in zip(session.output_names, session.run(feeds), strict=True):
            parts[name].append(value)
    return {
        name: np.concatenate(values) if values[0].ndim else np.stack(values)
        for name, values in parts.items()
    }


def _is_class_scores(value: np.ndarray) -> bool:
    return value.dtype.kind == "f" and value.ndim >= 2 and value.shape[-1] > 1


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a2 = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim else a.reshape(1, 1)
    b2 = b.reshape(b.shape[0], -1).astype(np.float64) if b.ndim else b.reshape(1, 1)
    num = (a2 * b2).sum(axis=1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return float(cos.mean())


def compare(
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    batch_size: int = 64,
    config: SessionConfig | None = None,
) -> Evaluation:
    config = config or SessionConfig()
    dense_out = run_all(Session(dense, config), data, batch_size)
    pruned_out = run_all(Session(pruned, config), data, batch_size)
    comparisons = []
    for name, ref in dense_out.items():
        out = pruned_out[name]
        if ref.dtype.kind != "f":
            continue
        agreement = None
        if _is_class_scores(ref):
            agreement = float(np.mean(ref.argmax(axis=-1) == out.argmax(axis=-1)))
        mse = float(np.mean((ref.astype(np.float64) - out.astype(np.float64)) ** 2))
        comparisons.append(OutputComparison(name, mse, _cosine(ref, out), agreement))
    samples = sample_count(data)
    result = Evaluation(samples, comparisons)
    if labels is not None:
        first = next((v for v in dense_out.values() if _is_class_scores(v)), None)
        if first is not None:
            key = next(k for k, v in dense_out.items() if v is first)
            result.dense_accuracy = accuracy(dense_out[key], labels)
            result.pruned_accuracy = accuracy(pruned_out[key], labels)
    return result


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    predicted = scores.reshape(-1, scores.shape[-1]).argmax(axis=-1)
    return float(np.mean(predicted == labels.reshape(-1)))
