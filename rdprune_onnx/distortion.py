"""Distortion metrics: how far a pruned model's outputs are from the dense model's.

All metrics are computed over the model's float outputs. ``mse`` is the mean over all
elements and samples of the squared error (the paper's default); ``worst`` is the per-sample
mean squared error, maximised over samples (the paper's worst-case curve).

``kl`` (mean KL divergence per distribution, dense || pruned) and ``prob-mse`` (mean squared
error of the probabilities) depend on what each output holds, its KIND:

* ``logits``: class scores; a softmax over the class axis (the last) gives probabilities.
* ``probs``: probabilities already (a Softmax output): used as they are, never through a
  second softmax. KL is ``sum p log(p / max(q, PROB_EPS))`` over the class axis, terms with
  ``p == 0`` counting 0: a pruned model that gives a class less than ``PROB_EPS`` is charged
  as if it gave ``PROB_EPS`` (float32 softmax underflows to 0), so one term is at most
  ``p log(p / PROB_EPS)`` instead of infinite.
* ``log-probs``: LogSoftmax outputs; ``exp`` gives the probabilities, KL is exact.
* ``sigmoid``: independent probabilities; per element, the Bernoulli KL (``p`` and ``q``
  clipped to ``[PROB_EPS, 1 - PROB_EPS]``) or the squared error; each element counts as one
  distribution.
* ``embedding``: unit-norm feature rows; ``kl`` and ``prob-mse`` are refused.

A :class:`Metric` is a metric name that also carries each output's kind and class axis
(resolved by :func:`resolve_metric` from the graph, the data or the user's override), so that
it passes unchanged through code that only names the metric.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

METRICS = ("mse", "worst", "prob-mse", "kl")
PROB_METRICS = ("prob-mse", "kl")  # the metrics that read outputs as probabilities
OUTPUT_KINDS = ("auto", "logits", "probs", "log-probs", "sigmoid", "embedding")
PROB_EPS = 1e-12
_TOLERANCE = 1e-3  # sums to 1 / unit norm, to this absolute tolerance


@dataclass(frozen=True)
class OutputKind:
    """What one output holds, its class axis (None for sigmoid / embedding), and why."""

    kind: str
    axis: int | None = -1
    source: str = "default"

    def describe(self) -> str:
        axis = "" if self.axis is None else f", class axis {self.axis}"
        return f"{self.kind}{axis} (from {self.source})"

    def key(self) -> str:
        return self.kind if self.axis is None else f"{self.kind}@{self.axis}"


LOGITS = OutputKind("logits", -1)


class Metric(str):
    """A metric name (a ``str``) carrying each output's :class:`OutputKind`, in output order."""

    kinds: tuple[OutputKind, ...]
    names: tuple[str, ...]

    def __new__(
        cls, name: str, kinds: Sequence[OutputKind] = (), names: Sequence[str] = ()
    ) -> Metric:
        made = super().__new__(cls, name)
        made.kinds = tuple(kinds)
        made.names = tuple(names)
        return made

    def output_kinds(self) -> dict[str, OutputKind]:
        return dict(zip(self.names, self.kinds, strict=True))

    def measures_kinds(self) -> bool:
        """Whether the kinds change what this metric measures (vs. logits on the last axis)."""
        return str(self) in PROB_METRICS and any(k.key() != LOGITS.key() for k in self.kinds)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    result: np.ndarray = e / e.sum(axis=axis, keepdims=True)
    return result


def _log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x.astype(np.float64) - x.max(axis=axis, keepdims=True)
    result: np.ndarray = z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
    return result


def _categorical_kl(p: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
    """sum p log(p / max(q, PROB_EPS)) over ``axis`` (kept), 0 where p == 0."""
    p = np.maximum(p.astype(np.float64), 0.0)
    q = np.maximum(q.astype(np.float64), PROB_EPS)
    positive = p > 0
    logs = np.log(np.where(positive, p, 1.0)) - np.log(q)
    result: np.ndarray = np.where(positive, p * logs, 0.0).sum(axis=axis, keepdims=True)
    return result


def _bernoulli_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), PROB_EPS, 1.0 - PROB_EPS)
    q = np.clip(q.astype(np.float64), PROB_EPS, 1.0 - PROB_EPS)
    result: np.ndarray = p * np.log(p / q) + (1.0 - p) * np.log((1.0 - p) / (1.0 - q))
    return result


def output_error(metric: str, kind: OutputKind, ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The per-distribution (kl) or per-element error of one output under ``kind``."""
    axis = -1 if kind.axis is None else kind.axis
    if metric == "kl":
        if kind.kind == "logits":
            p_log = _log_softmax(ref, axis)
            q_log = _log_softmax(out, axis)
            kl: np.ndarray = (np.exp(p_log) * (p_log - q_log)).sum(axis=axis, keepdims=True)
            return kl
        if kind.kind == "probs":
            return _categorical_kl(ref, out, axis)
        if kind.kind == "log-probs":
            p_log = ref.astype(np.float64)
            p = np.exp(p_log)
            diff = p_log - out.astype(np.float64)
            return np.where(p > 0, p * diff, 0.0).sum(axis=axis, keepdims=True)
        if kind.kind == "sigmoid":
            return _bernoulli_kl(ref, out)
    elif metric == "prob-mse":
        if kind.kind == "logits":
            sq: np.ndarray = (_softmax(ref, axis) - _softmax(out, axis)) ** 2
            return sq
        if kind.kind in ("probs", "sigmoid"):
            return (ref.astype(np.float64) - out.astype(np.float64)) ** 2
        if kind.kind == "log-probs":
            return (np.exp(ref.astype(np.float64)) - np.exp(out.astype(np.float64))) ** 2
    else:
        return (ref.astype(np.float64) - out.astype(np.float64)) ** 2
    raise ValueError(f"metric {metric} is not defined on {kind.kind} outputs")


class DistortionMeter:
    """Accumulates one distortion value over batches of (reference, candidate) outputs."""

    def __init__(self, metric: str) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric}")
        self.metric = str(metric)
        # Each output's kind, when ``metric`` is a resolved :class:`Metric` (else logits).
        self.kinds: tuple[OutputKind, ...] = getattr(metric, "kinds", ())
        self.total = 0.0
        self.count = 0
        self.worst = 0.0

    def add(self, refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> None:
        batch = refs[0].shape[0] if refs and refs[0].ndim else 1
        per_sample = np.zeros(batch, dtype=np.float64)
        per_sample_count = 0
        for index, (ref, out) in enumerate(zip(refs, outs, strict=True)):
            kind = self.kinds[index] if index < len(self.kinds) else LOGITS
            err = output_error(self.metric, kind, ref, out)
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


def _sums_to_one(value: np.ndarray, axis: int) -> bool:
    v = value.astype(np.float64)
    return bool((v >= 0).all() and np.allclose(v.sum(axis=axis), 1.0, atol=_TOLERANCE))


def _log_sums_to_one(value: np.ndarray, axis: int) -> bool:
    v = value.astype(np.float64)
    return bool((v <= 0).all() and np.allclose(np.exp(v).sum(axis=axis), 1.0, atol=_TOLERANCE))


def kind_from_data(value: np.ndarray) -> OutputKind:
    """The kind an output's values suggest: probabilities (non-negative, summing to 1 along
    the last axis), log-probabilities (their exp does), unit-norm rows (an embedding), else
    logits."""
    if value.dtype.kind == "f" and value.ndim >= 2 and value.shape[-1] >= 2:
        if _sums_to_one(value, -1):
            return OutputKind("probs", -1, "data")
        if _log_sums_to_one(value, -1):
            return OutputKind("log-probs", -1, "data")
        rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
        if np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=_TOLERANCE):
            return OutputKind("embedding", None, "data")
    return OutputKind("logits", -1, "data")


def _normalise(axis: int, ndim: int) -> int:
    """An axis as a negative index (the class axis is counted from the end, so that it does
    not depend on the rank of a batch)."""
    return axis - ndim if axis >= 0 else axis


def _class_axis(kind: str, value: np.ndarray, hint: int | None) -> int | None:
    """The axis along which ``value`` sums to 1 (probs) or its exp does (log-probs): the
    graph's ``hint`` first, then the last axis, then the others (None: no such axis)."""
    test = _sums_to_one if kind == "probs" else _log_sums_to_one
    candidates = [] if hint is None else [hint]
    candidates += [a for a in range(-1, -value.ndim - 1, -1) if a not in candidates]
    for axis in candidates:
        if -value.ndim <= axis < value.ndim and value.shape[axis] >= 2 and test(value, axis):
            return _normalise(axis, value.ndim)
    return None


def resolve_kind(
    name: str,
    value: np.ndarray,
    graph: tuple[str, int | None] | None = None,
    override: str = "auto",
) -> OutputKind:
    """One output's kind: the user's ``override`` if given, else the graph's last activation
    (``graph``: kind and class axis, see :func:`rdprune_onnx.graph.activation.output_activation`),
    else the data."""
    if override != "auto":
        if override in ("sigmoid", "embedding"):
            return OutputKind(override, None, "--output-kind")
        hint = graph[1] if graph is not None and graph[0] == override else None
        axis = hint if hint is not None else -1
        if override in ("probs", "log-probs") and value.ndim:
            found = _class_axis(override, value, hint)
            if found is None:
                log.warning(
                    "--output-kind %s, but output %r %s along no axis",
                    override,
                    name,
                    "does not sum to 1" if override == "probs" else "does not exp-sum to 1",
                )
            else:
                axis = found
        return OutputKind(override, _normalise(axis, max(value.ndim, 1)), "--output-kind")
    if graph is not None:
        kind, hint = graph
        if kind in ("sigmoid",):
            return OutputKind(kind, None, "graph")
        if value.ndim:
            hint = None if hint is None else _normalise(hint, value.ndim)
            found = _class_axis(kind, value, hint)
            if found is not None:
                return OutputKind(kind, found, "graph")
        log.warning(
            "output %r comes from a %s but its values do not look like it; judging by the data",
            name,
            "Softmax" if kind == "probs" else "LogSoftmax",
        )
    return kind_from_data(value)


def resolve_metric(
    metric: str,
    names: Sequence[str],
    outputs: Sequence[np.ndarray],
    graph: Mapping[str, tuple[str, int | None]] | None = None,
    override: str = "auto",
) -> Metric:
    """The metric with each output's kind resolved (and logged); refuses ``kl`` and
    ``prob-mse`` on outputs they are not defined on (embeddings, no class axis)."""
    from rdprune_onnx.errors import UserError

    if override not in OUTPUT_KINDS:
        raise UserError(
            f"unknown output kind {override!r}", f"choose one of {', '.join(OUTPUT_KINDS)}"
        )
    kinds = []
    for name, value in zip(names, outputs, strict=True):
        kind = resolve_kind(name, value, (graph or {}).get(name), override)
        log.info("output %r: %s", name, kind.describe())
        if metric in PROB_METRICS:
            if kind.kind == "embedding":
                why = "unit-norm rows" if kind.source == "data" else "--output-kind embedding"
                raise UserError(
                    f"--metric {metric} needs probabilities or class scores, but output "
                    f"{name!r} is an embedding ({why})",
                    "use --metric mse, or --output-kind if it is not an embedding",
                )
            if value.dtype.kind != "f":
                raise UserError(
                    f"--metric {metric} needs a float output, but {name!r} is not",
                    "use --metric mse or worst",
                )
            axis = -1 if kind.axis is None else kind.axis
            if kind.kind != "sigmoid" and (value.ndim < 2 or value.shape[axis] < 2):
                raise UserError(
                    f"--metric {metric} needs a class axis, but output {name!r} has none "
                    f"(shape {tuple(value.shape)}: rank < 2 or a class axis of size 1)",
                    "use --metric mse or worst, or --output-kind sigmoid for independent "
                    "probabilities",
                )
        kinds.append(kind)
    return Metric(metric, kinds, names)


def check_metric(metric: str, names: Sequence[str], outputs: Sequence[np.ndarray]) -> None:
    """Refuse ``kl`` / ``prob-mse`` on outputs they are not defined on (judged by the data)."""
    resolve_metric(metric, names, outputs)
