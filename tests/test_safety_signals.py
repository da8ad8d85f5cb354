"""Ctrl-C and SIGTERM stop at once, keep finished layers, exit 130 / 143 (issue 12); every
other failure is a UserError (exit 1) or an internal error (exit 2; the traceback of an
InternalError always, of any other exception with --debug)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import rdprune_onnx
import rdprune_onnx.job
import rdprune_onnx.stages
from rdprune_onnx.errors import InternalError, UserError
from rdprune_onnx_cli.main import cli
from tests import graphs
from tests.graphs_safety import slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("signum", "code", "name"),
    [
        (signal.SIGINT, 130, "Ctrl-C"),
        pytest.param(signal.SIGTERM, 143, "SIGTERM", marks=pytest.mark.slow),  # same path
    ],
)
def test_signal_stops_within_seconds_and_keeps_finished_layers(
    tmp_path: Path, signum: int, code: int, name: str
) -> None:
    """A model whose every point takes seconds: the signal arrives inside the second
    layer's runs; the command ends long before that layer could finish."""
    model = tmp_path / "m.onnx"
    onnx.save_model(slow(rounds=8), str(model))
    cache = tmp_path / "cache"
    args = ["curves", str(model), "-o", str(tmp_path / "c.json"), "--synthetic", "4096"]
    args += ["--batch-size", "4096", "--levels", "3", "--cache-dir", str(cache), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdprune_onnx_cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 240
        kept: list[str] = []
        while not kept and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            for entry in cache.glob("*.json"):
                kept = list(json.loads(entry.read_text())["curves"])
        if not kept:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"no layer finished (exit {proc.returncode}): {out} {err}")
        time.sleep(0.5)  # inside the next layer's ONNX Runtime runs
        assert proc.poll() is None, "finished before the signal: make the model slower"
        sent = time.monotonic()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        latency = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    # Generous: a test, not a benchmark (each point of this model takes seconds).
    assert latency < 10, latency
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Interrupted ({name})"), err
    assert "resume" in lines[0] and str(cache) in lines[0]
    assert "Traceback" not in err
    # The cache still holds every finished layer, readable; no curves file was written.
    entry = next(cache.glob("*.json"))
    assert set(kept) <= set(json.loads(entry.read_text())["curves"])
    assert not (tmp_path / "c.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.onnx"]


def test_internal_error_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(graphs.cnn(), str(model))

    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(rdprune_onnx.job, "select_layers", bug)
    args = ["prune", str(model), "--ratio", "0.5", "--synthetic", "4", "--no-cache"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Internal error: ZeroDivisionError")
    assert "--debug" in lines[0] and "Traceback" not in result.output
    debug = CliRunner().invoke(cli, ["--debug", *args])
    assert isinstance(debug.exception, ZeroDivisionError)  # the traceback is shown


def _break_pruned_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pruned copy the library builds gets an operator that does not exist."""
    original = rdprune_onnx.stages.replace_weights

    def broken(*args: object, **kwargs: object) -> onnx.ModelProto:
        built = original(*args, **kwargs)  # type: ignore[arg-type]
        built.graph.node[0].op_type = "NoSuchOperator"
        return built

    monkeypatch.setattr(rdprune_onnx.stages, "replace_weights", broken)


def test_a_graph_we_built_that_ort_refuses_is_internal_with_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pruned copy is the library's graph: ONNX Runtime refusing it (here: an operator
    that does not exist, slipped in by the weight replacement) is an InternalError, whose
    traceback the command line prints (exit 2); the same run with a bad input is a one-line
    UserError (exit 1)."""
    model = tmp_path / "m.onnx"
    onnx.save_model(graphs.cnn(), str(model))
    _break_pruned_copies(monkeypatch)
    args = ["prune", str(model), "--synthetic", "4", "--no-cache", "--levels", "5"]
    with pytest.raises(InternalError, match="a graph rdprune-onnx built"):
        rdprune_onnx.prune(
            model,
            rdprune_onnx.PruneSettings(ratio=0.5, levels=5),
            rdprune_onnx.CalibrationSpec(synthetic=4),
            write=False,
        )
    result = CliRunner().invoke(cli, [*args, "--ratio", "0.5", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2, result.output
    assert "Traceback (most recent call last)" in result.output
    assert "InternalError: ONNX Runtime cannot load a graph rdprune-onnx built" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("Internal error: InternalError")
    assert not (tmp_path / "o.onnx").exists()
    user = CliRunner().invoke(cli, [*args, "--ratio", "1.5"])
    assert user.exit_code == 1 and "Traceback" not in user.output
    assert [line for line in user.output.splitlines() if line.strip()] == [
        "Error: --ratio must be strictly between 0 and 1, got 1.5 (e.g. --ratio 0.8 zeroes "
        "80% of the prunable weights)"
    ]


def test_evaluating_a_pruned_copy_ort_refuses_is_internal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On held-out data the pruned run is the library's: ONNX Runtime refusing the copy is
    an InternalError (it was a UserError while one user_model block held both runs); bad
    held-out data stays a UserError."""
    model = tmp_path / "m.onnx"
    onnx.save_model(graphs.cnn(), str(model))
    test = tmp_path / "test.npz"
    np.savez(test, x=np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32))
    curves = tmp_path / "c.json"
    settings = rdprune_onnx.PruneSettings(ratio=0.5, levels=5)
    rdprune_onnx.measure(model, settings, rdprune_onnx.CalibrationSpec(synthetic=4), output=curves)
    _break_pruned_copies(monkeypatch)
    # No calibration data: nothing is verified, the evaluation is the first run of the copy.
    with pytest.raises(InternalError, match="a graph rdprune-onnx built"):
        rdprune_onnx.prune_from_curves(curves, model, settings, eval_data=test, write=False)
    monkeypatch.undo()
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((6, 3, 8, 8), np.float32) + np.nan)
    with pytest.raises(UserError):
        rdprune_onnx.prune_from_curves(curves, model, settings, eval_data=wrong, write=False)
