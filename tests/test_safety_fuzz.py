"""Fuzzing the inputs (issue 12, item 8): random mutations of a valid ONNX protobuf, of its
external-data fields and of an .npz container. Property: exit 0, or exit 1 with one line
"Error: ..."; never a traceback or an internal error; the inputs byte-identical
afterwards; no file written outside the run's output targets.

``RDPRUNE_FUZZ_EXAMPLES`` raises the number of examples for a longer local run.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdprune_onnx_cli.main import cli
from tests import graphs

SCALE = int(os.environ.get("RDPRUNE_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(
    max_examples=SCALE or 80,
    deadline=None,
    derandomize=SCALE is None,  # CI: the same examples every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VALID = graphs.cnn().SerializeToString()
X = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=X)
    return buffer.getvalue()


VALID_NPZ = _npz_bytes()


def _state(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _check(folder: Path, args: list[str], outputs: set[str]) -> None:
    before = _state(folder)
    result = CliRunner().invoke(cli, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert isinstance(result.exception, SystemExit) or result.exception is None, (
        repr(result.exception),
        result.output,
    )
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    after = _state(folder)
    for name, digest in before.items():
        assert after.get(name) == digest, f"input {name} changed"
    assert set(after) - set(before) <= outputs, set(after) - set(before)


mutation = st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255))


@FUZZ
@given(
    edits=st.lists(mutation, min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(1, len(VALID))),
)
def test_mutated_protobuf(edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "m.onnx").write_bytes(bytes(data[:cut]))
        _check(folder, ["inspect", str(folder / "m.onnx")], set())
        args = ["prune", str(folder / "m.onnx"), "--ratio", "0.5", "--synthetic", "2"]
        args += ["--levels", "3", "--no-cache", "--no-progress", "-o", str(folder / "o.onnx")]
        _check(folder, args, {"o.onnx", "o.onnx.data"})


field_value = st.one_of(
    st.integers(-(2**40), 2**40).map(str),
    st.sampled_from(["", "-0", "1e3", "0x10", " 5", "nan", "m.data", "../m.data", "/etc/passwd"]),
    st.text(max_size=12),
)


@FUZZ
@given(
    tensor=st.integers(0, 4),
    key=st.sampled_from(["location", "offset", "length", "checksum", "bogus"]),
    value=field_value,
)
def test_mutated_external_data_fields(tensor: int, key: str, value: str) -> None:
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        path = graphs.save_external(graphs.cnn(), folder / "m.onnx", "m.data")
        model = onnx.load_model(str(path), load_external_data=False)
        target = model.graph.initializer[tensor % len(model.graph.initializer)]
        for entry in target.external_data:
            if entry.key == key:
                entry.value = value
                break
        else:
            target.external_data.add(key=key, value=value)
        onnx.save_model(model, str(path))
        _check(folder, ["inspect", str(path)], set())
        args = ["prune", str(path), "--ratio", "0.5", "--synthetic", "2", "--levels", "3"]
        args += ["--no-cache", "--no-progress", "-o", str(folder / "o.onnx")]
        _check(folder, args, {"o.onnx", "o.onnx.data"})


npz_mutation = st.tuples(st.integers(0, len(VALID_NPZ) - 1), st.integers(0, 255))


@FUZZ
@given(
    edits=st.lists(npz_mutation, min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(1, len(VALID_NPZ))),
)
def test_mutated_npz(edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(VALID_NPZ)
    for position, value in edits:
        data[position] = value
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        onnx.save_model(graphs.cnn(), str(folder / "m.onnx"))
        (folder / "calib.npz").write_bytes(bytes(data[:cut]))
        args = ["prune", str(folder / "m.onnx"), "--ratio", "0.5", "--data"]
        args += [str(folder / "calib.npz"), "--levels", "3", "--no-cache", "--no-progress"]
        args += ["-o", str(folder / "o.onnx")]
        _check(folder, args, {"o.onnx"})
