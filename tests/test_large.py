"""Large models: sessions over external data, never one serialised protobuf.

The fast tests lower the size threshold so that the tiny graphs of ``tests/graphs.py`` take
the route that models over 2 GiB take; the slow one builds a model over 2 GiB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx import runtime
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph import external
from rdprune_onnx.graph.load import data_bytes, iter_all_tensors
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.runtime import Session, SessionConfig, write_for_runtime
from tests import graphs


def _rng_inputs(model: onnx.ModelProto, batch: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
        if dtype == np.bool_:
            feeds[value.name] = np.array(True)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _nested_scopes() -> onnx.ModelProto:
    """An If whose branch has its own initializer and Constant node, and a Constant node
    with typed (float_data) storage in the main graph."""
    rng = np.random.default_rng(2)
    f32 = TensorProto.FLOAT
    inner_w = rng.standard_normal((6, 6)).astype(np.float32)
    inner_c = rng.standard_normal((6, 6)).astype(np.float32)
    typed = rng.standard_normal((6, 6)).astype(np.float32)
    then_branch = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c_in"], value=graphs.init("c_in_v", inner_c)),
            helper.make_node("MatMul", ["h", "w_in"], ["t1"], name="then_mm"),
            helper.make_node("MatMul", ["t1", "c_in"], ["t_out"], name="then_mm2"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", f32, None)],
        [graphs.init("w_in", inner_w)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", f32, None)],
    )
    typed_tensor = helper.make_tensor("typed_v", f32, [6, 6], typed.ravel().tolist(), raw=False)
    nodes = [
        helper.make_node("Constant", [], ["w_typed"], value=typed_tensor),
        helper.make_node("MatMul", ["x", "w_typed"], ["h"], name="typed_mm"),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "nested",
        [
            helper.make_tensor_value_info("x", f32, ["N", 6]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", f32, ["N", 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn": graphs.cnn,
    "cnn_fp16": lambda: graphs.cnn(dtype=np.float16),
    "mlp_forms": graphs.mlp_forms,
    "loop_model": graphs.loop_model,
    "attention": graphs.attention,
    "nested_scopes": _nested_scopes,
}


@pytest.fixture
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private temporary folder for the sessions' staging folders."""
    folder = tmp_path / "staging"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder


def _external_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(external, "TENSOR_MIN_BYTES", 64)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("optimize", [True, False])
def test_external_route_matches_in_memory(
    name: str, optimize: bool, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MODELS[name]()
    before = model.SerializeToString()
    feeds = _rng_inputs(model)
    config = SessionConfig(optimize=optimize)
    dense = Session(model, config)
    expected = dense.run(feeds)
    assert not any(staging.iterdir())  # small models never touch the disk
    _external_route(monkeypatch)
    session = Session(model, config)
    got = session.run(feeds)
    assert session.input_names == dense.input_names
    assert session.output_names == dense.output_names
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == want.dtype
        assert have.shape == want.shape
        assert have.tobytes() == want.tobytes()  # bitwise
    assert model.SerializeToString() == before  # the caller's model is untouched
    assert not any(staging.iterdir())  # the staging folder is gone already
    session.close()
    with pytest.raises(ValueError, match="closed"):
        session.run(feeds)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_written_model_is_the_same_model(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(external, "TENSOR_MIN_BYTES", 64)
    model = MODELS[name]()
    path = write_for_runtime(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    small = onnx.load_model(str(path), load_external_data=False)
    moved = [
        t
        for t in runtime_tensors(small)
        if t.data_location == TensorProto.EXTERNAL and t.data_type != TensorProto.STRING
    ]
    assert moved, "no tensor went to the data file"
    assert len(small.SerializeToString()) < len(model.SerializeToString())
    loaded = onnx.load_model(str(path))
    want = {t.name: numpy_helper.to_array(t) for t in runtime_tensors(model)}
    have = {t.name: numpy_helper.to_array(t) for t in runtime_tensors(loaded)}
    assert want.keys() == have.keys()
    for key, array in want.items():
        assert have[key].dtype == array.dtype
        assert have[key].tobytes() == array.tobytes()
    # Everything but the tensors' storage is unchanged.
    for m in (model, loaded):
        for t in runtime_tensors(m):
            for field in external._DATA_FIELDS:
                t.ClearField(field)
    assert loaded.SerializeToString() == model.SerializeToString()


def runtime_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return iter_all_tensors(model)


def test_nested_scopes_go_external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Initializers and Constant values inside subgraphs, and typed storage, are moved."""
    monkeypatch.setattr(external, "TENSOR_MIN_BYTES", 64)
    small = onnx.load_model(
        str(write_for_runtime(_nested_scopes(), tmp_path)), load_external_data=False
    )
    moved = {t.name for t in runtime_tensors(small) if t.data_location == TensorProto.EXTERNAL}
    assert moved == {"typed_v", "w_in", "c_in_v"}
    offsets = [
        int(e.value) for t in runtime_tensors(small) for e in t.external_data if e.key == "offset"
    ]
    assert len(set(offsets)) == len(offsets)


def test_small_tensors_stay_inline(tmp_path: Path) -> None:
    small = onnx.load_model(
        str(write_for_runtime(graphs.mlp_forms(), tmp_path)), load_external_data=False
    )
    assert not any(t.data_location == TensorProto.EXTERNAL for t in runtime_tensors(small))


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
    small = onnx.load_model(str(write_for_runtime(model, tmp_path)), load_external_data=False)
    for tensor in runtime_tensors(small):
        info = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
        if info and info["length"] >= 64 * 1024:
            assert info["offset"] % (64 * 1024) == 0


def test_write_failure_is_a_user_error(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _external_route(monkeypatch)

    def full(*args: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime, "write_for_runtime", full)
    with pytest.raises(UserError, match="No space left"):
        Session(graphs.cnn())
    assert not any(staging.iterdir())


@pytest.mark.parametrize("external", [False, True])
def test_session_with_replaced_weights(
    external: bool, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Session(model, weights=...)`` is ``Session(replace_weights(model, ...))``, on both
    routes, without touching the caller's model; Constant-node and If-used weights too."""
    model = graphs.mlp_forms()
    before = model.SerializeToString()
    rng = np.random.default_rng(4)
    names = ("w_const", "w_if", "w_shared", "w_left")
    slots = {t.name: t for t in runtime_tensors(model)}
    slots["w_const"] = next(n for n in model.graph.node if n.op_type == "Constant").attribute[0].t
    weights = {
        n: (
            rng.standard_normal(tuple(slots[n].dims)) * (rng.random(tuple(slots[n].dims)) > 0.5)
        ).astype(np.float32)
        for n in names
    }
    feeds = _rng_inputs(model)
    expected = Session(replace_weights(model, weights)).run(feeds)
    if external:
        _external_route(monkeypatch)
    got = Session(model, weights=weights).run(feeds)
    for want, have in zip(expected, got, strict=True):
        assert have.tobytes() == want.tobytes()
    assert model.SerializeToString() == before
    assert not any(staging.iterdir())
    with pytest.raises(ValueError, match="type or shape"):
        Session(model, weights={"w_left": np.zeros((4, 6), np.float32)})
    with pytest.raises(KeyError, match="nope"):
        Session(model, weights={"nope": np.zeros((4, 6), np.float32)})
    assert not any(staging.iterdir())


def test_write_named_output_with_weights(tmp_path: Path) -> None:
    """The writer as a streaming ``save_model``: a named file, a fresh ``<name>.data``,
    replaced weights in it, a model that onnx's checker and loader accept."""
    model = graphs.cnn()
    before = model.SerializeToString()
    w3 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w3"))
    pruned = np.where(np.abs(w3) > np.median(np.abs(w3)), w3, 0).astype(np.float32)
    path = write_for_runtime(model, tmp_path, {"w3": pruned}, name="out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    onnx.checker.check_model(str(path))
    loaded = onnx.load_model(str(path))
    have = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    assert have["w3"].tobytes() == pruned.tobytes()
    assert model.SerializeToString() == before


@pytest.mark.skipif(os.name != "posix", reason="stale folders are found by pid on POSIX")
def test_stale_staging_folders_are_removed(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while staging leaves its folder behind; the next session removes it
    once it is old and its process is gone, and leaves every other folder alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 2 * 3600
    folders = {
        "stale": staging / f"rdprune-ort-{dead.pid}-abc",
        "recent": staging / f"rdprune-ort-{dead.pid}-def",
        "alive": staging / f"rdprune-ort-{os.getppid()}-ghi",
        "other": staging / "something-else",
    }
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"x")
        if name != "recent":
            for p in (folder / "model.onnx.data", folder):
                os.utime(p, (old, old))
    _external_route(monkeypatch)
    Session(graphs.cnn())
    assert sorted(p.name for p in staging.iterdir()) == sorted(
        folders[k].name for k in ("recent", "alive", "other")
    )


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
@pytest.mark.skipif(_mem_available() < 10 * 1024**3, reason="needs about 10 GiB of free memory")
def test_session_over_2gib(staging: Path) -> None:
    """A model whose protobuf exceeds 2 GiB runs (SerializeToString would raise)."""
    n, count = 8192, 9  # nine 256 MiB weights: 2.25 GiB
    nodes, inits = [], []
    previous = "x"
    for i in range(count):
        weight = np.zeros((n, n), np.float32)
        np.fill_diagonal(weight, 1.0 + i / 10)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        del weight
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", n])],
        inits,
    )
    del inits
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    del graph
    assert data_bytes(model) > 2**31  # never ByteSize(): it raises here
    x = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32)
    (y,) = Session(model).run({"x": x})
    scale = float(np.prod([1.0 + i / 10 for i in range(count)]))
    np.testing.assert_allclose(y, x * scale, rtol=1e-5)
    assert not any(staging.iterdir())
    assert not os.listdir(staging)


class _Generated(Mapping[str, np.ndarray]):
    """Weights made when the writer reaches them: the model never exists in memory whole."""

    def __init__(self, names: list[str], n: int) -> None:
        self.names, self.n = names, n

    def __getitem__(self, name: str) -> np.ndarray:
        rng = np.random.default_rng(self.names.index(name))
        weight = rng.standard_normal((self.n, self.n), dtype=np.float32)
        weight *= np.float32(1 / np.sqrt(self.n))
        return weight

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@pytest.mark.slow
@pytest.mark.skipif(_mem_available() < 8 * 1024**3, reason="needs about 8 GiB of free memory")
@pytest.mark.parametrize("method", ["global", "rd"])
def test_prune_over_2gib_under_twice_its_size(tmp_path: Path, method: str) -> None:
    """The prune command on a 2.25 GiB model with external data peaks under 2x its size."""
    n, count = 8192, 9
    names = [f"w{i}" for i in range(count)]
    nodes = []
    previous = "x"
    for i, name in enumerate(names):
        nodes.append(helper.make_node("MatMul", [previous, name], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}"]))
        previous = f"h{i}"
    shells = []  # type and shape only: the writer asks _Generated for the values
    for name in names:
        shell = TensorProto(name=name, data_type=TensorProto.FLOAT)
        shell.dims.extend([n, n])
        shells.append(shell)
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", n])],
        shells,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", graphs.OPSET)])
    path = external.write_external(model, tmp_path, _Generated(names, n), name="big.onnx")
    size = (tmp_path / "big.onnx.data").stat().st_size
    assert size >= 9 * n * n * 4
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    command = [
        "prune",
        str(path),
        "--ratio",
        "0.5",
        "--method",
        method,
        "--levels",
        "3",
        "--synthetic",
        "2",
        "-o",
        str(out),
        "--no-cache",
        "--no-progress",
        "--provider",
        "cpu",
    ]
    returncode, stderr, peak = _run_with_peak(command)
    assert returncode == 0, stderr[-2000:]
    assert peak < 2 * size, f"peak {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB model"
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    pruned = onnx.load_model(str(out), load_external_data=False)
    zeros = total = 0
    for tensor in pruned.graph.initializer:
        array = external.tensor_array(_attached(tensor, out.parent))
        zeros += int(np.count_nonzero(array == 0))
        total += array.size
    assert zeros == total // 2


# Runs the command line in the child and reports that process's own peak (VmHWM): the
# kernel carries the parent's high-water mark into a forked child's ru_maxrss (it is taken
# from the pre-exec memory map), so neither RUSAGE_CHILDREN nor wait4's usage can tell a
# prune's peak from the pytest process's own size.
_PEAK_WRAPPER = """
import atexit, sys
def _peak():
    with open('/proc/self/status') as f:
        kib = next(line.split()[1] for line in f if line.startswith('VmHWM'))
    sys.stderr.write(f'\\nVMHWM_KIB {kib}\\n')
atexit.register(_peak)
from rdprune_onnx_cli.main import main
sys.argv[0] = 'rdprune-onnx'
main()
"""


def _run_with_peak(command: list[str]) -> tuple[int, str, int]:
    """Run the command line with ``command`` (its arguments); its exit code, stderr and its
    own peak resident memory in bytes."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = [line for line in done.stderr.splitlines() if line.startswith("VMHWM_KIB ")]
    assert lines, done.stderr[-2000:]
    return done.returncode, done.stderr, int(lines[-1].split()[1]) * 1024


def _attached(tensor: onnx.TensorProto, folder: Path) -> onnx.TensorProto:
    external.make_lazy(tensor, folder)
    return tensor
