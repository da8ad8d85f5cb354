"""rdprune_onnx.cache: what identifies a set of curves (model, data and settings
fingerprints), the curves file's format, and the resumable cache that never hands back a
curve measured on anything else, nor a damaged one."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rdprune_onnx.allocate import Curve
from rdprune_onnx.cache import (
    FORMAT,
    CurveCache,
    CurveFile,
    curve_problem,
    data_fingerprint,
    default_cache_dir,
    model_fingerprint,
    read_curve_file,
)
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import find_layers
from rdprune_onnx.graph.load import iter_all_tensors, read_model
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, curve_entry, prune
from tests import graphs
from tests.graphs_external import all_lazy, save_in

LAYERS = {"w1": 216, "w2": 144}


def _curve(name: str, scale: float = 1.0, points: int = 5) -> Curve:
    ratios = np.linspace(0.0, 1.0, points)
    return Curve(name, ratios, scale * ratios**2)


def _entry(**changes: Any) -> CurveFile:
    fields: dict[str, Any] = {
        "model": "m" * 64,
        "data": "d" * 64,
        "settings": {"metric": "mse", "levels": 5, "provider": "cpu", "batch_size": 8},
        "layers": dict(LAYERS),
    }
    fields.update(changes)
    return CurveFile(**fields)


def _full(entry: CurveFile) -> CurveFile:
    entry.curves = {"w1": _curve("w1"), "w2": _curve("w2", 3.0)}
    return entry


def _assert_curves_equal(got: dict[str, Curve], want: dict[str, Curve]) -> None:
    assert sorted(got) == sorted(want)
    for name, curve in want.items():
        np.testing.assert_array_equal(got[name].ratios, curve.ratios)
        np.testing.assert_array_equal(got[name].distortion, curve.distortion)


# --- fingerprints ------------------------------------------------------------------------


def test_model_fingerprint_follows_values_and_structure_only() -> None:
    model = graphs.cnn()
    before = model.SerializeToString()
    base = model_fingerprint(model)
    assert base == model_fingerprint(graphs.cnn())  # a fresh build of the same graph
    assert model.SerializeToString() == before  # the model is only read
    # Storage and tool metadata are not content.
    typed = graphs.cnn()
    for tensor in typed.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            values = numpy_helper.to_array(tensor).reshape(-1).tolist()
            tensor.ClearField("raw_data")
            tensor.float_data.extend(values)
    typed.producer_version = "something else"
    assert model_fingerprint(typed) == base
    # One weight, one element, by one step of float32: another model.
    weight = numpy_helper.to_array(model.graph.initializer[0]).copy()
    weight.flat[7] = np.nextafter(weight.flat[7], np.float32(np.inf))
    changed = replace_weights(model, {model.graph.initializer[0].name: weight})
    assert model_fingerprint(changed) != base
    # The structure: an attribute, a node's name.
    padded = graphs.cnn()
    padded.graph.node[0].attribute[0].ints[:] = [0, 0, 0, 0]
    assert model_fingerprint(padded) != base
    renamed = graphs.cnn()
    renamed.graph.node[0].name = "conv_first"
    assert model_fingerprint(renamed) != base


def test_fingerprint_does_not_depend_on_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    all_lazy(monkeypatch)
    model = graphs.cnn()
    lazy, _ = read_model(save_in(model, tmp_path))
    assert all(t.external_data for t in iter_all_tensors(lazy))
    assert model_fingerprint(lazy) == model_fingerprint(model)


def test_data_fingerprint_follows_names_values_types_and_shapes() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    mask = np.ones((4, 6), np.int64)
    base = data_fingerprint({"x": x, "mask": mask})
    assert data_fingerprint({"mask": mask.copy(), "x": x.copy()}) == base  # order: no
    assert data_fingerprint({"x": np.asfortranarray(x), "mask": mask}) == base  # layout: no
    bumped = x.copy()
    bumped[3, 5] += 1e-6
    for other in (
        {"x": bumped, "mask": mask},
        {"x": x.astype(np.float64), "mask": mask},
        {"x": x.reshape(6, 4), "mask": mask},
        {"y": x, "mask": mask},
        {"x": x},
        {"x": x[:3], "mask": mask[:3]},
    ):
        assert data_fingerprint(other) != base


def test_the_key_changes_with_model_data_and_each_setting_only() -> None:
    base = _entry()
    assert len(base.key) == 32 and int(base.key, 16) >= 0
    reordered = dict(reversed(list(base.settings.items())))
    assert _entry(settings=reordered).key == base.key
    # What was measured, and how many points so far, are not the identity.
    assert _full(_entry(layers={"w1": 1})).key == base.key
    assert _entry(grid={"kind": "adaptive"}).key == base.key
    keys = {base.key, _entry(model="n" * 64).key, _entry(data="e" * 64).key}
    for name, value in [("metric", "kl"), ("levels", 6), ("provider", "cuda"), ("batch_size", 4)]:
        keys.add(_entry(settings=base.settings | {name: value}).key)
    keys.add(_entry(settings=base.settings | {"mask": "wanda"}).key)
    assert len(keys) == 8  # all different


def test_curve_entry_keys_on_the_settings_that_change_curves(tmp_path: Path) -> None:
    """``pipeline.curve_entry`` puts into the key what changes the measured curves (metric,
    levels, provider, batch size, curve mask, refit) and nothing else (the target ratio,
    the allocator, the budget, bounds)."""
    model = graphs.cnn()
    layers = find_layers(model).layers
    data = {"x": np.zeros((4, 3, 8, 8), np.float32)}
    settings = PruneSettings(ratio=0.5, levels=11)

    def key(settings: PruneSettings, provider: str = "cpu", batch: int = 8) -> str:
        return curve_entry(model, layers, data, settings, provider, batch).key

    base = key(settings)
    same = [
        dataclasses.replace(settings, ratio=0.9),
        dataclasses.replace(settings, method="lamp"),
        dataclasses.replace(settings, budget="flops"),
        dataclasses.replace(settings, max_layer_ratio=0.95),
        dataclasses.replace(settings, exclude=("w1",)),
    ]
    for other in same:
        assert key(other) == base, other
    different = {
        key(dataclasses.replace(settings, metric="worst")),
        key(dataclasses.replace(settings, levels=21)),
        key(settings, provider="cuda"),
        key(settings, batch=4),
        key(dataclasses.replace(settings, mask="wanda")),
        key(dataclasses.replace(settings, refit_curves=True)),
        key(dataclasses.replace(settings, refit_curves=True, refit_solver="exact")),
    }
    assert len(different) == 7 and base not in different
    other_data = curve_entry(
        model, layers, {"x": np.ones((4, 3, 8, 8), np.float32)}, settings, "cpu", 8
    )
    assert other_data.key != base


# --- the curves file -----------------------------------------------------------------------


def test_curve_file_round_trip(tmp_path: Path) -> None:
    entry = _full(_entry(grid={"kind": "adaptive", "levels": 5}))
    raw = entry.to_dict()
    assert raw["format"] == FORMAT
    assert set(raw) == {
        "format",
        "model_fingerprint",
        "data_fingerprint",
        "settings",
        "layers",
        "curves",
        "grid",
    }
    assert set(raw["curves"]["w1"]) == {"ratios", "distortion", "checksum"}
    assert "grid" not in _full(_entry()).to_dict()  # not recorded: absent
    path = tmp_path / "c.json"
    entry.save(path)
    back = read_curve_file(path)
    assert back.matches(entry) and back.key == entry.key and back.layers == entry.layers
    assert back.grid == entry.grid
    _assert_curves_equal(back.curves, entry.curves)
    entry.save(path)  # saving again replaces the file, byte for byte the same
    first = path.read_bytes()
    entry.save(path)
    assert path.read_bytes() == first


def test_damaged_curves_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    with pytest.raises(UserError, match="does not exist"):
        read_curve_file(path)
    _full(_entry()).save(path)
    text = path.read_text()
    for damaged in (text[: len(text) // 2], "[]", json.dumps({"format": "other/1"})):
        path.write_text(damaged)
        with pytest.raises(UserError, match="is not a curves file"):
            read_curve_file(path)
    raw = json.loads(text)
    raw["curves"]["w2"]["distortion"][1] = float("nan")
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="curve of 'w2' is unusable"):
        read_curve_file(path)


def test_curve_problem_names_what_is_wrong() -> None:
    ratios = np.linspace(0.0, 1.0, 4)
    good = np.array([0.0, 0.1, 0.3, 1.0])

    def problem(r: np.ndarray, d: np.ndarray) -> str | None:
        return curve_problem(Curve("w", r, d))

    assert problem(ratios, good) is None
    assert problem(ratios[:1], good[:1]) == "1 distortions for 1 ratios"
    assert problem(ratios, np.array([0.0, np.nan, 0.3, 1.0])) == "NaN or Inf values"
    assert problem(ratios, np.array([0.0, 0.1, np.inf, 1.0])) == "NaN or Inf values"
    assert problem(ratios, -good) == "negative distortion"
    assert problem(ratios[::-1], good) == "ratios not increasing within [0, 1]"
    assert problem(np.array([0.0, 0.5, 0.5, 1.0]), good) == "ratios not increasing within [0, 1]"
    assert problem(ratios * 1.5, good) == "ratios not increasing within [0, 1]"


# --- the cache folder --------------------------------------------------------------------


def test_stored_curves_come_back_for_the_same_entry_only(tmp_path: Path) -> None:
    cache = CurveCache(tmp_path / "cache")
    entry = _full(_entry())
    assert cache.load(entry) == {}  # nothing stored yet
    cache.store(entry)
    assert cache.path(entry) == tmp_path / "cache" / f"{entry.key}.json"
    _assert_curves_equal(cache.load(_entry()), entry.curves)
    assert cache.load(_entry(settings=entry.settings | {"levels": 6})) == {}
    assert cache.load(_entry(data="e" * 64)) == {}
    # A layer whose size changed is measured again; the others are kept.
    _assert_curves_equal(
        cache.load(_entry(layers={"w1": 216, "w2": 145})), {"w1": entry.curves["w1"]}
    )
    # A file at the entry's path that belongs to something else is not used.
    foreign = _full(_entry(model="n" * 64))
    cache.path(entry).write_text(json.dumps(foreign.to_dict()))
    assert cache.load(_entry()) == {}


def test_a_partial_cache_resumes_from_the_curves_it_holds(tmp_path: Path) -> None:
    cache = CurveCache(tmp_path)
    entry = _entry()
    entry.curves = {"w1": _curve("w1")}  # as after a run killed before its second layer
    cache.store(entry)
    _assert_curves_equal(cache.load(_entry()), {"w1": entry.curves["w1"]})


@pytest.mark.parametrize("damage", ["truncated", "not-json", "wrong-format", "empty"])
def test_a_corrupt_cache_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cache = CurveCache(tmp_path)
    entry = _full(_entry())
    cache.store(entry)
    path = cache.path(entry)
    text = path.read_text()
    path.write_text(
        {
            "truncated": text[: len(text) * 2 // 3],
            "not-json": "\x00\x01garbage",
            "wrong-format": json.dumps({"format": FORMAT, "curves": {}}),
            "empty": "",
        }[damage]
    )
    with caplog.at_level(logging.WARNING):
        assert cache.load(_entry()) == {}
    assert any(str(path) in r.getMessage() for r in caplog.records)
    cache.store(entry)  # the next store repairs it
    _assert_curves_equal(cache.load(_entry()), entry.curves)


def test_a_curve_failing_its_checksum_is_dropped_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = CurveCache(tmp_path)
    entry = _full(_entry())
    cache.store(entry)
    raw = json.loads(cache.path(entry).read_text())
    raw["curves"]["w2"]["distortion"][2] *= 1.001  # plausible, but not what was measured
    cache.path(entry).write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        kept = cache.load(_entry())
    _assert_curves_equal(kept, {"w1": entry.curves["w1"]})
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "w2 (checksum mismatch)" in warning


def test_a_cache_that_cannot_be_written_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        CurveCache(blocker / "cache").store(_full(_entry()))
    assert any("could not write the curve cache" in r.getMessage() for r in caplog.records)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RDPRUNE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("RDPRUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "rdprune-onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "rdprune-onnx"


def test_the_lock_is_per_entry(tmp_path: Path) -> None:
    cache = CurveCache(tmp_path)
    a = CurveFile("m1", "d", {}, {})
    b = CurveFile("m2", "d", {}, {})
    order: list[str] = []
    with cache.locked(a):

        def other(entry: CurveFile, label: str) -> None:
            with cache.locked(entry):
                order.append(label)

        same = threading.Thread(target=other, args=(a, "same"))
        different = threading.Thread(target=other, args=(b, "different"))
        same.start()
        different.start()
        different.join(timeout=10)
        time.sleep(0.2)
        order.append("released")
    same.join(timeout=10)
    assert order == ["different", "released", "same"]
    assert not list(tmp_path.glob("*.lock"))  # lock files do not pile up


def test_a_killed_prune_resumes_from_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache as a run killed after two layers leaves it: the next prune measures the
    other two layers only and writes the same bytes as an uninterrupted run."""
    model = tmp_path / "m.onnx"
    onnx.save_model(graphs.cnn(), str(model))
    settings, data = PruneSettings(ratio=0.6, levels=11), CalibrationSpec(synthetic=8)
    cache = tmp_path / "cache"
    prune(model, settings, data, output=tmp_path / "a.onnx", cache_dir=cache)
    (path,) = cache.glob("*.json")
    raw = json.loads(path.read_text())
    for name in ("w3", "w4"):
        del raw["curves"][name]
    path.write_text(json.dumps(raw))
    stored: list[list[str]] = []
    real = CurveCache.store

    def recording(self: CurveCache, entry: CurveFile) -> None:
        stored.append(sorted(entry.curves))
        real(self, entry)

    monkeypatch.setattr(CurveCache, "store", recording)
    prune(model, settings, data, output=tmp_path / "b.onnx", cache_dir=cache)
    assert stored == [["w1", "w2", "w3"], ["w1", "w2", "w3", "w4"]]  # one store per layer
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
