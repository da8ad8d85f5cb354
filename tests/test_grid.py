"""The adaptive grid on real measurements: same values as the full grid where measured,
sparse curve files, allocate outside the refined ratios, kill-and-resume in a round, and
the digits CNN's allocations against the full grid's."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import rdprune_onnx.curves as curves_module
import rdprune_onnx.grid as grid_module
from rdprune_onnx import CalibrationSpec, PruneSettings, UserError, prune
from rdprune_onnx.allocate import LayerSpec
from rdprune_onnx.cache import read_curve_file
from rdprune_onnx.curves import grid, measure_curves, run_reference
from rdprune_onnx.graph.layers import find_layers
from rdprune_onnx.grid import measure_grid
from rdprune_onnx.pipeline import measure, prune_from_curves
from rdprune_onnx.runtime import SessionConfig
from rdprune_onnx_cli.main import cli
from tests import graphs

MODELS = Path(__file__).resolve().parent.parent / "models"
LEVELS = 41
DATA = CalibrationSpec(synthetic=16, batch_size=8, seed=0)


@pytest.fixture
def cnn_file(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save_model(graphs.cnn(), str(path))
    return path


def test_adaptive_points_equal_the_full_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    model = graphs.cnn()
    layers = find_layers(model).layers
    data = {"x": np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)}
    reference = run_reference(model, data, 8, SessionConfig())
    full = measure_curves(model, layers, reference, ratios=grid(LEVELS))
    specs = [LayerSpec(layer.name, layer.shape) for layer in layers]
    saved: dict[str, int] = {}
    built: list[str] = []
    real = curves_module._LayerMeasurer

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(args[1].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(curves_module, "_LayerMeasurer", counting)
    result = measure_grid(
        model,
        layers,
        reference,
        specs,
        levels=LEVELS,
        targets=[0.6],
        on_curve=lambda name, curve: saved.__setitem__(name, curve.ratios.size),
    )
    assert result.converged and result.kind == "adaptive"
    assert result.measured < 0.6 * result.full == 0.6 * len(layers) * LEVELS
    assert sum(result.rounds) == result.measured and len(result.rounds) >= 2
    # Each layer's cut and session were built once and served every round.
    assert sorted(built) == sorted(layer.name for layer in layers)
    for layer in layers:
        curve = result.curves[layer.name]
        assert saved[layer.name] == curve.ratios.size  # the hook saw every point
        index = np.rint(curve.ratios * (LEVELS - 1)).astype(int)
        np.testing.assert_allclose(
            curve.distortion, full[layer.name].distortion[index], rtol=1e-5, atol=1e-9
        )
    whole = measure_grid(model, layers, reference, specs, levels=LEVELS, kind="full")
    assert whole.measured == whole.full and whole.rounds == [whole.full]


def test_sparse_curve_file_round_trips_and_allocates_identically(
    cnn_file: Path, tmp_path: Path
) -> None:
    settings = PruneSettings(ratio=0.6, levels=LEVELS)
    out = tmp_path / "curves.json"
    entry = measure(cnn_file, settings, DATA, output=out, targets=[0.6], cache_dir=None)
    saved = read_curve_file(out)
    assert saved.grid is not None and saved.grid["grid"] == "adaptive"
    assert saved.grid["refined_for"] == [0.6]
    assert saved.grid["curve_points_measured"] < saved.grid["curve_points_full_grid"]
    for name, curve in entry.curves.items():
        np.testing.assert_array_equal(saved.curves[name].ratios, curve.ratios)
        np.testing.assert_array_equal(saved.curves[name].distortion, curve.distortion)
    assert any(c.ratios.size < LEVELS for c in saved.curves.values())
    pruned = prune(cnn_file, settings, DATA, output=tmp_path / "p.onnx", cache_dir=None)
    allocated = prune_from_curves(out, cnn_file, settings, output=tmp_path / "a.onnx")
    assert (tmp_path / "p.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
    report = pruned.to_dict()
    assert report["curve_points_measured"] == saved.grid["curve_points_measured"]
    assert report["curve_points_full_grid"] == 4 * LEVELS
    assert allocated.curve_points is None  # allocate measured nothing


def test_allocate_outside_the_refined_ratios(cnn_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.json"
    measure(cnn_file, PruneSettings(ratio=0.5, levels=LEVELS), DATA, output=out, targets=[0.5])
    low = PruneSettings(ratio=0.15)  # as the allocate command builds it: --levels unset
    with pytest.raises(UserError, match=r"refined for 0\.5") as info:
        prune_from_curves(out, cnn_file, low, write=False)
    assert "--data" in (info.value.hint or "")
    # With the data the curves were measured on, the missing points are measured.
    result = prune_from_curves(out, cnn_file, low, calibration=DATA, write=False)
    assert result.curve_points is not None and sum(result.curve_points["rounds"]) > 0
    assert result.achieved_ratio == pytest.approx(0.15, abs=1e-3)
    fresh = prune(cnn_file, replace(low, levels=LEVELS), DATA, write=False, cache_dir=None)
    assert [r.pruned for r in result.layers] == [r.pruned for r in fresh.layers]
    # Other data: refused, not silently mixed.
    other = CalibrationSpec(synthetic=16, batch_size=8, seed=5)
    with pytest.raises(UserError, match="differ"):
        prune_from_curves(out, cnn_file, low, calibration=other, write=False)


class _Recorder:
    """Records the points each measure_curves call of the grid measures; can kill the run
    after a number of layers of a given round have been measured (and saved)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kill: tuple[int, int] | None = None):
        self.points: list[tuple[str, float]] = []
        self.calls = 0

        def recording(*args: Any, **kwargs: Any) -> Any:
            number = self.calls
            self.calls += 1
            ratios: Mapping[str, np.ndarray] = kwargs["layer_ratios"]
            hook = kwargs["on_curve"]
            finished = [0]

            def save(name: str, curve: Any) -> None:
                hook(name, curve)
                self.points += [(name, float(r)) for r in ratios[name]]
                finished[0] += 1
                if kill is not None and number == kill[0] and finished[0] >= kill[1]:
                    raise KeyboardInterrupt

            kwargs["on_curve"] = save
            return measure_curves(*args, **kwargs)

        monkeypatch.setattr(grid_module, "measure_curves", recording)


def test_kill_and_resume_in_the_middle_of_a_refinement_round(
    cnn_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = PruneSettings(ratio=0.7, levels=LEVELS)
    cache = tmp_path / "cache"
    whole = _Recorder(monkeypatch)
    prune(cnn_file, settings, DATA, output=tmp_path / "a.onnx", cache_dir=None)
    assert whole.calls >= 3  # coarse round and at least two refinement rounds
    # Killed after two layers of the first refinement round were measured and saved.
    killed = _Recorder(monkeypatch, kill=(1, 2))
    with pytest.raises(KeyboardInterrupt):
        prune(cnn_file, settings, DATA, output=tmp_path / "b.onnx", cache_dir=cache)
    assert not (tmp_path / "b.onnx").exists()
    before = set(killed.points)
    assert len({name for name, _ in before}) == 4 and len(before) > 4 * 9
    resumed = _Recorder(monkeypatch)
    result = prune(cnn_file, settings, DATA, output=tmp_path / "b.onnx", cache_dir=cache)
    assert not before & set(resumed.points)  # no point measured twice
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert result.curve_points is not None
    assert result.curve_points["curve_points_measured"] == len(before | set(resumed.points))
    # A third run finds every point in the cache.
    again = _Recorder(monkeypatch)
    prune(cnn_file, settings, DATA, write=False, cache_dir=cache)
    assert again.calls == 0


def test_full_grid_and_cli_option(cnn_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    args = ["prune", str(cnn_file), "--ratio", "0.6", "--levels", "21", "--synthetic", "16"]
    args += ["--batch-size", "8", "--no-progress", "--no-cache", "--report", str(report)]
    code = CliRunner().invoke(cli, [*args, "--grid", "full", "-o", str(tmp_path / "f.onnx")])
    assert code.exit_code == 0, code.output
    assert "curve points measured: 84 of 84 (full grid)" in code.output
    assert json.loads(report.read_text())["curve_points_measured"] == 84
    code = CliRunner().invoke(cli, [*args, "--force", "-o", str(tmp_path / "a.onnx")])
    assert code.exit_code == 0, code.output
    saved = json.loads(report.read_text())
    assert saved["curve_grid"]["grid"] == "adaptive"
    assert saved["curve_points_measured"] < 84 and saved["curve_points_full_grid"] == 84
    code = CliRunner().invoke(cli, [*args, "--grid", "coarse", "-o", str(tmp_path / "x.onnx")])
    assert code.exit_code != 0 and "coarse" in code.output


@pytest.fixture(scope="module")
def digits_full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN's curves on the whole 101-level grid (measured once)."""
    out = tmp_path_factory.mktemp("digits") / "full.json"
    settings = PruneSettings(ratio=0.5, grid="full")
    measure(MODELS / "digits_cnn.onnx", settings, DIGITS, output=out, cache_dir=None)
    return out


DIGITS = CalibrationSpec(data=MODELS / "digits_calib.npz")


@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9])
def test_digits_adaptive_matches_the_full_grid(digits_full: Path, ratio: float) -> None:
    """Same allocation, or a measured distortion within 1% of the full grid's."""
    model = MODELS / "digits_cnn.onnx"
    settings = PruneSettings(ratio=ratio)
    full = prune_from_curves(digits_full, model, settings, calibration=DIGITS, write=False)
    assert full.curve_points is None  # the full grid covers every ratio
    adaptive = prune(model, settings, DIGITS, write=False, cache_dir=None)
    assert adaptive.curve_points is not None
    assert adaptive.curve_points["curve_points_measured"] <= 0.3 * 5 * 101
    assert adaptive.measured_distortion is not None and full.measured_distortion is not None
    same = [a.pruned for a in adaptive.layers] == [f.pruned for f in full.layers]
    assert same or adaptive.measured_distortion <= 1.01 * full.measured_distortion


def test_steps_and_refit_curves_go_through_the_scheduler(cnn_file: Path) -> None:
    steps = prune(cnn_file, PruneSettings(ratio=0.7, levels=21, steps=2), DATA, write=False)
    assert steps.curve_points is not None
    assert steps.curve_points["curve_points_full_grid"] == 2 * 4 * 21  # two measurements
    assert steps.curve_points["curve_points_measured"] < 2 * 4 * 21
    assert steps.achieved_ratio == pytest.approx(0.7, abs=1e-3)
    refit = PruneSettings(ratio=0.6, levels=21, refit_curves=True)
    result = prune(cnn_file, refit, DATA, write=False, cache_dir=None)
    assert result.curve_points is not None and result.curve_points["grid"] == "adaptive"
    assert result.curve_points["curve_points_measured"] < 4 * 21
    full = prune(cnn_file, replace(refit, grid="full"), DATA, write=False, cache_dir=None)
    for layer in result.layers:  # the adaptive points are the full grid's refit points
        got, want = result.curves[layer.name], full.curves[layer.name]  # type: ignore[index]
        index = np.rint(got.ratios * 20).astype(int)
        np.testing.assert_allclose(got.distortion, want.distortion[index], rtol=1e-5, atol=1e-9)


def test_a_lazy_model_keeps_no_sessions_between_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adaptive grid keeps each layer's session and the dense crossing tensors between
    rounds, except for a model whose weights stay on disk: there the kept sessions (each
    holding its weight) took the 2.25 GiB model of tests/test_large.py from 1.5x to 2.7x."""
    from rdprune_onnx.graph.load import read_model
    from rdprune_onnx.memory import DEFAULT_MEMORY_BUDGET
    from tests.graphs_external import all_lazy, save_in

    model = graphs.cnn()
    assert grid_module.round_sessions(model).max_bytes == DEFAULT_MEMORY_BUDGET
    all_lazy(monkeypatch)
    lazy, _ = read_model(save_in(model, tmp_path))
    assert grid_module.round_sessions(lazy).max_bytes == 0
