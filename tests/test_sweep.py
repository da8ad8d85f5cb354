"""sweep: every method and ratio scored on held-out data, cached point by point."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from rdprune_onnx.errors import UserError
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.sweep import SweepPoint, parse_methods, parse_ratio_grid, sweep
from rdprune_onnx.sweep_plot import plot_sweep
from tests import graphs


class Killed(Exception):
    """Stands for the process being killed in the middle of a sweep."""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    model = tmp_path / "cnn.onnx"
    onnx.save_model(graphs.cnn(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    test = tmp_path / "test.npz"
    np.savez(
        test,
        x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32),
        y=rng.integers(0, 10, 40),
    )
    return {"model": model, "calib": calib, "test": test}


def _run(files: dict[str, Path], cache: Path | None, **kwargs: object) -> list[SweepPoint]:
    result = sweep(
        files["model"],
        PruneSettings(ratio=0.5, levels=11),
        CalibrationSpec(data=files["calib"], batch_size=16),
        eval_data=files["test"],
        labels="y",
        ratios=[0.3, 0.5, 0.7],
        methods=["rd", "global"],
        cache_dir=cache,
        **kwargs,  # type: ignore[arg-type]
    )
    return result.points


def test_parse_ratio_grid() -> None:
    grid = parse_ratio_grid("0.3:0.95:0.05")
    assert len(grid) == 14 and grid[0] == 0.3 and grid[-1] == 0.95
    assert grid[1] == 0.35  # rounded, not 0.35000000000000003
    assert parse_ratio_grid("0.9, 0.5,0.5") == [0.5, 0.9]
    for bad in ("0.3:0.9", "a,b", "0.5:0.3:0.1", "0:0.5:0.1", "0.5,1.0", ""):
        with pytest.raises(UserError):
            parse_ratio_grid(bad)
    assert parse_methods("rd, lamp,rd") == ["rd", "lamp"]
    with pytest.raises(UserError, match="unknown method"):
        parse_methods("rd,magic")


def test_sweep_points_match_prune_at_each_ratio(files: dict[str, Path], tmp_path: Path) -> None:
    points = _run(files, None)
    assert [(p.method, p.ratio) for p in points] == [
        (m, r) for m in ("rd", "global") for r in (0.3, 0.5, 0.7)
    ]
    # A point is what prune gives at that ratio and method (same pipeline stages).
    for point in (points[1], points[5]):
        result = prune(
            files["model"],
            PruneSettings(ratio=point.ratio, method=point.method, levels=11),
            CalibrationSpec(data=files["calib"], batch_size=16),
            write=False,
            eval_data=files["test"],
            labels="y",
        )
        assert result.evaluation is not None
        assert point.metric == pytest.approx(result.evaluation.pruned_accuracy)
        assert point.measured == pytest.approx(result.measured_distortion)
        assert point.achieved_ratio == pytest.approx(result.achieved_ratio)
    # Predicted distortion for every method (read off the curves), growing with the ratio.
    for method in ("rd", "global"):
        mine = [p for p in points if p.method == method]
        assert all(p.predicted is not None and p.predicted > 0 for p in mine)
        measured = [p.measured for p in mine]
        assert measured == sorted(measured)  # type: ignore[type-var]


def test_killed_sweep_resumes_without_re_evaluating(files: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    seen: list[SweepPoint] = []

    def kill_after_four(point: SweepPoint) -> None:
        seen.append(point)
        if len(seen) == 4:
            raise Killed

    with pytest.raises(Killed):
        _run(files, cache, on_point=kill_after_four)
    assert [p.cached for p in seen] == [False] * 4
    resumed: list[SweepPoint] = []
    points = _run(files, cache, on_point=resumed.append)
    assert [p.cached for p in resumed] == [True] * 4 + [False] * 2
    # The resumed sweep equals one run from scratch.
    fresh = _run(files, None)
    for a, b in zip(points, fresh, strict=True):
        assert (a.method, a.ratio, a.metric, a.measured) == (
            b.method,
            b.ratio,
            b.metric,
            b.measured,
        )
    # Other settings are another sweep: nothing is reused.
    again: list[SweepPoint] = []
    sweep(
        files["model"],
        PruneSettings(ratio=0.5, levels=11, exclude=("w1",)),
        CalibrationSpec(data=files["calib"], batch_size=16),
        eval_data=files["test"],
        labels="y",
        ratios=[0.3],
        methods=["rd"],
        cache_dir=cache,
        on_point=again.append,
    )
    assert [p.cached for p in again] == [False]


def test_sweep_writes_json_and_png_and_protects_files(
    files: dict[str, Path], tmp_path: Path
) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    _run(files, None, output=out, plot=png)
    data = json.loads(out.read_text())
    assert data["format"] == "rdprune-onnx-sweep/1" and len(data["points"]) == 6
    assert data["metric"] == "accuracy"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="already exists"):
        _run(files, None, output=out)
    with pytest.raises(UserError, match="refusing to overwrite the evaluation data"):
        _run(files, None, output=files["test"], force=True)
    with pytest.raises(UserError, match="image format"):
        _run(files, None, plot=tmp_path / "sweep.bmp")


def test_plot_without_matplotlib_is_one_clear_error(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s.json"
    _run(files, None, output=out)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"pip install 'rdprune-onnx\[plot\]'"):
        plot_sweep(json.loads(out.read_text()), tmp_path / "s.png")
