"""Nothing a user owns is ever destroyed (issue 12): every output target is checked
against every input and every other output of the run before any work, non-regular files
are never replaced (even with --force), publishing cannot clobber, nothing is left behind.

Each case runs the real command line and asserts: exit 1, one line "Error: ...", and every
file in the folder byte-identical afterwards (no file added, removed or changed).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rdprune_onnx import files
from rdprune_onnx.errors import UserError
from rdprune_onnx.report import write_json
from rdprune_onnx_cli.main import cli
from tests import graphs

X_SHAPE = (4, 3, 8, 8)  # graphs.cnn: x float32 [N, 3, 8, 8]


@dataclass
class Case:
    args: list[str]


Prepare = Callable[[Path], list[str]]


def _cnn(folder: Path) -> Path:
    path = folder / "m.onnx"
    onnx.save_model(graphs.cnn(), str(path))
    return path


def _data(folder: Path, name: str = "calib.npz") -> Path:
    path = folder / name
    x = np.random.default_rng(0).standard_normal(X_SHAPE).astype(np.float32)
    np.savez(path, x=x, y=np.arange(4))
    return path


def _prune(folder: Path, *extra: str) -> list[str]:
    return ["prune", str(_cnn(folder)), "--ratio", "0.5", "--levels", "5", "--no-cache", *extra]


def _synthetic(folder: Path, *extra: str) -> list[str]:
    return _prune(folder, "--synthetic", "4", "--no-progress", *extra)


def _curves(folder: Path) -> Path:
    """A curves file measured on m.onnx (through the command line)."""
    model = _cnn(folder)
    out = folder / "c.json"
    args = ["curves", str(model), "-o", str(out), "--synthetic", "4", "--levels", "5"]
    result = CliRunner().invoke(cli, [*args, "--no-cache", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def report_is_input_model(folder: Path) -> list[str]:
    out = str(folder / "o.onnx")
    return _synthetic(folder, "-o", out, "--report", str(folder / "m.onnx"), "--force")


def output_is_input_model(folder: Path) -> list[str]:
    return _synthetic(folder, "-o", str(folder / "m.onnx"), "--force")


def report_is_calibration(folder: Path) -> list[str]:
    data = str(_data(folder))
    return _prune(folder, "--data", data, "-o", str(folder / "o.onnx"), "--report", data, "--force")


def output_is_calibration(folder: Path) -> list[str]:
    data = str(_data(folder))
    return _prune(folder, "--data", data, "-o", data, "--force")


def report_is_eval_data(folder: Path) -> list[str]:
    data = str(_data(folder))
    ev = str(_data(folder, "eval.npz"))
    out = str(folder / "o.onnx")
    return _prune(folder, "--data", data, "--eval-data", ev, "-o", out, "--report", ev, "--force")


def report_is_output(folder: Path) -> list[str]:
    out = str(folder / "o.onnx")
    return _synthetic(folder, "-o", out, "--report", out, "--force")


def plot_is_output(folder: Path) -> list[str]:
    out = str(folder / "o.png")
    return _synthetic(folder, "-o", out, "--plot", out, "--force")


def output_is_hard_link_to_input(folder: Path) -> list[str]:
    args = _synthetic(folder, "-o", str(folder / "link.onnx"), "--force")
    os.link(folder / "m.onnx", folder / "link.onnx")
    return args


def report_is_hard_link_to_calibration(folder: Path) -> list[str]:
    data = _data(folder)
    os.link(data, folder / "r.json")
    out = str(folder / "o.onnx")
    return _prune(folder, "--data", str(data), "-o", out, "--report", str(folder / "r.json"))


def output_is_symlink_to_input(folder: Path) -> list[str]:
    args = _synthetic(folder, "-o", str(folder / "s.onnx"), "--force")
    (folder / "s.onnx").symlink_to(folder / "m.onnx")
    return args


def output_data_file_is_input_data(folder: Path) -> list[str]:
    """The input keeps its weights in ``o.onnx.data``; writing ``o.onnx`` with external
    data would write ``o.onnx.data`` over them."""
    model = graphs.save_external(graphs.cnn(), folder / "m.onnx", "o.onnx.data")
    return [
        "prune",
        str(model),
        "--ratio",
        "0.5",
        "--synthetic",
        "4",
        "--levels",
        "5",
        "--no-cache",
        "--no-progress",
        "-o",
        str(folder / "o.onnx"),
        "--force",
    ]


def _special(path: Path) -> None:
    """A character device like /dev/null where we may create one (root), else a FIFO."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, AttributeError):
        os.mkfifo(path)


def output_is_device(folder: Path) -> list[str]:
    _special(folder / "null.onnx")
    return _synthetic(folder, "-o", str(folder / "null.onnx"), "--force")


def report_is_device(folder: Path) -> list[str]:
    _special(folder / "null.json")
    out = str(folder / "o.onnx")
    return _synthetic(folder, "-o", out, "--report", str(folder / "null.json"), "--force")


def plot_is_device(folder: Path) -> list[str]:
    _special(folder / "null.png")
    out = str(folder / "o.onnx")
    return _synthetic(folder, "-o", out, "--plot", str(folder / "null.png"), "--force")


def plot_bad_suffix(folder: Path) -> list[str]:
    return _synthetic(folder, "-o", str(folder / "o.onnx"), "--plot", str(folder / "p.xyz"))


def output_name_too_long(folder: Path) -> list[str]:
    return _synthetic(folder, "-o", str(folder / ("x" * 300 + ".onnx")))


def allocate_output_is_curves(folder: Path) -> list[str]:
    curves = str(_curves(folder))
    return ["allocate", curves, "--model", str(folder / "m.onnx"), "--ratio", "0.5", "-o", curves]


def allocate_output_is_curves_forced(folder: Path) -> list[str]:
    return [*allocate_output_is_curves(folder), "--force"]


def allocate_ratios_one_bad(folder: Path) -> list[str]:
    """The second ratio's target exists: refused before the first ratio writes anything."""
    curves = str(_curves(folder))
    (folder / "o.r0.7.onnx").write_bytes(b"mine")
    out = str(folder / "o.onnx")
    return ["allocate", curves, "--model", str(folder / "m.onnx"), "--ratio", "0.5,0.7", "-o", out]


def allocate_ratios_infeasible(folder: Path) -> list[str]:
    """The second ratio cannot be met: the first ratio's file is removed again."""
    curves = str(_curves(folder))
    out = str(folder / "o.onnx")
    return [
        "allocate",
        curves,
        "--model",
        str(folder / "m.onnx"),
        "--ratio",
        "0.5,0.9",
        "--max-layer-ratio",
        "0.6",
        "-o",
        out,
    ]


def curves_output_is_calibration(folder: Path) -> list[str]:
    data = str(_data(folder))
    model = str(_cnn(folder))
    return ["curves", model, "--data", data, "-o", data, "--force", "--no-cache", "--levels", "5"]


def curves_output_not_json(folder: Path) -> list[str]:
    model = str(_cnn(folder))
    return ["curves", model, "--synthetic", "4", "-o", str(folder / "c.onnx"), "--no-cache"]


CASES = [
    pytest.param(report_is_input_model, "input model", id="report-is-input-model"),
    pytest.param(output_is_input_model, "input model", id="output-is-input-model"),
    pytest.param(report_is_calibration, "calibration data", id="report-is-calibration-npz"),
    pytest.param(output_is_calibration, "calibration data", id="output-is-calibration-npz"),
    pytest.param(report_is_eval_data, "evaluation data", id="report-is-eval-npz"),
    pytest.param(report_is_output, "same file", id="report-is-output"),
    pytest.param(plot_is_output, "same file", id="plot-is-output"),
    pytest.param(output_is_hard_link_to_input, "input model", id="output-hard-link-to-input"),
    pytest.param(report_is_hard_link_to_calibration, "calibration", id="report-hard-link-calib"),
    pytest.param(output_is_symlink_to_input, "input model", id="output-symlink-to-input"),
    pytest.param(output_data_file_is_input_data, "data file", id="output-data-is-input-data"),
    pytest.param(output_is_device, "not a regular file", id="output-is-device"),
    pytest.param(report_is_device, "not a regular file", id="report-is-device"),
    pytest.param(plot_is_device, "not a regular file", id="plot-is-device"),
    pytest.param(plot_bad_suffix, "image format", id="plot-bad-suffix-before-work"),
    pytest.param(output_name_too_long, "longer than", id="output-name-too-long"),
    pytest.param(allocate_output_is_curves, "curves file", id="allocate-output-is-curves"),
    pytest.param(allocate_output_is_curves_forced, "curves file", id="allocate-output-curves-f"),
    pytest.param(allocate_ratios_one_bad, "already exists", id="allocate-ratios-target-exists"),
    pytest.param(allocate_ratios_infeasible, "", id="allocate-ratios-second-fails"),
    pytest.param(curves_output_is_calibration, "calibration data", id="curves-o-is-calibration"),
    pytest.param(curves_output_not_json, ".json", id="curves-o-not-json"),
]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``folder``: its type and, for regular files, a content hash."""
    out: dict[str, tuple[int, str]] = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        digest = ""
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out[str(path.relative_to(folder))] = (stat.S_IFMT(st.st_mode), digest)
    return out


@pytest.mark.parametrize(("prepare", "needle"), CASES)
def test_no_user_file_is_touched(tmp_path: Path, prepare: Prepare, needle: str) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    args = prepare(folder)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert lines[-1].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert needle in lines[-1], lines[-1]
    assert snapshot(tmp_path) == before


# --- the publishing step ---------------------------------------------------------------------


def test_publish_never_replaces_a_file_that_appeared(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    with files.staging(tmp_path) as stage:
        (stage / "a").write_text("new")
        target.write_text("appeared meanwhile")
        with pytest.raises(UserError, match="appeared"):
            files.publish(stage / "a", target, force=False)
    assert target.read_text() == "appeared meanwhile"


@pytest.mark.parametrize("route", ["link", "renameat2", "check-then-rename"])
def test_publish_routes_refuse_existing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """Where hard links are not supported (EPERM), renameat2(RENAME_NOREPLACE) is used."""
    if route != "link":

        def no_link(src: object, dst: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(files.os, "link", no_link)
    if route == "check-then-rename":
        monkeypatch.setattr(files, "_renameat2_noreplace", lambda src, dst: False)
    target = tmp_path / "t"
    with files.staging(tmp_path) as stage:
        (stage / "a").write_text("first")
        files.publish(stage / "a", target, force=False)
        assert not (stage / "a").exists()
        (stage / "b").write_text("second")
        with pytest.raises(UserError, match="already exists"):
            files.publish(stage / "b", target, force=False)
    assert target.read_text() == "first"


def test_two_concurrent_writers_only_one_wins(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            write_json({"writer": i}, target)
            outcomes.append(f"ok{i}")
        except UserError:
            outcomes.append("refused")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("ok")]
    assert len(winners) == 1, outcomes
    assert f'"writer": {winners[0][2:]}' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_force_never_replaces_a_special_file(tmp_path: Path) -> None:
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        write_json({}, fifo, force=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        report = write_json({"a": 1}, tmp_path / "r.json")
        model = tmp_path / "m.onnx"
        from rdprune_onnx.graph.load import save_model

        save_model(graphs.cnn(), model)
    finally:
        os.umask(old)
    assert stat.S_IMODE(report.stat().st_mode) == 0o640
    assert stat.S_IMODE(model.stat().st_mode) == 0o640


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_folders_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / f".rdprune-{_dead_pid()}-abcd"
    dead.mkdir()
    (dead / "m.onnx.data").write_bytes(b"x" * 100)
    alive = tmp_path / f".rdprune-{os.getppid()}-efgh"  # our parent is running
    alive.mkdir()
    foreign = tmp_path / ".rdprune-notapid"  # not ours to judge
    foreign.mkdir()
    user = tmp_path / "rdprune-123-user"  # no prefix: the user's
    user.mkdir()
    write_json({}, tmp_path / "r.json")  # any write sweeps its folder
    assert not dead.exists()
    assert alive.exists() and foreign.exists() and user.exists()


def test_python_api_hint_names_force_true(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(UserError) as info:
        write_json({}, tmp_path / "r.json")
    assert "force=True" in str(info.value)


# --- inputs that used to end in a traceback: one line, exit 1 --------------------------------


def _external_field(folder: Path, key: str, value: str) -> Path:
    path = graphs.save_external(graphs.cnn(), folder / "m.onnx", "m.data")
    model = onnx.load_model(str(path), load_external_data=False)
    tensor = model.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            break
    else:
        tensor.external_data.add(key=key, value=value)
    onnx.save_model(model, str(path))
    return path


def _npz_header(folder: Path, shape: tuple[int, ...]) -> Path:
    """A valid .npz whose member header is rewritten to declare ``shape``."""
    import zipfile

    path = folder / "calib.npz"
    x = np.zeros(X_SHAPE, np.float32)
    raw = (folder / "x.npy").open("wb")
    np.lib.format.write_array(raw, x, version=(1, 0))
    raw.close()
    data = (folder / "x.npy").read_bytes()
    (folder / "x.npy").unlink()
    old = np.lib.format.header_data_from_array_1_0(x)
    header = repr({"descr": old["descr"], "fortran_order": False, "shape": shape})
    start = data.index(b"{")
    end = data.index(b"\n", start)
    fixed = header.encode().ljust(end - start)
    assert len(fixed) == end - start
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", data[:start] + fixed + data[end:])
    return path


def _bomb(folder: Path) -> Path:
    """Small on disk, 64 MiB unpacked (with the budget lowered to 1 MiB for the test)."""
    path = folder / "calib.npz"
    np.savez_compressed(path, x=np.zeros((2048, 3, 8, 8), np.float32))
    return path


def _prune_args(model: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--ratio", "0.5", "--levels", "5", "--no-cache", *extra]


def ext_negative_length(folder: Path) -> list[str]:
    return ["inspect", str(_external_field(folder, "length", "-5"))]


def ext_negative_offset(folder: Path) -> list[str]:
    return _prune_args(_external_field(folder, "offset", "-8"), "--synthetic", "4")


def ext_wrong_length(folder: Path) -> list[str]:
    return _prune_args(_external_field(folder, "length", "7"), "--synthetic", "4")


def ext_huge_length(folder: Path) -> list[str]:
    return ["inspect", str(_external_field(folder, "length", str(10**12)))]


def ext_offset_past_end(folder: Path) -> list[str]:
    return ["inspect", str(_external_field(folder, "offset", str(10**12)))]


def npz_huge_header(folder: Path) -> list[str]:
    data = _npz_header(folder, (10**6, 3, 8, 8))
    return _prune_args(_cnn(folder), "--data", str(data))


def npz_bomb(folder: Path) -> list[str]:
    os.environ["RDPRUNE_MAX_DATA_BYTES"] = str(1024**2)
    return _prune_args(_cnn(folder), "--data", str(_bomb(folder)))


def curves_file_is_a_list(folder: Path) -> list[str]:
    (folder / "c.json").write_text("[1, 2]")
    return ["allocate", str(folder / "c.json"), "--model", str(_cnn(folder)), "--ratio", "0.5"]


def zero_size_weight(folder: Path) -> list[str]:
    model = graphs.cnn()
    w = model.graph.initializer[-1]
    w.dims[0] = 0
    w.ClearField("raw_data")
    w.ClearField("float_data")
    onnx.save_model(model, str(folder / "m.onnx"))
    return _prune_args(folder / "m.onnx", "--synthetic", "4")


def tensor_size_mismatch(folder: Path) -> list[str]:
    """Found by fuzzing: a shape that disagrees with the data stored (the checker passes)."""
    model = graphs.cnn()
    model.graph.initializer[0].dims[0] = 1
    onnx.save_model(model, str(folder / "m.onnx"))
    return _prune_args(folder / "m.onnx", "--synthetic", "4")


def invalid_utf8_name(folder: Path) -> list[str]:
    """Found by fuzzing: protobuf hands out bytes for a name that is not UTF-8."""
    data = bytearray(graphs.cnn().SerializeToString())
    data[data.index(b"conv1")] = 0x80
    (folder / "m.onnx").write_bytes(bytes(data))
    return _prune_args(folder / "m.onnx", "--synthetic", "4")


def external_empty_offset(folder: Path) -> list[str]:
    """Found by fuzzing: an empty offset field."""
    return ["inspect", str(_external_field(folder, "offset", ""))]


def unknown_element_type(folder: Path) -> list[str]:
    """Found by fuzzing: an element type number onnx does not know."""
    model = graphs.cnn()
    model.graph.initializer[0].data_type = 29
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    return _prune_args(folder / "m.onnx", "--synthetic", "4")


def external_nul_location(folder: Path) -> list[str]:
    """Found by fuzzing: a NUL byte in the data file's name."""
    return ["inspect", str(_external_field(folder, "location", "\x00"))]


def npz_encrypted_member(folder: Path) -> list[str]:
    """Found by fuzzing: a member flagged as encrypted (zipfile raises RuntimeError)."""
    path = folder / "calib.npz"
    np.savez(path, x=np.zeros(X_SHAPE, np.float32) + 1)
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    data[central + 8] |= 1  # general purpose flag: encrypted
    path.write_bytes(bytes(data))
    return _prune_args(_cnn(folder), "--data", str(path))


ONE_LINE = [
    pytest.param(ext_negative_length, "length", id="external-negative-length"),
    pytest.param(ext_negative_offset, "offset", id="external-negative-offset"),
    pytest.param(ext_wrong_length, "length 7", id="external-wrong-length"),
    pytest.param(ext_huge_length, "length", id="external-length-1e12"),
    pytest.param(ext_offset_past_end, "past the end", id="external-offset-past-end"),
    pytest.param(npz_huge_header, "declares shape", id="npz-header-huge-shape"),
    pytest.param(npz_bomb, "memory budget", id="npz-decompression-bomb"),
    pytest.param(curves_file_is_a_list, "not a curves file", id="curves-file-json-list"),
    pytest.param(zero_size_weight, "", id="zero-size-weight"),
    pytest.param(tensor_size_mismatch, "need", id="fuzz-tensor-size-mismatch"),
    pytest.param(invalid_utf8_name, "UTF-8", id="fuzz-invalid-utf8-name"),
    pytest.param(external_empty_offset, "offset", id="fuzz-external-empty-offset"),
    pytest.param(unknown_element_type, "unknown element type", id="fuzz-unknown-element-type"),
    pytest.param(external_nul_location, "location", id="fuzz-external-nul-location"),
    pytest.param(npz_encrypted_member, "npz", id="fuzz-npz-encrypted-member"),
]


@pytest.mark.parametrize(("prepare", "needle"), ONE_LINE)
def test_bad_input_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepare: Prepare, needle: str
) -> None:
    monkeypatch.delenv("RDPRUNE_MAX_DATA_BYTES", raising=False)
    folder = tmp_path / "work"
    folder.mkdir()
    with monkeypatch.context() as mp:
        mp.setattr(os, "environ", dict(os.environ))
        args = prepare(folder)
        before = snapshot(tmp_path)
        result = CliRunner().invoke(cli, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert needle in lines[0], lines[0]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("label", ["report", "curves file", "plot", "output"])
def test_read_only_file_system_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label: str
) -> None:
    """EROFS at the publishing step (where a read-only mount fails): one line, nothing left."""
    import errno

    publish = files.publish

    def read_only(src: Path, target: Path, **kwargs: object) -> None:
        if kwargs.get("label", "output") == label:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        publish(src, target, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(files, "publish", read_only)
    folder = tmp_path / "work"
    folder.mkdir()
    if label == "curves file":
        model = str(_cnn(folder))
        args = ["curves", model, "--synthetic", "4", "--levels", "5", "-o", str(folder / "c.json")]
    else:
        args = _synthetic(folder, "-o", str(folder / "o.onnx"))
        args += ["--report", str(folder / "r.json"), "--plot", str(folder / "p.png")]
        (folder / "o.onnx.data").write_bytes(b"the user's, not ours")  # never rolled back
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, [*args, "--no-cache"] if label == "curves file" else args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert lines[-1].startswith("Error: ") and "Read-only file system" in lines[-1], lines
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before  # the plot failing removes the model and report
