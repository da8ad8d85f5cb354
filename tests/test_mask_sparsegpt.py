"""``--mask sparsegpt`` through the pipeline: the refit chooses the masks (OBS) at the
allocated counts, refit is implied, rd curves are magnitude ones unless refit-aware (then
each point is selected and refit), the curve cache keys follow, and the CLI options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rdprune_onnx import CalibrationSpec, PruneSettings, UserError, prune
from rdprune_onnx.curve_source import refit_candidates
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.masks import apply_mask
from rdprune_onnx.pipeline import curve_entry
from rdprune_onnx.reconstruct import SELECT_METHOD, reconstruct
from rdprune_onnx.runtime import SessionConfig
from rdprune_onnx_cli.main import cli
from tests import graphs


def _setup(folder: Path) -> tuple[onnx.ModelProto, Path, CalibrationSpec, dict[str, np.ndarray]]:
    model = graphs.cnn()
    path = folder / "m.onnx"
    onnx.save_model(model, str(path))
    data = {"x": np.random.default_rng(3).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    np.savez(folder / "d.npz", **data)
    return model, path, CalibrationSpec(data=folder / "d.npz", batch_size=8), data


def test_sparsegpt_implies_the_refit_and_selects_the_masks() -> None:
    settings = PruneSettings(ratio=0.5, mask="sparsegpt")
    assert settings.reconstruct and settings.select_masks
    assert settings.curve_mask == "magnitude"  # plain curves unless refit-aware
    assert PruneSettings(ratio=0.5, mask="sparsegpt", refit_curves=True).curve_mask == "sparsegpt"
    assert PruneSettings(ratio=0.5, mask="wanda").curve_mask == "wanda"
    broken = PruneSettings(ratio=0.5, mask="sparsegpt")
    broken.reconstruct = False
    with pytest.raises(UserError, match="always refits"):
        broken.check()
    with pytest.raises(UserError, match="refit inputs"):
        PruneSettings(ratio=0.5, refit_inputs="upstream").check()


@pytest.mark.parametrize("inputs", ["sequential", "dense"])
def test_final_weights_are_the_selecting_refit_of_the_allocation(
    tmp_path: Path, inputs: str
) -> None:
    """uniform + sparsegpt = reconstruct(select=True) of the magnitude masks at the same
    counts, with the same refit inputs; every count exact; the masks are re-chosen."""
    model, path, spec, data = _setup(tmp_path)
    settings = PruneSettings(ratio=0.6, method="uniform", mask="sparsegpt", refit_inputs=inputs)
    result = prune(path, settings, spec, write=False)
    assert result.model is not None
    layers = find_layers(model).layers
    counts = {r.name: r.pruned for r in result.layers}
    masked = {
        layer.name: apply_mask(read_weight(model, layer.name), counts[layer.name])
        for layer in layers
    }
    expected = reconstruct(
        model,
        masked,
        layers,
        data,
        batch_size=8,
        config=SessionConfig(),
        select=True,
        inputs=inputs,
    )
    moved = 0
    for layer in layers:
        got = read_weight(result.model, layer.name)
        np.testing.assert_array_equal(got, expected.weights[layer.name])
        assert int(np.count_nonzero(got == 0)) == counts[layer.name]
        moved += int(np.count_nonzero((got == 0) != (masked[layer.name] == 0)))
    assert moved > 0, "sparsegpt kept every magnitude mask"
    methods = {r.refit["method"] for r in result.layers if r.refit}
    assert SELECT_METHOD in methods
    assert result.to_dict()["settings"]["refit_inputs"] == inputs


def test_rd_with_selecting_refit_curves(tmp_path: Path) -> None:
    """rd + sparsegpt + refit-aware curves: exact target, curves unlike the magnitude refit
    ones (each point is a selected mask), and the same bytes twice."""
    _, path, spec, _ = _setup(tmp_path)
    settings = PruneSettings(ratio=0.7, levels=6, mask="sparsegpt", refit_curves=True)
    first = prune(path, settings, spec, output=tmp_path / "a.onnx")
    second = prune(path, settings, spec, output=tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    total = sum(layer.size for layer in first.layers)
    assert sum(layer.pruned for layer in first.layers) == math.ceil(0.7 * total)
    plain = prune(path, PruneSettings(ratio=0.7, levels=6, refit_curves=True), spec, write=False)
    assert first.curves is not None and plain.curves is not None
    assert second.curves is not None
    assert any(
        not np.allclose(first.curves[n].distortion, plain.curves[n].distortion)
        for n in first.curves
    )


def test_curve_keys_follow_the_curve_mask(tmp_path: Path) -> None:
    model, _, _, data = _setup(tmp_path)
    layers = find_layers(model).layers

    def key(**kw: object) -> str:
        settings = PruneSettings(ratio=0.5, **kw)  # type: ignore[arg-type]
        return curve_entry(model, layers, data, settings, "cpu", 8).key

    assert key(mask="sparsegpt") == key()  # the same magnitude curves: one cache entry
    assert key(mask="sparsegpt", refit_curves=True) != key(refit_curves=True)
    assert key(mask="sparsegpt", refit_curves=True) != key(mask="sparsegpt")


def test_refit_curve_points_of_sparsegpt_are_its_own_weights(tmp_path: Path) -> None:
    """A sparsegpt refit-aware curve point is SparseGPT's selection and weights, without the
    two fixed-mask exact solves of the final refit (their cost made MiniLM's curves ~10x
    slower); the cache key says so, so curves of the other kind are never reused."""
    model, _, _, data = _setup(tmp_path)
    layers = find_layers(model).layers
    settings = PruneSettings(ratio=0.5, mask="sparsegpt", refit_curves=True)
    made = refit_candidates(model, data, 8, settings, SessionConfig(provider="cpu"))
    assert made is not None and made.select and not made.select_refits
    plain = refit_candidates(model, data, 8, PruneSettings(ratio=0.5), SessionConfig())
    assert plain is None
    entry = curve_entry(model, layers, data, settings, "cpu", 8)
    assert entry.settings["refit"]["points"] == "sparsegpt-select"
    magnitude = curve_entry(
        model, layers, data, PruneSettings(ratio=0.5, refit_curves=True), "cpu", 8
    )
    assert "points" not in magnitude.settings["refit"]


def test_cli_mask_sparsegpt_and_refit_inputs(tmp_path: Path) -> None:
    _, path, _, _ = _setup(tmp_path)
    args = ["prune", str(path), "--ratio", "0.5", "--data", str(tmp_path / "d.npz")]
    args += ["--batch-size", "8", "--levels", "6", "--no-cache", "--no-progress"]
    report = tmp_path / "r.json"
    done = CliRunner().invoke(
        cli,
        [*args, "--mask", "sparsegpt", "--refit-inputs", "dense", "--report", str(report)],
    )
    assert done.exit_code == 0, done.output
    assert "chosen with the refit, dense Hessians" in done.output
    saved = json.loads(report.read_text())["settings"]
    assert (saved["mask"], saved["refit_inputs"], saved["reconstruct"]) == (
        "sparsegpt",
        "dense",
        True,
    )
    bad = CliRunner().invoke(cli, [*args, "--refit-inputs", "upstream", "--force"])
    assert bad.exit_code != 0 and "upstream" in bad.output
