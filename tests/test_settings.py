"""The typed inputs of a prune (settings.py), the public job and stage API (job.py,
curve_source.py, stages.py) and the CLI defaults read from the settings' fields."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import click
import numpy as np
import onnx
import pytest

from rdprune_onnx import (
    CalibrationSpec,
    EvalSpec,
    OutputSpec,
    PruneSettings,
    UserError,
    prune,
    stages,
)
from rdprune_onnx.curve_source import MeasuredCurves
from rdprune_onnx.job import calibrate, check_outputs, load_evaluation, open_model
from rdprune_onnx.settings import resolve_specs
from rdprune_onnx_cli.main import cli
from rdprune_onnx_cli.options import build_settings
from tests import graphs

CALIB = CalibrationSpec(synthetic=16, batch_size=8)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "m.onnx"
    onnx.save_model(graphs.cnn(), str(model))
    rng = np.random.default_rng(1)
    test = tmp_path / "test.npz"
    np.savez(
        test,
        x=rng.standard_normal((12, 3, 8, 8)).astype(np.float32),
        label=rng.integers(0, 4, 12),
    )
    return {"model": model, "test": test}


def test_specs_give_what_the_flat_keywords_give(files: dict[str, Path], tmp_path: Path) -> None:
    settings = PruneSettings(ratio=0.6, levels=11)
    flat = prune(
        files["model"],
        settings,
        CALIB,
        output=tmp_path / "flat.onnx",
        report=tmp_path / "flat.json",
        storage="compact",
        eval_data=files["test"],
        labels="label",
    )
    typed = prune(
        files["model"],
        settings,
        CALIB,
        output=OutputSpec(
            tmp_path / "typed.onnx", report=tmp_path / "typed.json", storage="compact"
        ),
        evaluation=EvalSpec(files["test"], labels="label"),
    )
    assert (tmp_path / "flat.onnx").read_bytes() == (tmp_path / "typed.onnx").read_bytes()
    assert flat.evaluation is not None and typed.evaluation is not None
    assert flat.evaluation.to_dict() == typed.evaluation.to_dict()
    assert typed.files == [str(tmp_path / "typed.onnx"), str(tmp_path / "typed.json")]
    # write=False writes nothing; force replaces
    nothing = prune(files["model"], settings, CALIB, output=OutputSpec(write=False))
    assert nothing.output is None and nothing.files == [] and nothing.model is not None
    with pytest.raises(UserError, match="already exists"):
        prune(files["model"], settings, CALIB, output=OutputSpec(tmp_path / "typed.onnx"))
    prune(files["model"], settings, CALIB, output=OutputSpec(tmp_path / "typed.onnx", force=True))


def test_a_flat_keyword_beside_its_spec_or_an_unknown_one_is_refused() -> None:
    with pytest.raises(TypeError, match="inside output=OutputSpec"):
        resolve_specs(OutputSpec("a.onnx"), None, {"force": True})
    with pytest.raises(TypeError, match="inside evaluation=EvalSpec"):
        resolve_specs(None, EvalSpec("t.npz"), {"labels": "y"})
    with pytest.raises(TypeError, match="colour"):
        resolve_specs(None, None, {"colour": 1})  # type: ignore[typeddict-unknown-key]
    out, ev = resolve_specs("a.onnx", None, {"write": False, "eval_data": "t.npz"})
    assert out == OutputSpec("a.onnx", write=False) and ev == EvalSpec("t.npz")
    with pytest.raises(UserError, match="unknown storage"):
        OutputSpec(storage="zip").check()


def test_the_stages_called_one_by_one_make_what_prune_makes(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """The public job and stage API is prune() itself: the same calls in the same order
    write the same bytes and report the same choices."""
    settings = PruneSettings(ratio=0.7, levels=11, reconstruct=True)
    expected = prune(
        files["model"], settings, CALIB, output=tmp_path / "a.onnx", eval_data=files["test"]
    )
    out = OutputSpec(tmp_path / "b.onnx")
    evaluation = EvalSpec(files["test"])
    job = open_model(
        files["model"],
        settings,
        files=check_outputs(files["model"], out),
        outputs=[tmp_path / "b.onnx"],
    )
    calibrate(job, settings, CALIB)
    load_evaluation(job, evaluation)
    masked = stages.allocate_and_mask(job, settings, MeasuredCurves(job, settings, cache_dir=None))
    refit = stages.refit_layers(job, settings, masked)
    assert refit.records and set(refit.records) <= set(job.names)
    pruned = stages.build_pruned(job, refit, staging=None)
    result = stages.summarize(
        job,
        settings,
        masked,
        refit,
        pruned,
        stages.verify(job, pruned),
        stages.evaluate_pruned(job, pruned),
    )
    stages.write_pruned(job, result, pruned.model, out)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert [layer.pruned for layer in result.layers] == [layer.pruned for layer in expected.layers]
    assert result.measured_distortion == expected.measured_distortion
    assert result.evaluation is not None and expected.evaluation is not None


def _commands() -> list[click.Command]:
    assert isinstance(cli, click.Group)
    return [cli.commands[name] for name in ("prune", "curves", "allocate", "sweep")]


@pytest.mark.parametrize("spec", [PruneSettings, CalibrationSpec, OutputSpec])
def test_cli_defaults_are_the_fields_defaults(spec: type) -> None:
    """Every option named after a settings field defaults to that field's default (read
    from the field, so the two cannot drift)."""
    # Fields with a written default (None means "not given": the option has none either).
    defaults = {
        f.name: f.default
        for f in fields(spec)
        if f.default not in (MISSING, None) and not isinstance(f.default, tuple)
    }
    checked = 0
    for command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and param.name in defaults:
                assert param.default == defaults[param.name], (command.name, param.name)
                checked += 1
    assert checked >= {PruneSettings: 40, CalibrationSpec: 8, OutputSpec: 4}[spec]


def test_settings_built_from_no_options_are_the_default_settings() -> None:
    assert build_settings({}, ratio=0.5) == PruneSettings(ratio=0.5)
