from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import rdprune_onnx.curves as curves_module
from rdprune_onnx import CalibrationSpec, PruneSettings, UserError, prune
from rdprune_onnx.graph.layers import ConstantIndex, find_layers
from tests import graphs

BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn": graphs.cnn,
    "cnn_fp16": lambda: graphs.cnn(dtype=np.float16),
    "forms": graphs.mlp_forms,
    "loop": graphs.loop_model,
    "conv_transpose": graphs.conv_transpose,
}


def _save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    path = folder / name
    onnx.save_model(model, str(path))
    return path


def _calibration(model: onnx.ModelProto) -> CalibrationSpec:
    ranges = {"cond": (1.0, 2.0)} if any(i.name == "cond" for i in model.graph.input) else {}
    return CalibrationSpec(synthetic=16, input_ranges=ranges, batch_size=8, seed=0)


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor, keyed by the name its consumers use."""
    return {
        name: onnx.numpy_helper.to_array(entry.tensor)
        for name, entry in ConstantIndex(model).constants.items()
    }


@pytest.mark.parametrize("method", ["rd", "uniform"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_prune_every_layer_kind(tmp_path: Path, kind: str, method: str) -> None:
    model = BUILDERS[kind]()
    path = _save(model, tmp_path)
    out = tmp_path / "out.onnx"
    result = prune(
        path,
        PruneSettings(ratio=0.5, method=method, levels=11),
        _calibration(model),
        output=out,
        cache_dir=None,
    )
    written = onnx.load_model(str(out))
    onnx.checker.check_model(written)
    # Only the prunable weights changed, and only by zeroing.
    before, after = _tensors(model), _tensors(written)
    layers = {layer.name for layer in find_layers(model).layers}
    assert set(before) == set(after)
    for name, value in before.items():
        if name in layers:
            changed = value != after[name]
            assert np.all(after[name][changed] == 0)
        else:
            np.testing.assert_array_equal(value, after[name])
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in model.graph.node]
    # The ratio is met to the whole weight.
    total = sum(int(before[name].size) for name in layers)
    zeros = sum(int(np.count_nonzero(after[name] == 0)) for name in layers)
    assert zeros == int(np.ceil(0.5 * total))
    assert result.achieved_ratio == pytest.approx(zeros / total)
    # It runs in ONNX Runtime.
    ort.InferenceSession(out.read_bytes())
    assert result.measured_distortion >= 0


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    path = _save(graphs.cnn(), tmp_path)
    settings = PruneSettings(ratio=0.7, levels=11)
    for name in ("a.onnx", "b.onnx"):
        prune(path, settings, CalibrationSpec(synthetic=8, seed=5), output=tmp_path / name)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_predicted_and_measured_are_reported(tmp_path: Path) -> None:
    path = _save(graphs.cnn(), tmp_path)
    result = prune(
        path, PruneSettings(ratio=0.3, levels=21), CalibrationSpec(synthetic=16), write=False
    )
    assert result.output is None
    assert result.predicted_distortion is not None and result.predicted_distortion > 0
    assert result.measured_distortion > 0
    assert sum(layer.predicted or 0 for layer in result.layers) == pytest.approx(
        result.predicted_distortion
    )
    report = result.to_dict()
    assert report["distortion"]["predicted"] == result.predicted_distortion
    assert set(report["curves"]) == {"w1", "w2", "w3", "w4"}


_REAL_MEASURER = curves_module._LayerMeasurer


class _MeasureCounter:
    """Counts the layers whose curves get measured; can kill the run after some."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> None:
        self.count = 0

        def counting(*args: object, **kwargs: object) -> object:
            if fail_after is not None and self.count >= fail_after:
                raise KeyboardInterrupt
            self.count += 1
            return _REAL_MEASURER(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(curves_module, "_LayerMeasurer", counting)


def test_cache_reuse_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(graphs.cnn(), tmp_path)
    cache = tmp_path / "cache"
    settings = PruneSettings(ratio=0.6, levels=11)
    data = CalibrationSpec(synthetic=8)
    # The first run is killed when it starts the third layer (two curves done).
    _MeasureCounter(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        prune(path, settings, data, output=tmp_path / "a.onnx", cache_dir=cache)
    assert not (tmp_path / "a.onnx").exists()
    # The resumed run measures only the two layers left.
    counter = _MeasureCounter(monkeypatch)
    prune(path, settings, data, output=tmp_path / "a.onnx", cache_dir=cache)
    assert counter.count == 2
    # A third run measures nothing and writes the same bytes.
    counter = _MeasureCounter(monkeypatch)
    prune(path, settings, data, output=tmp_path / "b.onnx", cache_dir=cache)
    assert counter.count == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # Without the cache the same file comes out too.
    counter = _MeasureCounter(monkeypatch)
    prune(path, settings, data, output=tmp_path / "c.onnx", cache_dir=None)
    assert counter.count == 4
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    # Other calibration data: the cache is not used.
    counter = _MeasureCounter(monkeypatch)
    prune(path, settings, CalibrationSpec(synthetic=8, seed=1), write=False, cache_dir=cache)
    assert counter.count == 4


def test_iterative_steps_never_decrease_a_layer(tmp_path: Path) -> None:
    path = _save(graphs.cnn(), tmp_path)
    result = prune(
        path,
        PruneSettings(ratio=0.8, levels=21, steps=3),
        CalibrationSpec(synthetic=16),
        write=False,
    )
    steps = result.allocation_info["steps"]
    assert [round(s["target_ratio"], 6) for s in steps] == [
        round(0.8 / 3, 6),
        round(1.6 / 3, 6),
        0.8,
    ]
    for before, after in itertools.pairwise(steps):
        for name, ratio in before["ratios"].items():
            assert after["ratios"][name] >= ratio
    assert {layer.name: layer.ratio for layer in result.layers} == steps[-1]["ratios"]
    assert result.achieved_ratio >= 0.8
    assert result.achieved_ratio == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(UserError, match="--steps"):
        prune(
            path,
            PruneSettings(ratio=0.5, method="global", steps=2),
            CalibrationSpec(synthetic=4),
            write=False,
        )


def test_no_calibration_and_no_layers(tmp_path: Path) -> None:
    path = _save(graphs.cnn(), tmp_path)
    with pytest.raises(UserError, match="no calibration data"):
        prune(path, PruneSettings(ratio=0.5), CalibrationSpec(), write=False)
    with pytest.raises(UserError, match="no prunable layer"):
        prune(
            path,
            PruneSettings(ratio=0.5, exclude=("w*",)),
            CalibrationSpec(synthetic=4),
            write=False,
        )


def test_compact_storage_matches_dense_zeros(tmp_path: Path) -> None:
    model = graphs.cnn()  # w3 has 4608 weights: compaction pays off there
    path = _save(model, tmp_path)
    settings = PruneSettings(ratio=0.9, levels=11)
    data = CalibrationSpec(synthetic=8)
    prune(path, settings, data, output=tmp_path / "dense.onnx")
    prune(path, settings, data, output=tmp_path / "compact.onnx", storage="compact")
    assert (tmp_path / "compact.onnx").stat().st_size < 0.5 * (
        tmp_path / "dense.onnx"
    ).stat().st_size
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    outs = [
        ort.InferenceSession((tmp_path / name).read_bytes()).run(None, {"x": x})[0]
        for name in ("dense.onnx", "compact.onnx")
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(UserError, match="storage"):
        prune(path, settings, data, write=False, storage="zip")


@pytest.mark.parametrize("method", ["rd", "global"])
def test_reconstruct_lowers_distortion_and_keeps_the_mask(tmp_path: Path, method: str) -> None:
    path = _save(graphs.cnn(), tmp_path)
    data = CalibrationSpec(synthetic=64, seed=2)
    plain = prune(path, PruneSettings(ratio=0.7, method=method, levels=11), data, write=False)
    refit = prune(
        path,
        PruneSettings(ratio=0.7, method=method, levels=11, reconstruct=True),
        data,
        write=False,
    )
    assert plain.measured_distortion is not None and refit.measured_distortion is not None
    assert refit.measured_distortion < plain.measured_distortion
    assert refit.achieved_ratio == plain.achieved_ratio
    assert plain.model is not None and refit.model is not None
    before, after = _tensors(plain.model), _tensors(refit.model)
    for layer in refit.layers:
        assert layer.refit is not None
        if layer.refit["method"] != "skipped":
            assert layer.refit["error_after"] <= layer.refit["error_before"]
        else:
            assert layer.ratio == layer.sparsity_before  # nothing pruned, nothing to refit
        # The same positions are zero: the refit moves kept weights only.
        np.testing.assert_array_equal(before[layer.name] == 0, after[layer.name] == 0)


def test_external_data_in_gives_a_fresh_data_file_out(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    graphs.save_external(graphs.cnn(), path)
    before = (tmp_path / "ext.onnx.data").read_bytes()
    out = tmp_path / "out.onnx"
    prune(path, PruneSettings(ratio=0.5, method="global"), CalibrationSpec(synthetic=4), output=out)
    assert (tmp_path / "out.onnx.data").is_file()
    assert (tmp_path / "ext.onnx.data").read_bytes() == before  # the input's data untouched
    ort.InferenceSession(str(out))
