"""rdprune_onnx.runtime: session options, provider choice, the staging of large models
(and of stale staging folders), IOBinding runs, and how failures are classified."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx import runtime
from rdprune_onnx.errors import InternalError, UserError
from rdprune_onnx.graph.load import iter_all_tensors, read_model
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.runtime import Session, SessionConfig, write_for_runtime
from tests import graphs
from tests.graphs_external import MODELS, all_lazy, external_route, rng_inputs, save_in


def _square(width: int = 4, seed: int = 0) -> onnx.ModelProto:
    """``y = tanh(x @ W)`` with a square ``W``: its output can be fed back as its input."""
    weight = np.random.default_rng(seed).standard_normal((width, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(weight, "w")],
    )
    return graphs._model(graph)


class _Spy:
    """Records what each ``InferenceSession`` is created with, then creates it on the CPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[ort.SessionOptions, list[str]]] = []
        real = ort.InferenceSession

        def create(model: Any, sess_options: ort.SessionOptions, providers: list[str]) -> Any:
            self.calls.append((sess_options, list(providers)))
            return real(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

        monkeypatch.setattr(runtime.ort, "InferenceSession", create)


# --- session configuration and provider -----------------------------------------------


def test_session_options_follow_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    Session(graphs.cnn())
    Session(graphs.cnn(), SessionConfig(intra_op_threads=3, optimize=False))
    Session(graphs.cnn(), SessionConfig(provider="cuda"))
    (default, _), (custom, _), _ = spy.calls
    assert default.intra_op_num_threads == 0
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert custom.intra_op_num_threads == 3
    assert custom.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert [providers for _, providers in spy.calls] == [
        ["CPUExecutionProvider"],
        ["CPUExecutionProvider"],
        ["CUDAExecutionProvider", "CPUExecutionProvider"],  # CPU as the fallback
    ]


@pytest.mark.parametrize("build", [graphs.cnn, graphs.attention, graphs.conv_transpose])
def test_optimized_and_plain_sessions_agree(build: Any) -> None:
    model = build()
    feeds = rng_inputs(model)
    fast = Session(model, SessionConfig(optimize=True)).run(feeds)
    plain = Session(model, SessionConfig(optimize=False, intra_op_threads=1)).run(feeds)
    for a, b in zip(fast, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_resolve_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    preloaded: list[bool] = []
    monkeypatch.setattr(runtime.ort, "preload_dlls", lambda: preloaded.append(True), raising=False)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert runtime.resolve_provider("auto") == "cpu"
    assert runtime.resolve_provider("cpu") == "cpu"
    with pytest.raises(UserError, match="CUDA execution provider is not available"):
        runtime.resolve_provider("cuda")
    with pytest.raises(UserError, match="unknown provider 'gpu'"):
        runtime.resolve_provider("gpu")
    assert not preloaded
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: gpu)
    assert runtime.resolve_provider("cpu") == "cpu"
    assert not preloaded  # the CUDA libraries are loaded only for a CUDA session
    assert runtime.resolve_provider("auto") == "cuda"
    assert runtime.resolve_provider("cuda") == "cuda"
    assert preloaded == [True, True]

    def broken() -> None:
        raise OSError("no libcudnn")

    monkeypatch.setattr(runtime.ort, "preload_dlls", broken, raising=False)
    assert runtime.resolve_provider("cuda") == "cuda"  # best effort: system libraries may do


def test_versions_name_the_modules_in_use() -> None:
    assert runtime.versions() == {
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }


# --- running ----------------------------------------------------------------------------


def test_run_returns_the_named_outputs_in_their_order() -> None:
    model = graphs.mlp_forms()
    feeds = rng_inputs(model)
    session = Session(model)
    assert session.input_names == ["x", "cond"]
    assert session.output_names == ["y", "gram"]
    y, gram = session.run(feeds)
    assert y.shape == (3, 5) and gram.shape == (3, 3)
    got = session.run(feeds, ["gram", "y"])
    np.testing.assert_array_equal(got[0], gram)
    np.testing.assert_array_equal(got[1], y)
    (only,) = session.run(feeds, ["gram"])
    np.testing.assert_array_equal(only, gram)


def test_a_file_is_opened_by_onnx_runtime_itself(tmp_path: Path) -> None:
    """``path`` names the file ``model`` was loaded from: that file is what runs (here a
    different in-memory model shows which one ran), unless weights are replaced."""
    path = tmp_path / "m.onnx"
    onnx.save_model(graphs.cnn(seed=0), str(path))
    other = graphs.cnn(seed=1)
    feeds = rng_inputs(other)
    from_file = Session(other, path=path).run(feeds)
    np.testing.assert_array_equal(from_file[0], Session(graphs.cnn(seed=0)).run(feeds)[0])
    zeros = {"w4": np.zeros((16, 10), np.float32)}
    swapped = Session(other, path=path, weights=zeros).run(feeds)
    want = Session(replace_weights(other, zeros)).run(feeds)
    np.testing.assert_array_equal(swapped[0], want[0])


def test_failures_are_internal_unless_on_the_users_model() -> None:
    session = Session(graphs.cnn())
    wrong = {"x": np.zeros((1, 3, 5, 5), np.float32)}  # 5x5 images: the Gemm's K mismatches
    with pytest.raises(InternalError, match="failed to run a graph rdprune-onnx built"):
        session.run(wrong)
    with runtime.user_model("model.onnx"), pytest.raises(UserError) as caught:
        session.run(wrong)
    assert "ONNX Runtime failed to run model.onnx" in str(caught.value)
    assert "calibration data" in caught.value.hint
    session.close()
    with pytest.raises(ValueError, match="closed"):
        session.run({"x": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(ValueError, match="closed"):
        session.run_bound({"x": np.zeros((1, 3, 8, 8), np.float32)}, ["y"])


# --- IOBinding ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [graphs.cnn, graphs.attention, graphs.mlp_forms])
def test_io_binding_gives_what_a_plain_run_gives(build: Any) -> None:
    model = build()
    feeds = rng_inputs(model)
    session = Session(model)
    assert session.device == "cpu"
    names = session.output_names
    plain = session.run(feeds)
    from_numpy = session.run_bound(feeds, names)
    from_device = session.run_bound({k: session.to_device(v) for k, v in feeds.items()}, names)
    kept = session.run_bound(feeds, names, on_device=True)
    for want, a, b, c in zip(plain, from_numpy, from_device, kept, strict=True):
        assert isinstance(a, np.ndarray) and not isinstance(c, np.ndarray)
        np.testing.assert_array_equal(a, want)
        np.testing.assert_array_equal(b, want)
        np.testing.assert_array_equal(c.numpy(), want)


def test_device_values_are_copies_and_can_be_updated_and_chained() -> None:
    session = Session(_square())
    rng = np.random.default_rng(3)
    first, second = rng.standard_normal((2, 5, 4)).astype(np.float32)
    (want_first,) = session.run({"x": first})
    (want_second,) = session.run({"x": second})
    value = session.to_device(first)
    first += 100  # the device value is a copy: changing the array afterwards changes nothing
    np.testing.assert_array_equal(session.run_bound({"x": value}, ["y"])[0], want_first)
    Session.update_device(value, second)
    np.testing.assert_array_equal(session.run_bound({"x": value}, ["y"])[0], want_second)
    # An output left on the device feeds the next run without a copy through numpy.
    (on_device,) = session.run_bound({"x": value}, ["y"], on_device=True)
    (twice,) = session.run_bound({"x": on_device}, ["y"])
    np.testing.assert_array_equal(twice, session.run({"x": want_second})[0])


# --- stopping ----------------------------------------------------------------------------


def test_terminate_stops_new_runs_then_allows_them_again() -> None:
    session = runtime.Session(graphs.cnn())
    x = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    runtime.terminate_runs()
    try:
        with pytest.raises(KeyboardInterrupt):
            session.run(x)
        with pytest.raises(KeyboardInterrupt):
            session.run_bound(x, ["y"])
    finally:
        runtime.reset_terminate()
    assert session.run(x)[0].shape[0] == 1


def _broken() -> onnx.ModelProto:
    """A graph ONNX Runtime refuses to load (an operator that does not exist)."""
    model = graphs.cnn()
    model.graph.node[0].op_type = "NoSuchOperator"
    return model


def test_runtime_failures_are_internal_unless_on_the_users_model() -> None:
    with pytest.raises(InternalError):
        runtime.Session(_broken())
    with pytest.raises(UserError, match="the user model"), runtime.user_model("the user model"):
        runtime.Session(_broken())


# --- large models: staged through a temporary folder --------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("optimize", [True, False])
def test_external_route_matches_in_memory(
    name: str, optimize: bool, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MODELS[name]()
    before = model.SerializeToString()
    feeds = rng_inputs(model)
    config = SessionConfig(optimize=optimize)
    dense = Session(model, config)
    expected = dense.run(feeds)
    assert not any(staging.iterdir())  # small models never touch the disk
    external_route(monkeypatch)
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


def test_write_failure_is_a_user_error(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    external_route(monkeypatch)

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
    slots = {t.name: t for t in iter_all_tensors(model)}
    slots["w_const"] = next(n for n in model.graph.node if n.op_type == "Constant").attribute[0].t
    weights = {
        n: (
            rng.standard_normal(tuple(slots[n].dims)) * (rng.random(tuple(slots[n].dims)) > 0.5)
        ).astype(np.float32)
        for n in names
    }
    feeds = rng_inputs(model)
    expected = Session(replace_weights(model, weights)).run(feeds)
    if external:
        external_route(monkeypatch)
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
    external_route(monkeypatch)
    Session(graphs.cnn())
    assert sorted(p.name for p in staging.iterdir()) == sorted(
        folders[k].name for k in ("recent", "alive", "other")
    )


@pytest.mark.parametrize("make", [graphs.cnn, graphs.attention, graphs.loop_model])
def test_session_on_lazy_model_matches_inline(
    tmp_path: Path, make: object, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model whose tensors stay on disk is staged (however small) or opened as its file."""
    all_lazy(monkeypatch)
    assert callable(make)
    model = make()
    lazy, _ = read_model(save_in(model, tmp_path), check=False)
    feeds = {
        i.name: np.random.default_rng(2)
        .normal(size=[d.dim_value or 2 for d in i.type.tensor_type.shape.dim])
        .astype(np.float32)
        for i in model.graph.input
        if i.name not in {t.name for t in model.graph.initializer}
    }
    expected = Session(model).run(feeds)
    got = Session(lazy).run(feeds)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    via_file = Session(lazy, path=tmp_path / "m.onnx").run(feeds)
    for a, b in zip(expected, via_file, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not any(staging.iterdir())


def test_a_folder_still_open_is_removed_on_close(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the staged files cannot be removed at once (Windows keeps a mapped data file
    open), the session keeps the folder and :meth:`Session.close` removes it."""
    external_route(monkeypatch)
    real = shutil.rmtree
    refused: list[str] = []

    def busy_once(path: Any, *args: Any, **kwargs: Any) -> None:
        if not refused:
            refused.append(str(path))
            raise OSError("busy")
        real(path, *args, **kwargs)

    monkeypatch.setattr(runtime.shutil, "rmtree", busy_once)
    model = graphs.cnn()
    session = Session(model)
    (folder,) = staging.iterdir()
    assert refused == [str(folder)] and folder.name.startswith(f"rdprune-ort-{os.getpid()}-")
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    feeds = rng_inputs(model)
    np.testing.assert_array_equal(session.run(feeds)[0], Session(model).run(feeds)[0])
    session.close()
    assert not any(staging.iterdir())


def test_write_for_runtime_writes_a_model_onnx_runtime_opens(tmp_path: Path) -> None:
    model = graphs.attention()
    path = write_for_runtime(model, tmp_path)
    assert path == tmp_path / "model.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    feeds = rng_inputs(model)
    direct = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(direct[0], Session(model).run(feeds)[0])
