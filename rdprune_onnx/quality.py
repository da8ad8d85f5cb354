"""Task metrics on held-out data: how good a pruned model is, next to its dense original.

A quality metric scores the dense model and the pruned model on the same inputs, on a
higher-is-better scale; the *drop* is ``dense - pruned``. Built in:

* ``accuracy``: top-1 accuracy against labels, on the first class-score output;
* ``agreement``: top-1 agreement of the pruned model with the dense one (dense scores 1);
* ``cosine``: mean cosine similarity of the outputs with the dense ones, averaged over the
  float outputs (dense scores 1). The one for embeddings.

From Python a *user metric* may be given instead: a callable ``f(dense_outputs,
pruned_outputs) -> float`` (higher is better; each argument maps output names to arrays
over all samples). The dense score is ``f(dense, dense)``, the pruned one ``f(dense, pruned)``,
so a metric that ignores its first argument (say, recall@1 of the pruned embeddings against
labels captured in a closure) works as well as one that compares the two.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from rdprune_onnx.errors import UserError
from rdprune_onnx.evaluate import Evaluation, compare_outputs

log = logging.getLogger(__name__)

Outputs = Mapping[str, np.ndarray]
UserMetric = Callable[[Outputs, Outputs], float]
QualityMetric = str | UserMetric

QUALITY_METRICS: tuple[str, ...] = ("accuracy", "agreement", "cosine")


@dataclass(frozen=True)
class Quality:
    """One metric for the dense and the pruned model (higher is better)."""

    metric: str
    dense: float
    pruned: float

    @property
    def drop(self) -> float:
        return self.dense - self.pruned

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "dense": self.dense,
            "pruned": self.pruned,
            "drop": self.drop,
        }


def metric_name(metric: QualityMetric) -> str:
    if isinstance(metric, str):
        return metric
    return getattr(metric, "__name__", None) or type(metric).__name__


def choose_metric(
    metric: QualityMetric | None, labels: np.ndarray | None, dense: Outputs
) -> QualityMetric:
    """The metric to use: the given one, checked, or a default for the data.

    Default: ``accuracy`` with labels; else ``agreement`` when an output looks like class
    scores; else ``cosine``.
    """
    scores = compare_outputs(dense, dense, _samples(dense))
    has_classes = any(o.top1_agreement is not None for o in scores.outputs)
    if metric is None:
        if labels is not None and has_classes:
            return "accuracy"
        if labels is not None:
            log.warning("labels given, but no output looks like class scores: using cosine")
        return "agreement" if has_classes else "cosine"
    if callable(metric):
        return metric
    if metric not in QUALITY_METRICS:
        raise UserError(
            f"unknown quality metric {metric!r}", f"choose one of {', '.join(QUALITY_METRICS)}"
        )
    if metric == "accuracy" and labels is None:
        raise UserError(
            "--quality-metric accuracy needs labels",
            "pass --labels KEY (an array of class indices in --eval-data), or use agreement",
        )
    if metric in ("accuracy", "agreement") and not has_classes:
        raise UserError(
            f"--quality-metric {metric} needs a class-score output (rank >= 2, classes last); "
            "the model has none",
            "use --quality-metric cosine",
        )
    if not scores.outputs:
        raise UserError("the model has no float output to compare", "")
    return metric


def _samples(outputs: Outputs) -> int:
    first = next(iter(outputs.values()))
    return int(first.shape[0]) if first.ndim else 1


def score(
    metric: QualityMetric,
    dense: Outputs,
    pruned: Outputs,
    labels: np.ndarray | None = None,
) -> tuple[Quality, Evaluation]:
    """The metric for both models, and the full output comparison (for reports)."""
    evaluation = compare_outputs(dense, pruned, _samples(dense), labels)
    name = metric_name(metric)
    if callable(metric):
        values = (float(metric(dense, dense)), float(metric(dense, pruned)))
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"the quality metric {name} returned {values}", "return a finite float")
        return Quality(name, *values), evaluation
    if metric == "accuracy":
        if evaluation.dense_accuracy is None or evaluation.pruned_accuracy is None:
            raise UserError("no accuracy: the model has no class-score output", "use cosine")
        return Quality(metric, evaluation.dense_accuracy, evaluation.pruned_accuracy), evaluation
    if metric == "agreement":
        agreement = next(
            (o.top1_agreement for o in evaluation.outputs if o.top1_agreement is not None), None
        )
        if agreement is None:
            raise UserError("no top-1 agreement: the model has no class-score output", "")
        return Quality(metric, 1.0, agreement), evaluation
    names = [o.name for o in evaluation.outputs]
    cosines = [cosine(dense[name], pruned[name]) for name in names]
    return Quality(metric, 1.0, float(np.mean(cosines))), evaluation


def cosine(dense: np.ndarray, pruned: np.ndarray) -> float:
    """Mean over samples of the cosine similarity of the flattened outputs.

    A pruned output that collapsed to zeros scores 0 against a non-zero dense one (not 1);
    two zero outputs score 1.
    """
    a = dense.reshape(dense.shape[0], -1) if dense.ndim else dense.reshape(1, 1)
    b = pruned.reshape(pruned.shape[0], -1) if pruned.ndim else pruned.reshape(1, 1)
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    den = na * nb
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)
    return float(np.where(both_zero, 1.0, cos).mean())


__all__ = [
    "QUALITY_METRICS",
    "Outputs",
    "Quality",
    "QualityMetric",
    "UserMetric",
    "choose_metric",
    "cosine",
    "metric_name",
    "score",
]
