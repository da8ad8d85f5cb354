"""Models over 2 GiB (slow): a session over one, and the prune command on one under twice
its size. The same routes on tiny graphs, with the size threshold lowered, are tested fast
in tests/test_runtime.py (staging) and tests/graph/test_external.py (the writer)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rdprune_onnx.graph import external
from rdprune_onnx.graph.load import data_bytes
from rdprune_onnx.runtime import Session
from tests import graphs


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
