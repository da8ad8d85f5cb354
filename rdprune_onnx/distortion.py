"""Distortion metrics: how far a pruned model's outputs are from the dense model's.

All metrics are computed over the model's float outputs. ``mse`` is the mean over all
elements and samples of the squared error (the paper's default); ``worst`` is the per-sample
mean squared error, maximised over samples (the paper's worst-case curve). ``prob-mse`` and
``kl`` first turn each output's last axis into probabilities with a softmax; they are meant
for outputs that are class scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("mse", "worst", "prob-mse", "kl")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    result: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return result


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    result: np.ndarray = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return result


class DistortionMeter:
    """Accumulates one distortion value over batches of (reference, candidate) outputs."""

    def __init__(self, metric: str) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric}")
        self.metric = metric
        self.total = 0.0
        self.count = 0
        self.worst = 0.0

    def add(self, refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> None:
        batch = refs[0].shape[0] if refs and refs[0].ndim else 1
        per_sample = np.zeros(batch, dtype=np.float64)
        per_sample_count = 0
        for ref, out in zip(refs, outs, strict=True):
            if self.metric == "kl":
                p_log = _log_softmax(ref)
                q_log = _log_softmax(out)
                err = (np.exp(p_log) * (p_log - q_log)).sum(axis=-1, keepdims=True)
            elif self.metric == "prob-mse":
                err = (_softmax(ref) - _softmax(out)) ** 2
            else:
                err = (ref.astype(np.float64) - out.astype(np.float64)) ** 2
            self.total += float(err.sum())
            self.count += int(err.size)
            if err.ndim and err.shape[0] == batch:
                per_sample += err.reshape(batch, -1).sum(axis=1)
                per_sample_count += int(err[0].size) if batch else 0
        if per_sample_count and batch:
            self.worst = max(self.worst, float((per_sample / per_sample_count).max()))

    def value(self) -> float:
        if self.metric == "worst":
            return self.worst
        return self.total / self.count if self.count else 0.0


def class_score_problem(value: np.ndarray) -> str | None:
    """Why an output is not class scores (logits), or None when it looks like them.

    Class scores have a class axis last (at least two classes), and their rows are neither
    unit-norm embeddings nor probabilities already.
    """
    if value.dtype.kind != "f":
        return "it is not a float tensor"
    if value.ndim < 2 or value.shape[-1] < 2:
        return "it has no class axis (rank < 2 or a last axis of size 1)"
    rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
    if np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3):
        return "its rows are unit-norm embeddings, not class scores"
    if (rows >= 0).all() and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3):
        return "it already holds probabilities"
    return None


def check_metric(metric: str, names: Sequence[str], outputs: Sequence[np.ndarray]) -> None:
    """Refuse softmax-based metrics on outputs that are not class scores.

    ``prob-mse`` and ``kl`` apply a softmax over the last axis, which only makes sense for
    logits.
    """
    from rdprune_onnx.errors import UserError

    if metric not in ("prob-mse", "kl"):
        return
    for name, value in zip(names, outputs, strict=True):
        reason = class_score_problem(value)
        if reason is not None:
            raise UserError(
                f"--metric {metric} needs class scores (logits), but output {name!r}: {reason}",
                "use --metric mse or worst",
            )
