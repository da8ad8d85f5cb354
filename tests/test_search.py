"""Quality targets: bisection over ratios, --max-drop and --max-distortion through the API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from rdprune_onnx import search as search_module
from rdprune_onnx.allocate import Allocation
from rdprune_onnx.errors import UserError
from rdprune_onnx.evaluate import compare
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.quality import Outputs
from rdprune_onnx.search import Probe, QualityTarget, bisect_ratio, ratio_grid
from tests import graphs


def checker(passes: Callable[[float], bool], calls: list[float]) -> Callable[[float], Probe]:
    def check(ratio: float) -> Probe:
        calls.append(ratio)
        ok = passes(ratio)
        return Probe(ratio=ratio, passed=ok, value=0.0 if ok else 1.0, limit=0.5)

    return check


def test_ratio_grid_ends_at_high() -> None:
    assert ratio_grid(0.05, 0.99, 0.01)[:3] == [0.05, 0.06, 0.07]
    assert ratio_grid(0.05, 0.99, 0.01)[-2:] == [0.98, 0.99]
    assert len(ratio_grid(0.05, 0.99, 0.01)) == 95
    assert ratio_grid(0.1, 0.35, 0.1) == [0.1, 0.2, 0.3, 0.35]
    assert ratio_grid(0.4, 0.4, 0.01) == [0.4]


def test_bisection_finds_the_monotone_boundary_in_few_probes() -> None:
    for boundary in (0.05, 0.137, 0.5, 0.637, 0.98, 0.99):
        calls: list[float] = []
        result = bisect_ratio(
            checker(lambda r, b=boundary: r <= b + 1e-12, calls), 0.05, 0.99, 0.01
        )
        assert result.best is not None and result.best.passed
        assert result.best.ratio == pytest.approx(np.floor(boundary * 100 + 1e-9) / 100)
        if boundary < 0.99:
            assert result.failed_above is not None and not result.failed_above.passed
            assert result.failed_above.ratio == pytest.approx(result.best.ratio + 0.01)
        else:
            assert result.failed_above is None
        assert len(calls) == len(set(calls)) <= 2 + 7  # ends, then log2(94) halvings
        assert [p.ratio for p in result.probes] == calls


def test_bisection_never_returns_a_failed_probe_on_non_monotone_quality() -> None:
    rng = np.random.default_rng(0)
    grid = ratio_grid(0.05, 0.99, 0.01)
    for _ in range(300):
        passing = {r for r in grid if rng.random() < rng.uniform(0.2, 0.9)}
        passing.add(grid[0])
        calls: list[float] = []
        result = bisect_ratio(checker(lambda r, s=passing: r in s, calls), 0.05, 0.99, 0.01)
        assert result.best is not None
        assert result.best.passed and result.best.ratio in passing
        # The documented rule: the highest passing probe seen...
        assert result.best.ratio == max(p.ratio for p in result.probes if p.passed)
        # ...and the next grid ratio above it was probed and failed (unless it is the top).
        if result.failed_above is not None:
            assert not result.failed_above.passed
            assert result.failed_above.ratio not in passing
            assert grid.index(result.failed_above.ratio) == grid.index(result.best.ratio) + 1
        else:
            assert result.best.ratio == grid[-1]


def test_bisection_reports_none_when_the_lowest_ratio_fails() -> None:
    calls: list[float] = []
    result = bisect_ratio(checker(lambda r: False, calls), 0.05, 0.99, 0.01)
    assert result.best is None
    assert result.failed_above is not None and result.failed_above.ratio == 0.05
    assert calls == [0.05]


def test_bisection_reuses_known_probes() -> None:
    calls: list[float] = []
    known = {0.8: Probe(ratio=0.8, passed=False, value=1.0, limit=0.5)}
    result = bisect_ratio(checker(lambda r: r <= 0.33, calls), 0.1, 0.8, 0.01, known=known)
    assert 0.8 not in calls
    assert result.best is not None and result.best.ratio == pytest.approx(0.33)


def test_step_back_gallops_down_then_bisects() -> None:
    calls: list[float] = []
    check = checker(lambda r: r <= 0.437, calls)
    first = check(0.8)
    result = search_module._step_back(check, first, 0.05, 0.01)
    assert result.best is not None and result.best.ratio == pytest.approx(0.43)
    assert result.failed_above is not None and result.failed_above.ratio == pytest.approx(0.44)
    assert calls[:6] == [0.8, 0.79, 0.78, 0.76, 0.72, 0.64] and len(calls) == len(set(calls))
    assert [p.ratio for p in result.probes] == calls
    nothing = search_module._step_back(checker(lambda r: False, []), first, 0.05, 0.01)
    assert nothing.best is None and nothing.failed_above is not None
    assert nothing.failed_above.ratio == 0.05


@pytest.fixture
def cnn_files(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    model = tmp_path / "cnn.onnx"
    onnx.save_model(graphs.cnn(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((32, 3, 8, 8)).astype(np.float32))
    test = tmp_path / "test.npz"
    np.savez(test, x=rng.standard_normal((48, 3, 8, 8)).astype(np.float32))
    return {"model": model, "calib": calib, "test": test}


def _calibration(files: dict[str, Path]) -> CalibrationSpec:
    return CalibrationSpec(data=files["calib"], batch_size=16)


def test_max_drop_writes_only_the_chosen_model_and_lists_every_probe(
    cnn_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "chosen.onnx"
    target = QualityTarget(max_drop=0.02, metric="cosine", resolution=0.02)
    result = prune(
        cnn_files["model"],
        PruneSettings(ratio=0.5, levels=21),
        _calibration(cnn_files),
        output=out,
        eval_data=cnn_files["test"],
        target=target,
        report=tmp_path / "report.json",
    )
    search = result.search
    assert search is not None and search["criterion"] == "max_drop"
    chosen = search["chosen_ratio"]
    assert result.settings.ratio == chosen and result.target_ratio == chosen
    probes = search["probes"]
    assert len(probes) >= 3
    assert all(p["passed"] == (p["value"] <= 0.02) for p in probes)
    assert chosen == max(p["ratio"] for p in probes if p["passed"])
    failing = search["next_failing_ratio"]
    assert failing is not None and failing == pytest.approx(chosen + 0.02)
    assert any(p["ratio"] == failing and not p["passed"] for p in probes)
    # The written model meets the target, measured independently of the search.
    check = compare(
        onnx.load(str(cnn_files["model"])), onnx.load(str(out)), {"x": _test(cnn_files)}
    )
    assert 1.0 - check.outputs[0].cosine <= 0.02
    assert result.evaluation is not None
    assert result.evaluation.outputs[0].cosine == pytest.approx(check.outputs[0].cosine, abs=1e-6)
    # Only the chosen model was written; the report records the search.
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["chosen.onnx", "cnn.onnx"]
    assert '"next_failing_ratio"' in (tmp_path / "report.json").read_text()


def _test(files: dict[str, Path]) -> np.ndarray:
    return np.load(files["test"])["x"]


def test_max_drop_is_deterministic(cnn_files: dict[str, Path], tmp_path: Path) -> None:
    outputs = []
    for name in ("a.onnx", "b.onnx"):
        prune(
            cnn_files["model"],
            PruneSettings(ratio=0.5, levels=11, method="lamp"),
            _calibration(cnn_files),
            output=tmp_path / name,
            eval_data=cnn_files["test"],
            target=QualityTarget(max_drop=0.05, metric="agreement", resolution=0.05),
        )
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]


def test_user_metric_hook_receives_dense_and_pruned_outputs(cnn_files: dict[str, Path]) -> None:
    seen: list[tuple[int, bool]] = []

    def negative_mse(dense: Outputs, pruned: Outputs) -> float:
        seen.append((len(dense["y"]), dense is pruned))
        return -float(np.mean((dense["y"] - pruned["y"]) ** 2))

    result = prune(
        cnn_files["model"],
        PruneSettings(ratio=0.5, levels=11),
        _calibration(cnn_files),
        write=False,
        eval_data=cnn_files["test"],
        target=QualityTarget(max_drop=0.01, metric=negative_mse, resolution=0.05),
    )
    assert result.search is not None and result.search["metric"] == "negative_mse"
    assert result.search["dense_metric"] == 0.0
    assert all(n == 48 for n, _ in seen) and any(same for _, same in seen)
    for probe in result.search["probes"]:
        assert probe["value"] == pytest.approx(-probe["pruned_metric"])
    assert result.evaluation is not None
    assert result.evaluation.outputs[0].mse <= 0.01 + 1e-9


def test_max_distortion_uses_the_dual_and_verifies(cnn_files: dict[str, Path]) -> None:
    result = prune(
        cnn_files["model"],
        PruneSettings(ratio=0.5, levels=21),
        _calibration(cnn_files),
        write=False,
        target=QualityTarget(max_distortion=0.02),
    )
    search = result.search
    assert search is not None and search["criterion"] == "max_distortion"
    assert result.measured_distortion is not None and result.measured_distortion <= 0.02
    assert search["dual"]["predicted"] <= 0.02
    assert search["probes"][0]["ratio"] == pytest.approx(min(search["dual"]["ratio"], 0.99))
    assert all(p["passed"] == (p["value"] <= 0.02) for p in search["probes"])


def test_max_distortion_steps_back_when_the_measurement_exceeds_it(
    cnn_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dual that promises far too much: its ratio fails verification, the search steps back.
    def optimistic(*args: object, **kwargs: object) -> Allocation:
        return Allocation(
            counts={n: 0 for n in ("w1", "w2", "w3", "w4")},
            info={"achieved_ratio": 0.95, "objective": 0.0, "exact": True},
        )

    monkeypatch.setattr(search_module, "allocate_within", optimistic)
    result = prune(
        cnn_files["model"],
        PruneSettings(ratio=0.5, levels=21),
        _calibration(cnn_files),
        write=False,
        target=QualityTarget(max_distortion=0.02, resolution=0.02),
    )
    search = result.search
    assert search is not None
    first = search["probes"][0]
    assert first["ratio"] == 0.95 and not first["passed"]
    assert search["chosen_ratio"] < 0.95
    assert result.measured_distortion is not None and result.measured_distortion <= 0.02
    assert search["next_failing_ratio"] is not None


def test_max_distortion_with_lamp_bisects_on_the_measurement(cnn_files: dict[str, Path]) -> None:
    result = prune(
        cnn_files["model"],
        PruneSettings(ratio=0.5, method="lamp"),
        _calibration(cnn_files),
        write=False,
        target=QualityTarget(max_distortion=0.05, resolution=0.05),
    )
    assert result.search is not None and "dual" not in result.search
    assert result.measured_distortion is not None and result.measured_distortion <= 0.05


def test_target_mistakes_are_user_errors(cnn_files: dict[str, Path]) -> None:
    settings = PruneSettings(ratio=0.5, levels=11)
    calibration = _calibration(cnn_files)
    with pytest.raises(UserError, match="needs held-out data"):
        prune(cnn_files["model"], settings, calibration, write=False, target=QualityTarget(0.01))
    with pytest.raises(UserError, match="not both"):
        QualityTarget(max_drop=0.01, max_distortion=1.0).check()
    with pytest.raises(UserError, match="needs labels"):
        prune(
            cnn_files["model"],
            settings,
            calibration,
            write=False,
            eval_data=cnn_files["test"],
            target=QualityTarget(max_drop=0.01, metric="accuracy"),
        )
    with pytest.raises(UserError, match=r"no ratio in 0\.5\.\.0\.9 keeps"):
        prune(
            cnn_files["model"],
            settings,
            calibration,
            write=False,
            eval_data=cnn_files["test"],
            target=QualityTarget(max_drop=0.0, metric="cosine", low=0.5, high=0.9),
        )


@pytest.mark.parametrize("storage", ["dense", "compact"])
def test_chosen_model_is_byte_for_byte_what_prune_writes_at_that_ratio(
    cnn_files: dict[str, Path], tmp_path: Path, storage: str
) -> None:
    settings = PruneSettings(ratio=0.5, levels=21)
    result = prune(
        cnn_files["model"],
        settings,
        _calibration(cnn_files),
        output=tmp_path / "target.onnx",
        eval_data=cnn_files["test"],
        storage=storage,
        target=QualityTarget(max_drop=0.02, metric="cosine", resolution=0.02),
    )
    assert result.search is not None and result.output == str(tmp_path / "target.onnx")
    chosen = result.search["chosen_ratio"]
    prune(
        cnn_files["model"],
        PruneSettings(ratio=chosen, levels=21),
        _calibration(cnn_files),
        output=tmp_path / "ratio.onnx",
        storage=storage,
    )
    assert (tmp_path / "target.onnx").read_bytes() == (tmp_path / "ratio.onnx").read_bytes()


def test_max_drop_and_sweep_on_a_lazy_model(
    cnn_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights left on disk (the large-model route): probes read the staged pruned model."""
    from rdprune_onnx.graph import load
    from rdprune_onnx.sweep import sweep

    monkeypatch.setattr(load, "LAZY_MIN_BYTES", 0)
    folder = tmp_path / "lazy"
    folder.mkdir()
    model = graphs.save_external(graphs.cnn(), folder / "m.onnx")
    target = QualityTarget(max_drop=0.02, metric="cosine", resolution=0.05)
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    result = prune(
        model,
        PruneSettings(ratio=0.5, levels=11),
        _calibration(cnn_files),
        output=out,
        eval_data=cnn_files["test"],
        target=target,
    )
    assert result.search is not None and result.output == str(out) and out.is_file()
    chosen = result.search["chosen_ratio"]
    reference = tmp_path / "out" / "r.onnx"
    prune(
        model,
        PruneSettings(ratio=chosen, levels=11),
        _calibration(cnn_files),
        output=reference,
    )
    dense = onnx.load(str(reference))
    pruned = onnx.load(str(out))
    assert [onnx.numpy_helper.to_array(t).tolist() for t in dense.graph.initializer] == [
        onnx.numpy_helper.to_array(t).tolist() for t in pruned.graph.initializer
    ]
    points = sweep(
        model,
        PruneSettings(ratio=0.5, levels=11),
        _calibration(cnn_files),
        eval_data=cnn_files["test"],
        metric="cosine",
        ratios=[0.3, chosen],
        methods=["rd"],
    ).points
    assert points[1].drop == pytest.approx(result.search["chosen_value"])
