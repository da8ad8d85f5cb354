"""Models with external data keep their large tensors on disk (graph/external.py).

``LAZY_MIN_BYTES`` is patched to 0 so that the small test graphs behave like a 2.5 GB
model: every external tensor stays on disk, and the pipeline takes its lazy route (masks
computed one layer at a time, the pruned model written before it is verified).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx.allocate import AllocationProblem, LayerSpec, get_allocator
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph import load
from rdprune_onnx.graph.external import is_lazy, tensor_array
from rdprune_onnx.graph.layers import find_layers
from rdprune_onnx.graph.load import iter_all_tensors, read_model
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, prune
from tests import graphs
from tests.graphs_external import typed_model


@pytest.fixture(autouse=True)
def _everything_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load, "LAZY_MIN_BYTES", 0)


def _save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return graphs.save_external(model, folder / name)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lazy_model_is_small_in_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    big = numpy_helper.from_array(rng.normal(size=(256, 256)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [big])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    lazy, _ = read_model(_save(model, tmp_path))
    assert len(lazy.SerializeToString()) < 1024  # 256 KiB of weights stayed on disk


def test_small_tensors_are_read_in_above_the_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(load, "LAZY_MIN_BYTES", 50)
    lazy, _ = read_model(_save(typed_model(), tmp_path))
    lazy_names = {t.name for t in iter_all_tensors(lazy) if is_lazy(t)}
    assert lazy_names == {"f32"}  # only the 3x5 float32 (60 bytes) reaches 50 bytes


def test_truncated_data_is_refused(tmp_path: Path) -> None:
    path = _save(graphs.cnn(), tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-16])
    with pytest.raises(UserError, match="missing or truncated"):
        read_model(path, check=False)


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: tensor_array(t) for t in iter_all_tensors(model)}


@pytest.mark.parametrize("method", ["global", "rd", "lamp"])
def test_lazy_prune_equals_in_memory_prune(tmp_path: Path, method: str) -> None:
    """The lazy route writes the same weights as the in-memory one, input untouched."""
    model = graphs.residual()
    inline = tmp_path / "inline.onnx"
    onnx.save_model(model, str(inline))
    external = _save(model, tmp_path / "ext")
    before = (_digest(external), _digest(tmp_path / "ext" / "m.onnx.data"))
    settings = PruneSettings(ratio=0.6, method=method, levels=5)
    calibration = CalibrationSpec(synthetic=8, seed=0)
    plain = prune(inline, settings, calibration, output=tmp_path / "a.onnx", cache_dir=None)
    (tmp_path / "out").mkdir()
    lazy = prune(
        external, settings, calibration, output=tmp_path / "out" / "b.onnx", cache_dir=None
    )
    assert (_digest(external), _digest(tmp_path / "ext" / "m.onnx.data")) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.onnx", "b.onnx.data"]
    ours = _weights(read_model(tmp_path / "out" / "b.onnx")[0])
    theirs = _weights(onnx.load_model(str(tmp_path / "a.onnx")))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert lazy.achieved_ratio == plain.achieved_ratio
    assert [r.pruned for r in lazy.layers] == [r.pruned for r in plain.layers]
    assert lazy.measured_distortion == pytest.approx(plain.measured_distortion, rel=1e-5)
    assert lazy.model is not None  # the written file, loaded
    reloaded = _weights(lazy.model)
    for name in ours:
        np.testing.assert_array_equal(reloaded[name], ours[name])
    ort.InferenceSession(str(tmp_path / "out" / "b.onnx"))


def test_lazy_prune_without_writing(tmp_path: Path) -> None:
    external = _save(graphs.cnn(), tmp_path / "ext")
    result = prune(
        external,
        PruneSettings(ratio=0.5, method="global"),
        CalibrationSpec(synthetic=4),
        write=False,
        cache_dir=None,
    )
    assert result.output is None and result.model is None
    assert result.achieved_ratio == pytest.approx(0.5, abs=1e-3)
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == ["m.onnx", "m.onnx.data"]


def test_global_threshold_in_float32_equals_float64() -> None:
    """float32 magnitudes (no float64 copy) give the float64 counts, ties included."""
    rng = np.random.default_rng(5)
    specs, mags32 = [], {}
    for i, size in enumerate([50, 120, 7, 300]):
        values = rng.choice(np.float32([0.0, 0.5, 0.25, 1.0, 3.0]), size=size)
        values = values * rng.choice([1, 1, 1, 1.0001], size=size).astype(np.float32)
        mags32[f"l{i}"] = (values * rng.choice([-1, 1], size=size)).astype(np.float32)
        specs.append(LayerSpec(f"l{i}", (size,)))
    mags64 = {k: v.astype(np.float64) for k, v in mags32.items()}
    for target in [0.1, 0.33, 0.5, 0.77, 0.95]:
        for method in ("global", "lamp"):
            a = get_allocator(method).allocate(AllocationProblem(specs, target, magnitudes=mags32))
            b = get_allocator(method).allocate(AllocationProblem(specs, target, magnitudes=mags64))
            assert a.counts == b.counts, (method, target)


def test_layers_found_on_lazy_model(tmp_path: Path) -> None:
    model = graphs.cnn()
    lazy, _ = read_model(_save(model, tmp_path))
    a, b = find_layers(model), find_layers(lazy)
    assert [(x.name, x.shape, x.zeros) for x in a.layers] == [
        (x.name, x.shape, x.zeros) for x in b.layers
    ]


def test_model_weights_read_on_access_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from rdprune_onnx import weights as weights_module
    from rdprune_onnx.masks import apply_mask

    model = graphs.cnn()
    names = [layer.name for layer in find_layers(model).layers]
    reads: list[str] = []
    real = weights_module.read_weight

    def counting(m: onnx.ModelProto, name: str) -> np.ndarray:
        reads.append(name)
        return real(m, name)

    monkeypatch.setattr(weights_module, "read_weight", counting)
    counts = {name: 3 for name in names}
    masked = weights_module.ModelWeights(model, names, counts)
    assert names[0] in masked and "nope" not in masked and list(masked) == names
    assert reads == []  # membership and iteration read nothing
    np.testing.assert_array_equal(masked[names[0]], apply_mask(real(model, names[0]), 3))
    assert reads == [names[0]]
    with pytest.raises(KeyError):
        masked["nope"]
