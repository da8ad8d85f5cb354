"""Ctrl-C and SIGTERM stop at once, keep finished layers, exit 130 / 143 (issue 12); every
other failure is a UserError (exit 1) or an internal error (exit 2, traceback with --debug)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

import rdprune_onnx.pipeline
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

    monkeypatch.setattr(rdprune_onnx.pipeline, "select_layers", bug)
    args = ["prune", str(model), "--ratio", "0.5", "--synthetic", "4", "--no-cache"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Internal error: ZeroDivisionError")
    assert "--debug" in lines[0] and "Traceback" not in result.output
    debug = CliRunner().invoke(cli, ["--debug", *args])
    assert isinstance(debug.exception, ZeroDivisionError)  # the traceback is shown
