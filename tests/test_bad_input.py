"""Bad input on the command line, end to end: each case is one line ``Error: ...``, exit
code 1, no traceback, and no file left behind (no partial output, no temporary file).

The library-level checks live in tests/graph/test_load.py, tests/test_calibration.py and
tests/cli/test_cli.py; this file runs every item of the list through ``rdprune-onnx prune``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import rdprune_onnx.files
import rdprune_onnx.graph.load
import rdprune_onnx.report
from rdprune_onnx.graph import external
from rdprune_onnx_cli.main import cli
from tests import graphs

MODEL = "m.onnx"
OUTPUT = "out.onnx"
X_SHAPE = (4, 3, 8, 8)  # graphs.cnn: x float32 [N, 3, 8, 8]


@dataclass
class Setup:
    """What a case prepared: the model path and the extra command-line arguments."""

    model: Path
    args: list[str]


Prepare = Callable[[Path, pytest.MonkeyPatch], Setup]


def _cnn(folder: Path) -> Path:
    path = folder / MODEL
    onnx.save_model(graphs.cnn(), str(path))
    return path


def _synthetic(model: Path, *extra: str) -> Setup:
    return Setup(model, ["--ratio", "0.5", "--synthetic", "4", *extra])


def _with_data(folder: Path, **arrays: np.ndarray) -> Setup:
    data = folder / "calib.npz"
    np.savez(data, **arrays)  # type: ignore[arg-type]
    return Setup(_cnn(folder), ["--ratio", "0.5", "--data", str(data)])


def _x(value: float | None = None, dtype: type = np.float32) -> np.ndarray:
    x: np.ndarray = np.random.default_rng(0).standard_normal(X_SHAPE).astype(dtype)
    if value is not None:
        x[1, 0, 2, 3] = value
    return x


def _external(folder: Path, location: str) -> Path:
    """graphs.cnn saved with its tensors in an external file, the locations then rewritten
    to ``location``."""
    path = graphs.save_external(graphs.cnn(), folder / MODEL, "m.data")
    model = onnx.load_model(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    return path


def missing_file(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _synthetic(folder / "none.onnx")


def directory(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    (folder / "dir.onnx").mkdir()
    return _synthetic(folder / "dir.onnx")


def empty_file(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    (folder / MODEL).write_bytes(b"")
    return _synthetic(folder / MODEL)


def truncated_protobuf(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    data = graphs.cnn().SerializeToString()
    (folder / MODEL).write_bytes(data[: len(data) // 2])
    return _synthetic(folder / MODEL)


def truncated_protobuf_header(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    (folder / MODEL).write_bytes(graphs.cnn().SerializeToString()[:7])
    return _synthetic(folder / MODEL)


def not_onnx_text(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    (folder / MODEL).write_text("this is a text file, not a model\n" * 20)
    return _synthetic(folder / MODEL)


def not_onnx_npz(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    np.savez(folder / "m.npz", x=np.zeros(3))
    (folder / "m.npz").rename(folder / MODEL)
    return _synthetic(folder / MODEL)


def fails_checker(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    model = graphs.cnn()
    model.graph.node[0].input[0] = "nowhere"
    onnx.save_model(model, str(folder / MODEL))
    return _synthetic(folder / MODEL)


def external_data_missing(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    path = _external(folder, "m.data")
    (folder / "m.data").unlink()
    return _synthetic(path)


def external_data_outside(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    inner = folder / "inner"
    inner.mkdir()
    _external(folder, "m.data")
    (folder / MODEL).rename(inner / MODEL)
    model = onnx.load_model(str(inner / MODEL), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.data"
    onnx.save_model(model, str(inner / MODEL))
    return _synthetic(inner / MODEL)


def external_data_absolute(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    _external(folder, "m.data")
    return _synthetic(_external(folder, str((folder / "m.data").resolve())))


def external_data_symlink(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    outside = folder / "outside"
    inner = folder / "inner"
    outside.mkdir()
    inner.mkdir()
    _external(outside, "m.data")
    os.symlink(outside / "m.data", inner / "m.data")
    (inner / MODEL).write_bytes((outside / MODEL).read_bytes())
    return _synthetic(inner / MODEL)


def external_data_folder_symlink(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    outside = folder / "outside"
    inner = folder / "inner"
    outside.mkdir()
    inner.mkdir()
    _external(outside, "m.data")
    os.symlink(outside, inner / "weights")
    path = _external(inner, "weights/m.data")
    (inner / "m.data").unlink()
    return _synthetic(path)


def npz_pickled(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _with_data(folder, x=np.array([{"a": 1}] * 4, dtype=object))


def npz_not_npz(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    (folder / "calib.npz").write_text("hello")
    return Setup(_cnn(folder), ["--ratio", "0.5", "--data", str(folder / "calib.npz")])


def npz_directory(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    (folder / "calib.npz").mkdir()
    return Setup(_cnn(folder), ["--ratio", "0.5", "--data", str(folder / "calib.npz")])


def wrong_input_name(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _with_data(folder, images=_x())


def wrong_shape(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _with_data(folder, x=np.zeros((4, 3, 9, 9), np.float32))


def wrong_rank(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _with_data(folder, x=np.zeros((4, 192), np.float32))


def wrong_dtype(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _with_data(folder, x=_x(dtype=np.float64))


def integer_dtype(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _with_data(folder, x=np.zeros(X_SHAPE, np.int64))


def nan_in_data(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _with_data(folder, x=_x(np.nan))


def inf_in_data(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _with_data(folder, x=_x(-np.inf))


def _broken_output(folder: Path, op: str, constant: float) -> Path:
    """y = x @ w  <op>  constant: NaN (Log of a negative) or Inf (division by zero)."""
    f32 = TensorProto.FLOAT
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    if op == "Log":
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Log", ["c"], ["logc"]),
            helper.make_node("Add", ["h", "logc"], ["y"]),
        ]
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Div", ["h", "c"], ["y"]),
        ]
    graph = helper.make_graph(
        nodes,
        "broken",
        [helper.make_tensor_value_info("x", f32, ["N", 4])],
        [helper.make_tensor_value_info("y", f32, ["N", 3])],
        [graphs.init("w", w), graphs.init("c", np.array(constant, np.float32))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / MODEL
    onnx.save_model(model, str(path))
    return path


def nan_in_outputs(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _synthetic(_broken_output(folder, "Log", -1.0))


def inf_in_outputs(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _synthetic(_broken_output(folder, "Div", 0.0))


def _ratio(value: str) -> Prepare:
    def prepare(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
        return Setup(_cnn(folder), ["--ratio", value, "--synthetic", "4"])

    return prepare


def output_folder_missing(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _synthetic(_cnn(folder), "-o", str(folder / "nope" / OUTPUT))


def output_folder_is_a_file(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    (folder / "file.txt").write_text("x")
    return _synthetic(_cnn(folder), "-o", str(folder / "file.txt" / OUTPUT))


def output_is_a_directory(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    (folder / "outdir").mkdir()
    return _synthetic(_cnn(folder), "-o", str(folder / "outdir"), "--force")


def output_folder_not_writable(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    # Tests run as root, for whom every folder is writable: pretend this one is not.
    locked = folder / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path: object, mode: int, *args: object, **kwargs: object) -> bool:
        if Path(str(path)).resolve() == locked.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    mp.setattr(os, "access", access)
    return _synthetic(_cnn(folder), "-o", str(locked / OUTPUT))


def disk_full_model(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    model = _cnn(folder)
    real_save = onnx.save_model

    def save_model(model: onnx.ModelProto, path: object, *args: object, **kw: object) -> None:
        # Write part of the file first, as a real full disk does, then fail.
        real_save(model, path, *args, **kw)  # type: ignore[arg-type]
        with open(str(path), "r+b") as fh:
            fh.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    mp.setattr(onnx, "save_model", save_model)
    return _synthetic(model, "-o", str(folder / OUTPUT))


def _full_disk_writer(mp: pytest.MonkeyPatch, location: str) -> None:
    """The external data writer on a disk that is full when it writes ``location``."""
    real = external.ExternalWriter.tensor

    def tensor(self: external.ExternalWriter, *args: object) -> None:
        if self.location == location:
            self.data.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, *args)  # type: ignore[arg-type]

    mp.setattr(external.ExternalWriter, "tensor", tensor)


def _lazy_cnn(folder: Path, mp: pytest.MonkeyPatch) -> Path:
    """graphs.cnn with external data whose tensors all stay on disk (the large-model route)."""
    mp.setattr(rdprune_onnx.graph.load, "LAZY_MIN_BYTES", 0)
    return _external(folder, "m.data")


def disk_full_staging(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    model = _lazy_cnn(folder, mp)
    _full_disk_writer(mp, "pruned.onnx.data")  # the copy written before verification
    return _synthetic(model, "-o", str(folder / OUTPUT))


def disk_full_session(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    model = _lazy_cnn(folder, mp)
    _full_disk_writer(mp, "model.onnx.data")  # the copy a session is created from
    return _synthetic(model, "-o", str(folder / OUTPUT))


def disk_full_external_output(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    model = _lazy_cnn(folder, mp)
    _full_disk_writer(mp, OUTPUT + ".data")
    return _synthetic(model, "-o", str(folder / OUTPUT))


def report_folder_missing(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    return _synthetic(
        _cnn(folder), "-o", str(folder / OUTPUT), "--report", str(folder / "nope" / "r.json")
    )


class _FullDiskOs:
    """The ``os`` module as the report writer sees it on a full disk: fsync fails."""

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    @staticmethod
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def disk_full_report(folder: Path, mp: pytest.MonkeyPatch) -> Setup:
    publish = rdprune_onnx.files.publish

    def full_for_reports(src: Path, target: Path, **kwargs: Any) -> None:
        if kwargs.get("label") == "report":  # the model is written; its report fails
            _FullDiskOs.fsync(0)
        publish(src, target, **kwargs)

    mp.setattr(rdprune_onnx.files, "publish", full_for_reports)
    return _synthetic(_cnn(folder), "-o", str(folder / OUTPUT), "--report", str(folder / "r.json"))


CASES: list[object] = [
    pytest.param(missing_file, "does not exist", id="missing-file"),
    pytest.param(directory, "is a directory", id="directory"),
    pytest.param(empty_file, "is empty", id="empty-file"),
    pytest.param(truncated_protobuf, "", id="truncated-protobuf"),
    pytest.param(truncated_protobuf_header, "", id="truncated-protobuf-header"),
    pytest.param(not_onnx_text, "", id="not-onnx-text"),
    pytest.param(not_onnx_npz, "", id="not-onnx-zip"),
    pytest.param(fails_checker, "checker", id="fails-checker"),
    pytest.param(external_data_missing, "missing", id="external-data-missing"),
    pytest.param(external_data_outside, "outside", id="external-data-dotdot"),
    pytest.param(external_data_absolute, "outside", id="external-data-absolute"),
    pytest.param(external_data_symlink, "outside", id="external-data-symlink-file"),
    pytest.param(external_data_folder_symlink, "outside", id="external-data-symlink-folder"),
    pytest.param(npz_pickled, "pickled", id="npz-pickled-objects"),
    pytest.param(npz_not_npz, "npz", id="npz-not-an-archive"),
    pytest.param(npz_directory, "is a directory", id="npz-is-a-directory"),
    pytest.param(wrong_input_name, "lacks input", id="wrong-input-name"),
    pytest.param(wrong_shape, "shape", id="wrong-shape"),
    pytest.param(wrong_rank, "shape", id="wrong-rank"),
    pytest.param(wrong_dtype, "dtype", id="wrong-dtype"),
    pytest.param(integer_dtype, "dtype", id="integer-dtype"),
    pytest.param(nan_in_data, "NaN", id="nan-in-data"),
    pytest.param(inf_in_data, "NaN or Inf", id="inf-in-data"),
    pytest.param(nan_in_outputs, "NaN or Inf", id="nan-in-outputs"),
    pytest.param(inf_in_outputs, "NaN or Inf", id="inf-in-outputs"),
    *[
        pytest.param(_ratio(value), "between 0 and 1", id=f"ratio-{value}")
        for value in ("0", "1", "1.5", "-0.2", "nan", "inf")
    ],
    pytest.param(_ratio("half"), "not a valid float", id="ratio-not-a-number"),
    pytest.param(output_folder_missing, "does not exist", id="output-folder-missing"),
    pytest.param(output_folder_is_a_file, "does not exist", id="output-folder-is-a-file"),
    pytest.param(output_is_a_directory, "", id="output-is-a-directory"),
    pytest.param(output_folder_not_writable, "not writable", id="output-folder-not-writable"),
    pytest.param(disk_full_model, "No space left", id="disk-full-model"),
    pytest.param(disk_full_staging, "the pruned model", id="disk-full-staging"),
    pytest.param(disk_full_session, "for ONNX Runtime", id="disk-full-session-staging"),
    pytest.param(disk_full_external_output, "No space left", id="disk-full-external-output"),
    pytest.param(report_folder_missing, "does not exist", id="report-folder-missing"),
    pytest.param(disk_full_report, "No space left", id="disk-full-report"),
]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(("prepare", "needle"), CASES)
def test_bad_input_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepare: Prepare, needle: str
) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    setup = prepare(folder, monkeypatch)
    before = _files(tmp_path)
    args = ["prune", str(setup.model), *setup.args, "--levels", "5", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    # CliRunner catches an escaping exception and reports exit code 1 too: a clean error
    # is click's SystemExit(1), anything else would print a traceback in a real run.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), lines[0]
    assert needle in lines[0]
    # No partial output and no temporary file anywhere.
    assert _files(tmp_path) == before
