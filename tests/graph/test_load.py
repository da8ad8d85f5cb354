from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.load import load_model, save_model
from tests import graphs


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p, "does not exist"),
        (lambda p: (p.mkdir(), p)[1], "is a directory"),
        (lambda p: (p.write_bytes(b""), p)[1], "is empty"),
        (lambda p: (p.write_bytes(b"\xff\xfe this is not onnx" * 10), p)[1], "cannot parse"),
    ],
)
def test_bad_files(tmp_path: Path, make, needle: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path / "m.onnx")
    with pytest.raises(UserError, match=needle):
        load_model(path)


def test_truncated_file(tmp_path: Path) -> None:
    data = graphs.cnn().SerializeToString()
    path = tmp_path / "t.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError):
        load_model(path)


def test_checker_failure(tmp_path: Path) -> None:
    model = graphs.cnn()
    model.graph.node[0].input[0] = "nowhere"
    path = tmp_path / "bad.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(UserError, match="checker"):
        load_model(path)


def test_external_data_same_folder(tmp_path: Path) -> None:
    model = graphs.cnn()
    graphs.save_external(model, tmp_path / "m.onnx", "m.data")
    loaded = load_model(tmp_path / "m.onnx")
    w = onnx.numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "w3"))
    assert w.shape == (16, 288)


def test_external_data_outside_folder_refused(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    model = graphs.cnn()
    graphs.save_external(model, tmp_path / "m.onnx", "m.data")
    # Move the model one folder down, pointing back up with "../m.data".
    loaded = onnx.load_model(str(tmp_path / "m.onnx"), load_external_data=False)
    for tensor in loaded.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.data"
    onnx.save_model(loaded, str(inner / "m.onnx"))
    with pytest.raises(UserError, match="outside"):
        load_model(inner / "m.onnx")


def test_external_data_symlink_escape_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    model_dir = tmp_path / "model"
    outside.mkdir()
    model_dir.mkdir()
    graphs.save_external(graphs.cnn(), outside / "m.onnx", "m.data")
    os.symlink(outside / "m.data", model_dir / "m.data")
    (model_dir / "m.onnx").write_bytes((outside / "m.onnx").read_bytes())
    with pytest.raises(UserError, match="outside"):
        load_model(model_dir / "m.onnx")


def test_missing_external_data(tmp_path: Path) -> None:
    graphs.save_external(graphs.cnn(), tmp_path / "m.onnx", "m.data")
    (tmp_path / "m.data").unlink()
    with pytest.raises(UserError, match="missing"):
        load_model(tmp_path / "m.onnx")


def test_save_is_atomic_and_protects_input(tmp_path: Path) -> None:
    model = graphs.cnn()
    out = tmp_path / "out.onnx"
    save_model(model, out)
    assert onnx.load_model(str(out)).graph.name == "cnn"
    with pytest.raises(UserError, match="already exists"):
        save_model(model, out)
    with pytest.raises(UserError, match="input"):
        save_model(model, out, force=True, protect=(out,))
    with pytest.raises(UserError, match="does not exist"):
        save_model(model, tmp_path / "nope" / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no temp left


def test_save_external_writes_fresh_data_file(tmp_path: Path) -> None:
    model = graphs.cnn()
    files = save_model(model, tmp_path / "big.onnx", external_data=True)
    assert [f.name for f in files] == ["big.onnx", "big.onnx.data"]
    loaded = load_model(tmp_path / "big.onnx")
    w = onnx.numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "w1"))
    ref = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w1"))
    np.testing.assert_array_equal(w, ref)


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", disk_full)
    with pytest.raises(UserError, match="No space left"):
        save_model(graphs.cnn(), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_with_external_data_leaves_the_callers_model_intact(tmp_path: Path) -> None:
    model = graphs.cnn()
    before = model.SerializeToString()
    save_model(model, tmp_path / "e.onnx", external_data=True)
    assert model.SerializeToString() == before  # still holds its own data


def test_data_bytes_counts_tensor_data() -> None:
    from rdprune_onnx.graph.load import data_bytes

    model = graphs.cnn()
    expected = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert data_bytes(model) == expected
