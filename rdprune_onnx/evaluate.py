"""Comparing a pruned model with its dense original on a data set.

:func:`compare` compares two in-memory models (the prune pipeline uses it);
:func:`evaluate_files` compares two ONNX files: outputs, accuracy, sparsity, file sizes and
latency, in one call (``rdprune-onnx eval``).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper

from rdprune_onnx import calibration as calib
from rdprune_onnx.calibration import batches, sample_count
from rdprune_onnx.compact import compacted_weights, densify
from rdprune_onnx.distortion import class_score_problem
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import Layer, find_layers
from rdprune_onnx.graph.load import iter_all_tensors, load_model
from rdprune_onnx.runtime import Session, SessionConfig, resolve_provider, versions

log = logging.getLogger(__name__)

# Untimed runs of each model before the timed ones (allocations, kernel selection, caches).
WARMUP_RUNS = 3


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
    accuracy_output: str | None = None  # the output the accuracy was computed on
    extra: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "outputs": [vars(o) for o in self.outputs],
            "dense_accuracy": self.dense_accuracy,
            "pruned_accuracy": self.pruned_accuracy,
            "accuracy_output": self.accuracy_output,
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
    """Outputs that top-1 agreement and accuracy make sense for (not embeddings)."""
    reason = class_score_problem(value)
    # Softmax outputs are class scores too, for agreement and accuracy.
    return reason is None or reason == "it already holds probabilities"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a2 = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim else a.reshape(1, 1)
    b2 = b.reshape(b.shape[0], -1).astype(np.float64) if b.ndim else b.reshape(1, 1)
    num = (a2 * b2).sum(axis=1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return float(cos.mean())


def compare_outputs(
    dense_out: Mapping[str, np.ndarray],
    pruned_out: Mapping[str, np.ndarray],
    samples: int,
    labels: np.ndarray | None = None,
) -> Evaluation:
    """Compare the outputs of two models on the same inputs (float outputs only).

    With ``labels``, the accuracy of both models is computed on the first class-score-like
    output (rank >= 2, last axis > 1); without such an output no accuracy is reported.
    """
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
    result = Evaluation(samples, comparisons)
    if labels is not None:
        key = next((k for k, v in dense_out.items() if _is_class_scores(v)), None)
        if key is not None:
            result.dense_accuracy = accuracy(dense_out[key], labels)
            result.pruned_accuracy = accuracy(pruned_out[key], labels)
            result.accuracy_output = key
    return result


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
    return compare_outputs(dense_out, pruned_out, sample_count(data), labels)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of class scores (last axis = classes) against integer class labels."""
    predicted = scores.reshape(-1, scores.shape[-1]).argmax(axis=-1)
    flat = np.asarray(labels).reshape(-1)
    if flat.size != predicted.size:
        raise UserError(
            f"{flat.size} labels for {predicted.size} predictions (scores of shape "
            f"{'x'.join(map(str, scores.shape))})",
            "store one integer class index per sample",
        )
    if flat.dtype.kind not in "iub" and not (
        flat.dtype.kind == "f" and np.all(np.isfinite(flat)) and np.all(flat == np.round(flat))
    ):
        raise UserError(
            f"labels of dtype {flat.dtype.name} are not class indices",
            "store one integer class index per sample",
        )
    return float(np.mean(predicted == flat))


# --- comparing two files ------------------------------------------------------------------


@dataclass
class LayerSparsity:
    """One prunable layer, as found in both files."""

    name: str
    shape: tuple[int, ...]
    size: int
    dense_zeros: int
    pruned_zeros: int

    @property
    def dense_sparsity(self) -> float:
        return self.dense_zeros / self.size if self.size else 0.0

    @property
    def pruned_sparsity(self) -> float:
        return self.pruned_zeros / self.size if self.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        return vars(self) | {
            "shape": list(self.shape),
            "dense_sparsity": self.dense_sparsity,
            "pruned_sparsity": self.pruned_sparsity,
        }


@dataclass
class ModelFile:
    """A model on disk: the .onnx file and the external data files it refers to."""

    path: str
    files: list[str]
    bytes: int


@dataclass
class Latency:
    """Wall-clock time of one batch through ``Session.run`` (inputs from host memory)."""

    provider: str
    batch_size: int
    repeats: int
    warmup: int
    dense_ms: float  # median over the repeats
    pruned_ms: float
    dense_min_ms: float
    pruned_min_ms: float
    # Spread of pruned/dense over the interleaved pairs of runs (25th and 75th percentile):
    # a ratio whose range straddles 1 is noise, not a speed-up.
    ratio_low: float = float("nan")
    ratio_high: float = float("nan")

    @property
    def ratio(self) -> float:
        """Pruned over dense median latency (below 1: the pruned model is faster)."""
        return self.pruned_ms / self.dense_ms if self.dense_ms > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return vars(self) | {"ratio": self.ratio}


@dataclass
class FileEvaluation:
    """Everything :func:`evaluate_files` measured."""

    dense: ModelFile
    pruned: ModelFile
    data: str
    provider: str
    batch_size: int
    evaluation: Evaluation
    layers: list[LayerSparsity]
    latency: Latency
    densified: bool  # the pruned model held compact weights that were expanded to count zeros

    @property
    def weights(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def dense_sparsity(self) -> float:
        total = self.weights
        return sum(layer.dense_zeros for layer in self.layers) / total if total else 0.0

    @property
    def pruned_sparsity(self) -> float:
        total = self.weights
        return sum(layer.pruned_zeros for layer in self.layers) / total if total else 0.0

    @property
    def size_ratio(self) -> float:
        return self.pruned.bytes / self.dense.bytes if self.dense.bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": vars(self.dense),
            "pruned": vars(self.pruned),
            "size_ratio": self.size_ratio,
            "data": self.data,
            "provider": self.provider,
            "batch_size": self.batch_size,
            "evaluation": self.evaluation.to_dict(),
            "sparsity": {
                "prunable_weights": self.weights,
                "dense": self.dense_sparsity,
                "pruned": self.pruned_sparsity,
                "densified": self.densified,
                "layers": [layer.to_dict() for layer in self.layers],
            },
            "latency": self.latency.to_dict(),
            "versions": versions(),
        }


def model_files(path: str | os.PathLike[str]) -> ModelFile:
    """The model file and its external data files (each counted once), with their size."""
    p = Path(path)
    proto = onnx.load_model(str(p), load_external_data=False)
    locations = dict.fromkeys(
        external_data_helper.ExternalDataInfo(t).location
        for t in iter_all_tensors(proto)
        if external_data_helper.uses_external_data(t)
    )
    files = [p] + [p.parent / location for location in locations]
    return ModelFile(str(p), [str(f) for f in files], sum(f.stat().st_size for f in files))


def _densify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Expand compact weights (:func:`rdprune_onnx.compact.densify`); the model as it is
    (and False) when it holds none."""
    if not compacted_weights(model):
        return model, False  # nothing to expand: skip the copy densify would make
    return densify(model), True


def match_layers(dense: Sequence[Layer], pruned: Sequence[Layer]) -> list[LayerSparsity]:
    """Pair the prunable layers of the two models by weight name; they must be the same."""
    by_name = {layer.name: layer for layer in pruned}
    dense_names = {layer.name for layer in dense}
    missing = [layer.name for layer in dense if layer.name not in by_name]
    extra = [layer.name for layer in pruned if layer.name not in dense_names]
    reshaped = [
        f"{layer.name} ({_dims(layer.shape)} vs {_dims(by_name[layer.name].shape)})"
        for layer in dense
        if layer.name in by_name and by_name[layer.name].shape != layer.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the pruned model: {_names(missing)}")
    if extra:
        problems.append(f"not in the dense model: {_names(extra)}")
    if reshaped:
        problems.append(f"different shapes: {_names(reshaped)}")
    if problems:
        raise UserError(
            "the prunable layers of the two models differ; " + "; ".join(problems),
            "compare a pruned file with the dense model it was pruned from",
        )
    return [
        LayerSparsity(layer.name, layer.shape, layer.size, layer.zeros, by_name[layer.name].zeros)
        for layer in dense
    ]


def _dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def measure_latency(
    dense: Session,
    pruned: Session,
    feeds: Mapping[str, np.ndarray],
    *,
    repeats: int,
    warmup: int = WARMUP_RUNS,
) -> tuple[list[float], list[float]]:
    """Seconds per run of each session on ``feeds``, interleaved so drift hits both alike."""
    for _ in range(warmup):
        dense.run(feeds)
        pruned.run(feeds)
    times: dict[int, list[float]] = {0: [], 1: []}
    sessions = (dense, pruned)
    for i in range(repeats):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            start = time.perf_counter()
            sessions[which].run(feeds)
            times[which].append(time.perf_counter() - start)
    return times[0], times[1]


def _ratio_spread(dense: Sequence[float], pruned: Sequence[float]) -> dict[str, float]:
    pairs = [p / d for d, p in zip(dense, pruned, strict=True) if d > 0]
    if not pairs:
        return {}
    low, high = np.percentile(pairs, [25, 75])
    return {"ratio_low": float(low), "ratio_high": float(high)}


def _load_data(
    path: str | os.PathLike[str],
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    labels: str | None,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    raw, label_array = calib.load_labelled(path, labels)
    specs = calib.model_inputs(dense)
    pruned_specs = calib.model_inputs(pruned)
    if [(s.name, s.dtype) for s in specs] != [(s.name, s.dtype) for s in pruned_specs]:
        raise UserError(
            "the two models have different inputs: "
            f"dense {calib.describe_inputs(specs)}; pruned {calib.describe_inputs(pruned_specs)}",
            "compare a pruned file with the dense model it was pruned from",
        )
    arrays = calib.check_data(raw, specs, str(path))
    calib.check_data(arrays, pruned_specs, str(path))
    return arrays, label_array


def evaluate_files(
    dense_path: str | os.PathLike[str],
    pruned_path: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    *,
    labels: str | None = None,
    provider: str = "auto",
    batch_size: int = 64,
    repeats: int = 20,
    warmup: int = WARMUP_RUNS,
) -> FileEvaluation:
    """Compare a pruned ONNX file with its dense original on the inputs in ``data_path``.

    Measures per output the MSE and cosine similarity (and top-1 agreement for class
    scores), the accuracy of both against the ``labels`` array of the same .npz if given, the
    sparsity of every prunable layer in both files, the files' sizes (external data
    included) and the latency of both on ``provider``: the median of ``repeats`` timed runs
    of one batch of ``batch_size`` samples after ``warmup`` untimed runs, in this process.
    """
    _check_runs(batch_size, repeats, warmup)
    if Path(dense_path).resolve() == Path(pruned_path).resolve():
        log.warning("comparing %s with itself", dense_path)
    dense = load_model(dense_path)
    pruned = load_model(pruned_path)
    dense_file = model_files(dense_path)
    pruned_file = model_files(pruned_path)
    data, label_array, batch_size = _samples(data_path, dense, pruned, labels, batch_size)

    config = SessionConfig(provider=resolve_provider(provider))
    dense_session, pruned_session = _sessions(dense, pruned, config)
    # The sessions hold their own copy of each graph, so densify may rewrite `pruned`.
    layers, densified = _layer_sparsity(dense, pruned)
    del pruned
    evaluation = _compare_runs(dense_session, pruned_session, data, batch_size, label_array)

    feeds = next(batches(data, batch_size))
    latency = _latency(dense_session, pruned_session, feeds, config.provider, repeats, warmup)
    return FileEvaluation(
        dense=dense_file,
        pruned=pruned_file,
        data=str(data_path),
        provider=config.provider,
        batch_size=batch_size,
        evaluation=evaluation,
        layers=layers,
        latency=latency,
        densified=densified,
    )


def _sessions(
    dense: onnx.ModelProto, pruned: onnx.ModelProto, config: SessionConfig
) -> tuple[Session, Session]:
    """ONNX Runtime sessions of both models, refused when their outputs differ."""
    dense_session = Session(dense, config)
    pruned_session = Session(pruned, config)
    if dense_session.output_names != pruned_session.output_names:
        raise UserError(
            f"the two models have different outputs: dense {dense_session.output_names}, "
            f"pruned {pruned_session.output_names}",
            "compare a pruned file with the dense model it was pruned from",
        )
    return dense_session, pruned_session


def _layer_sparsity(
    dense: onnx.ModelProto, pruned: onnx.ModelProto
) -> tuple[list[LayerSparsity], bool]:
    """Both models' prunable layers matched by name (compact weights of ``pruned``
    expanded first, which may rewrite it), and whether any were expanded."""
    pruned_expanded, densified = _densify(pruned)
    return match_layers(find_layers(dense).layers, find_layers(pruned_expanded).layers), densified


def _compare_runs(
    dense_session: Session,
    pruned_session: Session,
    data: Mapping[str, np.ndarray],
    batch_size: int,
    labels: np.ndarray | None,
) -> Evaluation:
    """Both models run on all of ``data``, their outputs compared (and scored against
    ``labels``, which then need an output of class scores)."""
    dense_out = run_all(dense_session, data, batch_size)
    pruned_out = run_all(pruned_session, data, batch_size)
    evaluation = compare_outputs(dense_out, pruned_out, sample_count(data), labels)
    if labels is not None and evaluation.accuracy_output is None:
        raise UserError(
            "--labels given, but no output looks like class scores (float, rank >= 2, "
            "more than one class on the last axis)",
            "accuracy needs a classifier; leave out --labels",
        )
    return evaluation


def _check_runs(batch_size: int, repeats: int, warmup: int) -> None:
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}", "e.g. 64")
    if repeats <= 0:
        raise UserError(f"--repeats must be positive, got {repeats}", "e.g. 20")
    if warmup < 0:
        raise UserError(f"warm-up runs cannot be negative, got {warmup}", "e.g. 3")


def _latency(
    dense: Session,
    pruned: Session,
    feeds: Mapping[str, np.ndarray],
    provider: str,
    repeats: int,
    warmup: int,
) -> Latency:
    """Both sessions timed on one batch (:func:`measure_latency`), summarised."""
    dense_times, pruned_times = measure_latency(
        dense, pruned, feeds, repeats=repeats, warmup=warmup
    )
    return Latency(
        provider=provider,
        batch_size=sample_count(feeds),
        repeats=repeats,
        warmup=warmup,
        dense_ms=statistics.median(dense_times) * 1e3,
        pruned_ms=statistics.median(pruned_times) * 1e3,
        dense_min_ms=min(dense_times) * 1e3,
        pruned_min_ms=min(pruned_times) * 1e3,
        **_ratio_spread(dense_times, pruned_times),
    )


def _samples(
    data_path: str | os.PathLike[str],
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    labels: str | None,
    batch_size: int,
) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
    """The evaluation inputs and labels (one per sample), cut to the model's fixed batch
    size where it has one, and the batch size to run them with."""
    data, label_array = _load_data(data_path, dense, pruned, labels)
    n = sample_count(data)
    if label_array is not None and (label_array.ndim == 0 or label_array.shape[0] != n):
        raise UserError(
            f"labels {labels!r} have shape {label_array.shape}, but the inputs hold {n} samples",
            "store one class index per sample (the first axis is the sample axis)",
        )
    data, batch_size = calib.fit_fixed_batch(data, calib.model_inputs(dense), batch_size)
    if label_array is not None:
        label_array = label_array[: sample_count(data)]
    return data, label_array, batch_size
