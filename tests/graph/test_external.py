"""rdprune_onnx.graph.external: tensors whose data stays on disk (lazy), located and read
exactly; models written as a small graph plus one fresh data file, never touching the
files a lazy model reads from."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx.graph import external
from rdprune_onnx.graph.external import (
    copy_metadata,
    external_file,
    is_external,
    is_lazy,
    make_lazy,
    materialize,
    nbytes,
    read_bytes,
    tensor_array,
    write_external,
)
from rdprune_onnx.graph.load import iter_all_tensors, read_model
from tests import graphs
from tests.graphs_external import MODELS, all_lazy, nested_scopes, save_in, typed_model


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file in ``folder``: its content hash and modification time (ns)."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
    }


def _by_name(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in iter_all_tensors(model)}


# --- sizes, locations, reading --------------------------------------------------------------


def test_nbytes_from_type_and_shape_alone() -> None:
    def shell(data_type: int, dims: list[int]) -> onnx.TensorProto:
        tensor = TensorProto(name="t", data_type=data_type)
        tensor.dims.extend(dims)  # type and shape only: no data
        return tensor

    assert nbytes(shell(TensorProto.FLOAT, [3, 5])) == 60
    assert nbytes(shell(TensorProto.FLOAT16, [4, 2])) == 16
    assert nbytes(shell(TensorProto.BFLOAT16, [3])) == 6
    assert nbytes(shell(TensorProto.INT64, [6])) == 48
    assert nbytes(shell(TensorProto.DOUBLE, [])) == 8  # a scalar
    assert nbytes(shell(TensorProto.FLOAT, [0, 7])) == 0
    strings = helper.make_tensor("s", TensorProto.STRING, [2], [b"ab", b"cde"])
    assert nbytes(strings) == 0  # strings stay inline


def test_external_tensors_are_located_in_their_file(tmp_path: Path) -> None:
    model = graphs.cnn()
    path = save_in(model, tmp_path)
    plain = onnx.load_model(str(path), load_external_data=False)
    inline = _by_name(model)
    for tensor in iter_all_tensors(plain):
        assert is_external(tensor) and not is_lazy(tensor)  # no folder known yet
        assert not is_external(inline[tensor.name]) and not is_lazy(inline[tensor.name])
        make_lazy(tensor, tmp_path)
        assert is_lazy(tensor)
        where, offset, length = external_file(tensor)
        assert where == tmp_path.resolve() / "m.onnx.data"
        with open(where, "rb") as fh:
            fh.seek(offset)
            assert fh.read(length) == numpy_helper.to_array(inline[tensor.name]).tobytes()
        assert read_bytes(tensor) == numpy_helper.to_array(inline[tensor.name]).tobytes()
        # Without a length entry the length comes from the type and shape.
        kept = [e for e in tensor.external_data if e.key != "length"]
        del tensor.external_data[:]
        tensor.external_data.extend(kept)
        assert external_file(tensor)[2] == nbytes(tensor)
        np.testing.assert_array_equal(
            tensor_array(tensor), numpy_helper.to_array(inline[tensor.name])
        )


def test_lazy_tensors_read_back_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    all_lazy(monkeypatch)
    model = typed_model()
    lazy, external_data = read_model(save_in(model, tmp_path))
    assert external_data
    tensors = _by_name(lazy)
    for original in model.graph.initializer:
        assert is_lazy(tensors[original.name])
        expected = numpy_helper.to_array(original)
        got = tensor_array(tensors[original.name])
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_truncated_data_is_an_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    all_lazy(monkeypatch)
    lazy, _ = read_model(save_in(graphs.cnn(), tmp_path))
    last = max(iter_all_tensors(lazy), key=lambda t: external_file(t)[1])
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(OSError, match="truncated"):
        read_bytes(last)
    with pytest.raises(OSError, match="truncated"):
        tensor_array(last)
    with pytest.raises(OSError, match="truncated"):
        external.check_data(last)


def test_materialize_reads_the_data_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    all_lazy(monkeypatch)
    model = graphs.cnn()
    lazy, _ = read_model(save_in(model, tmp_path))
    tensor = _by_name(lazy)["w3"]
    materialize(tensor)
    assert not is_external(tensor) and not is_lazy(tensor)
    (tmp_path / "m.onnx.data").unlink()  # no longer needed
    np.testing.assert_array_equal(
        numpy_helper.to_array(tensor), numpy_helper.to_array(_by_name(model)["w3"])
    )


def test_copy_metadata_copies_everything_but_the_data() -> None:
    src = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    src.doc_string = "a weight"
    entry = src.external_data.add()
    entry.key, entry.value = "location", "x.data"
    dst = onnx.TensorProto()
    copy_metadata(src, dst)
    assert (dst.name, list(dst.dims), dst.data_type, dst.doc_string) == (
        "w",
        [2, 3],
        TensorProto.FLOAT,
        "a weight",
    )
    assert not dst.HasField("raw_data") and not dst.external_data


# --- writing ---------------------------------------------------------------------------------


def test_a_lazy_model_is_written_without_touching_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source model and data file keep their bytes and times; the copy (with a weight
    replaced) holds relative references only, so its folder can be moved."""
    all_lazy(monkeypatch)
    monkeypatch.setattr(external, "TENSOR_MIN_BYTES", 64)
    model = graphs.cnn()
    source = tmp_path / "in"
    lazy, _ = read_model(save_in(model, source))
    before = _snapshot(source)
    w4 = np.zeros((16, 10), np.float32)
    out = tmp_path / "out"
    out.mkdir()
    write_external(lazy, out, {"w4": w4}, name="copy.onnx")
    write_external(lazy, source, name="beside.onnx")  # the input's own folder, another name
    assert {k: v for k, v in _snapshot(source).items() if k in before} == before
    assert sorted(p.name for p in source.iterdir()) == sorted(
        [*before, "beside.onnx", "beside.onnx.data"]
    )
    assert sorted(p.name for p in out.iterdir()) == ["copy.onnx", "copy.onnx.data"]
    written = onnx.load_model(str(out / "copy.onnx"), load_external_data=False)
    for tensor in iter_all_tensors(written):
        keys = {e.key: e.value for e in tensor.external_data}
        assert external.BASE_KEY not in keys  # lazy references never reach a file
        assert keys.get("location", "copy.onnx.data") == "copy.onnx.data"
    moved = shutil.move(str(out), str(tmp_path / "elsewhere"))
    loaded = _by_name(onnx.load_model(str(Path(moved) / "copy.onnx")))
    for name, tensor in _by_name(model).items():
        want = w4 if name == "w4" else numpy_helper.to_array(tensor)
        np.testing.assert_array_equal(numpy_helper.to_array(loaded[name]), want, err_msg=name)


@pytest.mark.parametrize("durable", [False, True])
def test_durable_writes_sync_both_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    synced: list[int] = []
    monkeypatch.setattr(external.os, "fsync", lambda fd: synced.append(fd))
    write_external(graphs.cnn(), tmp_path, durable=durable)
    assert len(synced) == (2 if durable else 0)


def test_references_of_unknown_location_are_refused(tmp_path: Path) -> None:
    """An external tensor loaded without its folder cannot be copied (its bytes are
    nowhere this process knows): a clear error, not a dangling reference."""
    path = save_in(graphs.cnn(), tmp_path / "in")
    plain = onnx.load_model(str(path), load_external_data=False)
    with pytest.raises(ValueError, match="unknown location"):
        write_external(plain, tmp_path)


def test_replacements_must_keep_type_and_shape_and_exist(tmp_path: Path) -> None:
    model = graphs.cnn()
    with pytest.raises(ValueError, match="type or shape"):
        write_external(model, tmp_path, {"w4": np.zeros((10, 16), np.float32)})
    with pytest.raises(ValueError, match="type or shape"):
        write_external(model, tmp_path, {"w4": np.zeros((16, 10), np.float64)})
    with pytest.raises(KeyError, match="nope"):
        write_external(model, tmp_path, {"nope": np.zeros(3, np.float32)})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_written_model_is_the_same_model(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(external, "TENSOR_MIN_BYTES", 64)
    model = MODELS[name]()
    path = write_external(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    small = onnx.load_model(str(path), load_external_data=False)
    moved = [
        t
        for t in iter_all_tensors(small)
        if t.data_location == TensorProto.EXTERNAL and t.data_type != TensorProto.STRING
    ]
    assert moved, "no tensor went to the data file"
    assert len(small.SerializeToString()) < len(model.SerializeToString())
    loaded = onnx.load_model(str(path))
    want = {t.name: numpy_helper.to_array(t) for t in iter_all_tensors(model)}
    have = {t.name: numpy_helper.to_array(t) for t in iter_all_tensors(loaded)}
    assert want.keys() == have.keys()
    for key, array in want.items():
        assert have[key].dtype == array.dtype
        assert have[key].tobytes() == array.tobytes()
    # Everything but the tensors' storage is unchanged.
    for m in (model, loaded):
        for t in iter_all_tensors(m):
            for field in external._DATA_FIELDS:
                t.ClearField(field)
    assert loaded.SerializeToString() == model.SerializeToString()


def test_nested_scopes_go_external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Initializers and Constant values inside subgraphs, and typed storage, are moved."""
    monkeypatch.setattr(external, "TENSOR_MIN_BYTES", 64)
    small = onnx.load_model(
        str(write_external(nested_scopes(), tmp_path)), load_external_data=False
    )
    moved = {t.name for t in iter_all_tensors(small) if t.data_location == TensorProto.EXTERNAL}
    assert moved == {"typed_v", "w_in", "c_in_v"}
    offsets = [
        int(e.value) for t in iter_all_tensors(small) for e in t.external_data if e.key == "offset"
    ]
    assert len(set(offsets)) == len(offsets)


def test_small_tensors_stay_inline(tmp_path: Path) -> None:
    small = onnx.load_model(
        str(write_external(graphs.mlp_forms(), tmp_path)), load_external_data=False
    )
    assert not any(t.data_location == TensorProto.EXTERNAL for t in iter_all_tensors(small))


def test_large_tensors_are_aligned(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 5), (64, 300))]
    weights.append(rng.standard_normal((300, 200)).astype(np.float32))
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "a"], ["x1"]),
            helper.make_node("MatMul", ["h", "b"], ["y0"]),
            helper.make_node("MatMul", ["y0", "c"], ["y"]),
            helper.make_node("Identity", ["x1"], ["x2"]),
            helper.make_node("MatMul", ["x2", "p"], ["h"]),
        ],
        "aligned",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 200])],
        [
            graphs.init("a", weights[0]),
            graphs.init("p", rng.standard_normal((5, 64)).astype(np.float32)),
            graphs.init("b", weights[1]),
            graphs.init("c", weights[2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    small = onnx.load_model(str(write_external(model, tmp_path)), load_external_data=False)
    for tensor in iter_all_tensors(small):
        info = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
        if info and info["length"] >= 64 * 1024:
            assert info["offset"] % (64 * 1024) == 0


def test_write_named_output_with_weights(tmp_path: Path) -> None:
    """The writer as a streaming ``save_model``: a named file, a fresh ``<name>.data``,
    replaced weights in it, a model that onnx's checker and loader accept."""
    model = graphs.cnn()
    before = model.SerializeToString()
    w3 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w3"))
    pruned = np.where(np.abs(w3) > np.median(np.abs(w3)), w3, 0).astype(np.float32)
    path = write_external(model, tmp_path, {"w3": pruned}, name="out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    onnx.checker.check_model(str(path))
    loaded = onnx.load_model(str(path))
    have = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert have["w3"].tobytes() == pruned.tobytes()
    assert model.SerializeToString() == before
