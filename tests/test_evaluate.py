"""evaluate_files on tiny graphs whose answers are known by hand or by plain numpy."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rdprune_onnx.errors import UserError
from rdprune_onnx.evaluate import FileEvaluation, evaluate_files
from rdprune_onnx.report import to_json
from tests import graphs
from tests.graphs_eval import LABELS, W1, W1_PRUNED, W2, X, save, two_matmuls


@pytest.fixture
def hand_case(tmp_path: Path) -> tuple[Path, Path, Path]:
    dense = save(two_matmuls(W1, W2), tmp_path / "dense.onnx")
    pruned = save(two_matmuls(W1_PRUNED, W2), tmp_path / "pruned.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=X, label=LABELS)
    return dense, pruned, data


def evaluate(dense: Path, pruned: Path, data: Path, **kwargs: object) -> FileEvaluation:
    kwargs.setdefault("provider", "cpu")
    kwargs.setdefault("repeats", 3)
    return evaluate_files(dense, pruned, data, **kwargs)  # type: ignore[arg-type]


def test_hand_computed_numbers(hand_case: tuple[Path, Path, Path]) -> None:
    dense, pruned, data = hand_case
    result = evaluate(dense, pruned, data, labels="label", batch_size=3)  # batches of 3 + 1
    ev = result.evaluation
    assert ev.samples == 4
    [out] = ev.outputs
    assert out.name == "y"
    # Dense rows: [1,2] [3,4] [4,6] [5,8]; pruned: [1,2] [3,0] [4,2] [5,4].
    # Differences: 0, 4, 4, 4 in the second column -> 3 * 16 / 8 elements.
    assert out.mse == pytest.approx(6.0)
    cosines = [1.0, 9 / (5 * 3), 28 / math.sqrt(52 * 20), 57 / math.sqrt(89 * 41)]
    assert out.cosine == pytest.approx(sum(cosines) / 4, rel=1e-6)
    # argmax dense: 1 1 1 1; pruned: 1 0 0 0.
    assert out.top1_agreement == pytest.approx(0.25)
    assert ev.accuracy_output == "y"
    assert ev.dense_accuracy == pytest.approx(0.5)  # labels 1 0 0 1
    assert ev.pruned_accuracy == pytest.approx(0.75)

    by_name = {layer.name: layer for layer in result.layers}
    assert [layer.name for layer in result.layers] == ["w1", "w2"]
    assert (by_name["w1"].dense_zeros, by_name["w1"].pruned_zeros) == (0, 1)
    assert (by_name["w2"].dense_zeros, by_name["w2"].pruned_zeros) == (2, 2)
    assert by_name["w1"].pruned_sparsity == 0.25
    assert by_name["w2"].dense_sparsity == 0.5
    assert result.weights == 8
    assert result.dense_sparsity == 2 / 8
    assert result.pruned_sparsity == 3 / 8
    assert result.provider == "cpu"
    assert result.densified is False


def test_random_case_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((6, 5)).astype(np.float32)
    w2 = rng.standard_normal((5, 4)).astype(np.float32)
    w1p, w2p = w1.copy(), w2.copy()
    w1p.ravel()[[0, 3, 7, 11, 12, 29]] = 0  # 6 of 30
    w2p.ravel()[[1, 2, 19]] = 0  # 3 of 20
    x = rng.standard_normal((37, 6)).astype(np.float32)
    dense = save(two_matmuls(w1, w2), tmp_path / "d.onnx")
    pruned = save(two_matmuls(w1p, w2p), tmp_path / "p.onnx")
    data = tmp_path / "x.npz"
    y_dense = x.astype(np.float64) @ w1 @ w2
    y_pruned = x.astype(np.float64) @ w1p @ w2p
    labels = rng.integers(0, 4, 37)
    np.savez(data, x=x, y_true=labels)

    result = evaluate(dense, pruned, data, labels="y_true", batch_size=8)
    [out] = result.evaluation.outputs
    mse = np.mean((y_dense - y_pruned) ** 2)
    cos = np.mean(
        (y_dense * y_pruned).sum(1)
        / (np.linalg.norm(y_dense, axis=1) * np.linalg.norm(y_pruned, axis=1))
    )
    assert out.mse == pytest.approx(mse, rel=1e-4)
    assert out.cosine == pytest.approx(cos, rel=1e-5)
    assert out.top1_agreement == np.mean(y_dense.argmax(1) == y_pruned.argmax(1))
    assert result.evaluation.dense_accuracy == np.mean(y_dense.argmax(1) == labels)
    assert result.evaluation.pruned_accuracy == np.mean(y_pruned.argmax(1) == labels)
    assert [(lay.name, lay.pruned_zeros) for lay in result.layers] == [("w1", 6), ("w2", 3)]
    assert result.pruned_sparsity == 9 / 50


def test_identical_files(hand_case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    dense, _pruned, data = hand_case
    copy = tmp_path / "copy.onnx"
    shutil.copy(dense, copy)
    result = evaluate(dense, copy, data, labels="label")
    [out] = result.evaluation.outputs
    assert out.mse == 0.0
    assert out.cosine == pytest.approx(1.0, abs=1e-12)
    assert out.top1_agreement == 1.0
    assert result.evaluation.dense_accuracy == result.evaluation.pruned_accuracy
    assert result.dense_sparsity == result.pruned_sparsity == 2 / 8
    assert result.size_ratio == 1.0


def test_latency_and_sizes_reported(hand_case: tuple[Path, Path, Path]) -> None:
    dense, pruned, data = hand_case
    result = evaluate(dense, pruned, data, repeats=5, batch_size=2)
    lat = result.latency
    assert lat.provider == "cpu"
    assert (lat.repeats, lat.batch_size) == (5, 2)
    assert lat.dense_ms > 0 and lat.pruned_ms > 0
    assert 0 < lat.dense_min_ms <= lat.dense_ms
    assert lat.ratio == pytest.approx(lat.pruned_ms / lat.dense_ms)
    assert result.dense.bytes == dense.stat().st_size
    assert result.pruned.bytes == pruned.stat().st_size
    assert result.dense.files == [str(dense)]


def test_json_report(hand_case: tuple[Path, Path, Path]) -> None:
    dense, pruned, data = hand_case
    report = json.loads(to_json(evaluate(dense, pruned, data, labels="label").to_dict()))
    assert report["evaluation"]["outputs"][0]["mse"] == pytest.approx(6.0)
    assert report["evaluation"]["pruned_accuracy"] == pytest.approx(0.75)
    assert report["sparsity"]["pruned"] == 3 / 8
    assert report["sparsity"]["layers"][0]["shape"] == [2, 2]
    assert report["latency"]["ratio"] > 0
    assert report["dense"]["bytes"] == dense.stat().st_size


def test_external_data_counts_in_file_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 8)).astype(np.float32)
    dense = save(two_matmuls(w1, w2), tmp_path / "d.onnx")
    pruned = tmp_path / "p.onnx"
    graphs.save_external(two_matmuls(w1, w2), pruned)
    data = tmp_path / "x.npz"
    np.savez(data, x=rng.standard_normal((4, 64)).astype(np.float32))
    result = evaluate(dense, pruned, data)
    side = tmp_path / "p.onnx.data"
    assert result.pruned.files == [str(pruned), str(side)]
    assert result.pruned.bytes == pruned.stat().st_size + side.stat().st_size
    assert side.stat().st_size >= (64 * 32 + 32 * 8) * 4
    assert result.evaluation.outputs[0].mse == 0.0


def test_missing_labels_key(hand_case: tuple[Path, Path, Path]) -> None:
    dense, pruned, data = hand_case
    with pytest.raises(UserError, match="no array 'labels'") as info:
        evaluate(dense, pruned, data, labels="labels")
    assert "'label'" in str(info.value)  # the hint names what the file has


def test_labels_of_wrong_length(hand_case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    dense, pruned, _data = hand_case
    data = tmp_path / "short.npz"
    np.savez(data, x=X, label=LABELS[:3])
    with pytest.raises(UserError, match="4 samples"):
        evaluate(dense, pruned, data, labels="label")


def test_labels_without_classifier_output(tmp_path: Path) -> None:
    w1 = np.ones((2, 1), np.float32)
    w2 = np.ones((1, 1), np.float32)
    dense = save(two_matmuls(w1, w2), tmp_path / "d.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, x=X, label=LABELS)
    with pytest.raises(UserError, match="class scores"):
        evaluate(dense, dense, data, labels="label")


def test_layers_must_match(hand_case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    dense, _pruned, data = hand_case
    renamed = save(two_matmuls(W1_PRUNED, W2, w1_name="other"), tmp_path / "renamed.onnx")
    with pytest.raises(UserError, match="missing from the pruned model: w1") as info:
        evaluate(dense, renamed, data)
    assert "not in the dense model: other" in str(info.value)
    reshaped = save(
        two_matmuls(np.ones((2, 3), np.float32), np.eye(3, 2, dtype=np.float32)),
        tmp_path / "reshaped.onnx",
    )
    with pytest.raises(UserError, match=r"different shapes: w1 \(2x2 vs 2x3\)"):
        evaluate(dense, reshaped, data)


def test_bad_arguments(hand_case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    dense, pruned, data = hand_case
    with pytest.raises(UserError, match="--repeats"):
        evaluate(dense, pruned, data, repeats=0)
    with pytest.raises(UserError, match="--batch-size"):
        evaluate(dense, pruned, data, batch_size=0)
    with pytest.raises(UserError, match="does not exist"):
        evaluate(dense, tmp_path / "nope.onnx", data)
    with pytest.raises(UserError, match="unknown provider"):
        evaluate(dense, pruned, data, provider="tpu")


def test_fixed_batch_drops_the_remainder(tmp_path: Path) -> None:
    dense = save(two_matmuls(W1, W2, batch=2), tmp_path / "d.onnx")
    pruned = save(two_matmuls(W1_PRUNED, W2, batch=2), tmp_path / "p.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.concatenate([X, X[:1]]), label=np.concatenate([LABELS, [1]]))
    result = evaluate(dense, pruned, data, labels="label", batch_size=64)
    assert result.evaluation.samples == 4  # the fifth sample does not fill a batch of 2
    assert result.batch_size == result.latency.batch_size == 2
    assert result.evaluation.pruned_accuracy == pytest.approx(0.75)


def test_compact_weights_are_expanded_before_counting(
    hand_case: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an ``export.densify``, sparsity is read from its output; outputs and timing
    still come from the file as it is."""
    dense, pruned, data = hand_case
    calls: list[int] = []

    def densify(model: onnx.ModelProto) -> onnx.ModelProto:
        calls.append(1)
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for tensor in out.graph.initializer:
            if tensor.name == "w1":  # pretend the stored form hid two more zeros
                tensor.CopyFrom(numpy_helper.from_array(np.diag([1.0, 0.0]).astype("f"), "w1"))
        return out

    from rdprune_onnx import evaluate as ev

    monkeypatch.setattr(ev, "densify", densify)
    monkeypatch.setattr(ev, "compacted_weights", lambda model: {"w1": "bitmask"})
    result = evaluate(dense, pruned, data)
    assert calls == [1]
    assert result.densified is True
    assert result.layers[0].pruned_zeros == 3
    assert result.evaluation.outputs[0].mse == pytest.approx(6.0)  # the file's own weights

    monkeypatch.setattr(ev, "compacted_weights", lambda model: {})
    result = evaluate(dense, pruned, data)
    assert calls == [1]  # nothing compacted: densify is not called
    assert result.densified is False
    assert result.layers[0].pruned_zeros == 1


def test_real_compact_file(tmp_path: Path) -> None:
    from rdprune_onnx import compact

    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((64, 48)).astype(np.float32)
    w2 = rng.standard_normal((48, 10)).astype(np.float32)
    w1p = np.where(np.abs(w1) < np.quantile(np.abs(w1), 0.9), 0, w1).astype(np.float32)
    plain = two_matmuls(w1p, w2)
    dense = save(two_matmuls(w1, w2), tmp_path / "d.onnx")
    pruned = save(plain, tmp_path / "p.onnx")
    compact = save(compact.compact_weights(plain, ["w1"]), tmp_path / "c.onnx")
    data = tmp_path / "x.npz"
    np.savez(data, x=rng.standard_normal((16, 64)).astype(np.float32))
    a = evaluate(dense, pruned, data)
    b = evaluate(dense, compact, data)
    assert b.densified is True
    assert [lay.pruned_zeros for lay in b.layers] == [lay.pruned_zeros for lay in a.layers]
    assert b.layers[0].pruned_zeros == int(np.count_nonzero(w1p == 0))
    assert b.evaluation.outputs[0].mse == pytest.approx(a.evaluation.outputs[0].mse, rel=1e-5)
    assert b.pruned.bytes < a.pruned.bytes


class _FakeSession:
    """Advances a fake clock by a fixed step on every run."""

    def __init__(self, clock: list[float], step: float) -> None:
        self.clock, self.step, self.runs = clock, step, 0

    def run(self, feeds: object) -> list[np.ndarray]:
        self.runs += 1
        self.clock[0] += self.step
        return []


def test_measure_latency_times_each_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from rdprune_onnx import evaluate as ev

    clock = [0.0]
    monkeypatch.setattr(ev.time, "perf_counter", lambda: clock[0])
    dense, pruned = _FakeSession(clock, 0.004), _FakeSession(clock, 0.001)
    dense_times, pruned_times = ev.measure_latency(
        dense,  # type: ignore[arg-type]
        pruned,  # type: ignore[arg-type]
        {},
        repeats=5,
        warmup=2,
    )
    assert dense_times == pytest.approx([0.004] * 5)
    assert pruned_times == pytest.approx([0.001] * 5)
    assert dense.runs == pruned.runs == 7


def test_latency_summary(
    hand_case: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rdprune_onnx import evaluate as ev

    def fake(*args: object, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
        assert (repeats, warmup) == (4, 1)
        return [0.004, 0.001, 0.003, 0.010], [0.002, 0.0015, 0.0005, 0.009]

    monkeypatch.setattr(ev, "measure_latency", fake)
    dense, pruned, data = hand_case
    lat = evaluate(dense, pruned, data, repeats=4, warmup=1).latency
    assert lat.dense_ms == pytest.approx(3.5)  # median of 1, 3, 4, 10 ms
    assert lat.pruned_ms == pytest.approx(1.75)  # median of 0.5, 1.5, 2, 9 ms
    assert lat.dense_min_ms == pytest.approx(1.0)
    assert lat.pruned_min_ms == pytest.approx(0.5)
    assert lat.ratio == pytest.approx(0.5)


def test_embeddings_get_no_top1_agreement() -> None:
    from rdprune_onnx.evaluate import _is_class_scores

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5))
    assert _is_class_scores(logits)
    assert not _is_class_scores(logits / np.linalg.norm(logits, axis=1, keepdims=True))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert _is_class_scores(probs)
    assert not _is_class_scores(rng.standard_normal((8, 1)))
