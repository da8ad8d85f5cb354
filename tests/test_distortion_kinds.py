"""kl / prob-mse per output kind (logits, probs, log-probs, sigmoid, embedding)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rdprune_onnx import CalibrationSpec, PruneSettings, UserError, prune
from rdprune_onnx.calibration import model_inputs, synthesize
from rdprune_onnx.distortion import (
    PROB_EPS,
    DistortionMeter,
    Metric,
    OutputKind,
    resolve_metric,
)
from rdprune_onnx.graph.activation import output_activation
from rdprune_onnx.pipeline import curve_entry
from tests import graphs
from tests.graphs_outputs import head


def _meter(metric: str, kind: OutputKind, ref: np.ndarray, out: np.ndarray) -> float:
    meter = DistortionMeter(Metric(metric, [kind], ["y"]))
    meter.add([ref], [out])
    return meter.value()


def test_kl_on_probabilities_hand_computed() -> None:
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=np.float32)
    q = np.array([[0.25, 0.75, 0.0], [0.2, 0.3, 0.5]], dtype=np.float32)
    # Row 0: 0.5 ln 2 + 0.5 ln(2/3) (the p = 0 class counts 0); row 1: 0. Mean over rows.
    expected = (0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2
    got = _meter("kl", OutputKind("probs", -1), p, q)
    assert got == pytest.approx(expected, rel=1e-6)
    # The old path (a second softmax over probabilities) gives another, much smaller number.
    logits_meter = DistortionMeter("kl")
    logits_meter.add([p], [q])
    assert logits_meter.value() < got / 5
    # prob-mse reads the probabilities directly too.
    assert _meter("prob-mse", OutputKind("probs", -1), p, q) == pytest.approx(
        float(((p.astype(np.float64) - q) ** 2).mean())
    )


def test_kl_on_probabilities_clips_an_underflowed_class() -> None:
    p = np.array([[0.5, 0.5]])
    q = np.array([[1.0, 0.0]])  # the pruned model's softmax underflowed to 0
    got = _meter("kl", OutputKind("probs", -1), p, q)
    assert got == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / PROB_EPS))
    assert np.isfinite(got)


def test_log_probs_and_sigmoid_hand_computed() -> None:
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    q = np.array([[0.25, 0.75], [0.9, 0.1]])
    kl = (0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2
    assert _meter("kl", OutputKind("log-probs", -1), np.log(p), np.log(q)) == pytest.approx(kl)
    assert _meter("prob-mse", OutputKind("log-probs", -1), np.log(p), np.log(q)) == (
        pytest.approx(float(((p - q) ** 2).mean()))
    )
    s_ref = np.array([[0.5, 0.9]])
    s_out = np.array([[0.25, 0.9]])
    bernoulli = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    # Each element is one distribution: the mean is over 2 elements.
    assert _meter("kl", OutputKind("sigmoid", None), s_ref, s_out) == pytest.approx(bernoulli / 2)


def test_probabilities_on_another_axis() -> None:
    """(T, N, C) CTC-style outputs, and a class axis that is not the last."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(3, 2))  # (T, N, C)
    q = rng.dirichlet(np.ones(4), size=(3, 2))
    rows = (p * np.log(p / q)).sum(axis=-1).mean()
    assert _meter("kl", OutputKind("probs", -1), p, q) == pytest.approx(rows)
    moved_p, moved_q = np.moveaxis(p, -1, 1), np.moveaxis(q, -1, 1)  # (T, C, N)
    assert _meter("kl", OutputKind("probs", -2), moved_p, moved_q) == pytest.approx(rows)


def test_logits_unchanged() -> None:
    """Logits give bit-for-bit the numbers of the softmax-first metric as it was."""
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((6, 5)).astype(np.float32) * 3
    out = ref + rng.standard_normal((6, 5)).astype(np.float32)

    def old_kl(a: np.ndarray, b: np.ndarray) -> float:
        za = a.astype(np.float64) - a.max(axis=-1, keepdims=True)
        zb = b.astype(np.float64) - b.max(axis=-1, keepdims=True)
        la = za - np.log(np.exp(za).sum(axis=-1, keepdims=True))
        lb = zb - np.log(np.exp(zb).sum(axis=-1, keepdims=True))
        err = (np.exp(la) * (la - lb)).sum(axis=-1, keepdims=True)
        return float(err.sum()) / err.size

    plain = DistortionMeter("kl")
    plain.add([ref], [out])
    resolved = resolve_metric("kl", ["y"], [ref])
    assert resolved.kinds[0].kind == "logits"
    assert plain.value() == old_kl(ref, out)
    assert _meter("kl", resolved.kinds[0], ref, out) == old_kl(ref, out)


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("none", None),
        ("softmax", ("probs", -1)),
        ("softmax_transpose", ("probs", 2)),
        ("softmax_axis1_transpose", ("probs", 2)),
        ("logsoftmax", ("log-probs", 2)),
        ("sigmoid", ("sigmoid", None)),
        ("softmax_reshape", ("probs", None)),
        ("normalize", None),
    ],
)
def test_graph_detection(tail: str, expected: tuple[str, int | None] | None) -> None:
    assert output_activation(head(tail), "y") == expected


def _outputs(model: onnx.ModelProto, n: int = 6) -> np.ndarray:
    x = np.random.default_rng(2).standard_normal((n, 3, 4)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {"x": x})[0]
    return result


@pytest.mark.parametrize(
    ("tail", "kind", "axis", "source"),
    [
        ("none", "logits", -1, "data"),
        ("softmax", "probs", -1, "graph"),
        ("softmax_transpose", "probs", -1, "graph"),
        ("softmax_axis1_transpose", "probs", -1, "graph"),
        ("logsoftmax", "log-probs", -1, "graph"),
        ("sigmoid", "sigmoid", None, "graph"),
        ("softmax_reshape", "logits", -1, "data"),  # (N, T*C): sums to T, not 1
        ("normalize", "embedding", None, "data"),
    ],
)
def test_resolved_kind(tail: str, kind: str, axis: int | None, source: str) -> None:
    model = head(tail)
    value = _outputs(model)
    graph = {"y": found} if (found := output_activation(model, "y")) else {}
    metric = resolve_metric("mse", ["y"], [value], graph=graph)
    assert metric.kinds[0] == OutputKind(kind, axis, source)


def test_probabilities_detected_from_data_alone() -> None:
    value = _outputs(head("softmax"))
    assert resolve_metric("kl", ["y"], [value]).kinds[0] == OutputKind("probs", -1, "data")
    log_value = np.log(value)
    assert resolve_metric("kl", ["y"], [log_value]).kinds[0].kind == "log-probs"


def test_override() -> None:
    model = head("softmax")
    value = _outputs(model)
    graph = {"y": ("probs", -1)}
    forced = resolve_metric("kl", ["y"], [value], graph=graph, override="logits")
    assert forced.kinds[0] == OutputKind("logits", -1, "--output-kind")
    logits = _outputs(head("none"))
    probs = resolve_metric("kl", ["y"], [logits], override="sigmoid")
    assert probs.kinds[0].kind == "sigmoid"
    with pytest.raises(UserError, match="unknown output kind"):
        resolve_metric("kl", ["y"], [value], override="softmax")


def test_embeddings_refused_with_the_output_named() -> None:
    value = _outputs(head("normalize"))
    for metric in ("kl", "prob-mse"):
        with pytest.raises(UserError, match=r"output 'y' is an embedding") as info:
            resolve_metric(metric, ["y"], [value])
        assert "--metric mse" in info.value.hint
    with pytest.raises(UserError, match="embedding"):
        resolve_metric("kl", ["y"], [_outputs(head("none"))], override="embedding")
    resolve_metric("mse", ["y"], [value])  # mse applies to anything


def _prune(tmp_path: Path, model: onnx.ModelProto, **settings: object) -> dict[str, object]:
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    report = tmp_path / "r.json"
    prune(
        path,
        PruneSettings(ratio=0.5, levels=11, **settings),  # type: ignore[arg-type]
        CalibrationSpec(synthetic=8, batch_size=4, seed=0),
        output=tmp_path / "out.onnx",
        report=report,
        force=True,
        cache_dir=None,
    )
    loaded: dict[str, object] = json.loads(report.read_text())
    return loaded


def test_prune_measures_kl_on_a_softmax_output(tmp_path: Path) -> None:
    """End to end: the kind is recorded, and the verified kl is KL of the probabilities."""
    model = head("softmax_transpose", classes=6)
    report = _prune(tmp_path, model, metric="kl", method="uniform")
    distortion = report["distortion"]
    assert isinstance(distortion, dict)
    assert distortion["output_kinds"] == {"y": {"kind": "probs", "axis": -1, "source": "graph"}}
    feeds = synthesize(model_inputs(model), 8, seed=0)  # the calibration data _prune uses
    p = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, feeds)[0].astype(np.float64)
    q = ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, feeds)[0].astype(np.float64)
    expected = (p * np.log(p / q)).sum(axis=-1).mean()
    assert distortion["measured"] == pytest.approx(expected, rel=1e-5)


def test_prune_override_and_report(tmp_path: Path) -> None:
    report = _prune(tmp_path, head("softmax"), metric="prob-mse", output_kind="logits")
    distortion = report["distortion"]
    assert isinstance(distortion, dict)
    assert distortion["output_kinds"]["y"]["kind"] == "logits"
    assert distortion["output_kinds"]["y"]["source"] == "--output-kind"


def test_cache_key_changes_only_when_the_kind_changes_the_measure() -> None:
    model = graphs.cnn()
    data = {"x": np.zeros((2, 3, 8, 8), np.float32)}
    layers: list = []  # type: ignore[type-arg]
    settings = PruneSettings(ratio=0.5, metric="kl")
    base = curve_entry(model, layers, data, settings, "cpu", 2).settings
    logits = Metric("kl", [OutputKind("logits", -1, "data")], ["y"])
    assert curve_entry(model, layers, data, settings, "cpu", 2, metric=logits).settings == base
    probs = Metric("kl", [OutputKind("probs", -1, "graph")], ["y"])
    keyed = curve_entry(model, layers, data, settings, "cpu", 2, metric=probs).settings
    assert keyed == base | {"output_kinds": {"y": "probs@-1"}}
    mse = Metric("mse", [OutputKind("probs", -1, "graph")], ["y"])
    settings_mse = PruneSettings(ratio=0.5, metric="mse")
    plain = curve_entry(model, layers, data, settings_mse, "cpu", 2).settings
    assert curve_entry(model, layers, data, settings_mse, "cpu", 2, metric=mse).settings == plain


def test_resolved_kind_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    value = _outputs(head("softmax"))
    with caplog.at_level("INFO", logger="rdprune_onnx.distortion"):
        resolve_metric("kl", ["y"], [value], graph={"y": ("probs", -1)})
    assert "output 'y': probs, class axis -1 (from graph)" in caplog.text


def test_no_class_axis_refused() -> None:
    """A rank-1 output's only axis is the batch: never a class axis, for any kind but sigmoid."""
    scores = np.array([0.2, 0.3, 0.5])
    for override in ("auto", "logits", "probs"):
        with pytest.raises(UserError, match="class axis"):
            resolve_metric("kl", ["y"], [scores], override=override)
    assert resolve_metric("kl", ["y"], [scores], override="sigmoid").kinds[0].kind == "sigmoid"
