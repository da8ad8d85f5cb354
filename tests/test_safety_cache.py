"""Curve cache integrity (issue 12, item 3): checksummed entries, bad ones re-measured
with one warning naming the file, one lock file per entry for concurrent runs."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import onnx
import pytest

from rdprune_onnx import curves as curves_module
from rdprune_onnx.errors import UserError
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, measure, prune, prune_from_curves
from tests import graphs

_REAL = curves_module._LayerMeasurer


class _Counter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        lock = threading.Lock()

        def counting(context: object, layer: object, *args: object, **kwargs: object) -> object:
            with lock:
                self.names.append(layer.name)  # type: ignore[attr-defined]
            return _REAL(context, layer, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(curves_module, "_LayerMeasurer", counting)


SETTINGS = PruneSettings(ratio=0.6, levels=11)
DATA = CalibrationSpec(synthetic=8)


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save_model(graphs.cnn(), str(path))
    return path


def _entry_file(cache: Path) -> Path:
    (entry,) = cache.glob("*.json")
    return entry


def _edit(entry: Path, layer: str, change: str) -> None:
    raw = json.loads(entry.read_text())
    curve = raw["curves"][layer]
    if change == "one-number":
        curve["distortion"][3] = curve["distortion"][3] * 0.01
    elif change == "nan":
        curve["distortion"][3] = float("nan")
    elif change == "negative":
        curve["distortion"] = [-d for d in curve["distortion"]]
    elif change == "ten-points":
        curve["ratios"] = curve["ratios"][:10]
        curve["distortion"] = curve["distortion"][:10]
    elif change == "no-checksum":
        del curve["checksum"]
    entry.write_text(json.dumps(raw))


@pytest.mark.parametrize("change", ["one-number", "nan", "negative", "ten-points", "no-checksum"])
def test_a_bad_cache_entry_is_named_and_re_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    model = _model(tmp_path)
    cache = tmp_path / "cache"
    prune(model, SETTINGS, DATA, output=tmp_path / "a.onnx", cache_dir=cache)
    _edit(_entry_file(cache), "w3", change)
    counter = _Counter(monkeypatch)
    with caplog.at_level(logging.WARNING):
        prune(model, SETTINGS, DATA, output=tmp_path / "b.onnx", cache_dir=cache)
    assert counter.names == ["w3"]  # only the bad entry is measured again
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(_entry_file(cache)) in warnings[0] and "w3" in warnings[0]
    # Same bytes as the first run: the hand edit changed nothing.
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_bad_curves_file_is_refused_by_allocate(tmp_path: Path) -> None:
    model = _model(tmp_path)
    out = tmp_path / "c.json"
    measure(model, SETTINGS, DATA, output=out)
    raw = json.loads(out.read_text())
    raw["curves"]["w3"]["distortion"][2] = -1.0
    out.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="negative distortion"):
        prune_from_curves(out, model, SETTINGS, write=False)


def test_concurrent_runs_measure_each_layer_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(tmp_path)
    cache = tmp_path / "cache"
    counter = _Counter(monkeypatch)
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            prune(model, SETTINGS, DATA, output=tmp_path / name, cache_dir=cache)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"{i}.onnx",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(counter.names) == ["w1", "w2", "w3", "w4"]
    assert len({(tmp_path / f"{i}.onnx").read_bytes() for i in range(3)}) == 1
    json.loads(_entry_file(cache).read_text())  # never corrupt
