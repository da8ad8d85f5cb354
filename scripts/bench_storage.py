"""Benchmark the storage of pruned weights: dense zeros, compact, ONNX sparse initializers, gzip.

For each model and ratio the prunable layers (``find_layers``) get a uniform magnitude mask
(``apply_mask``) and are written back with ``replace_weights``: that is the dense-zeros
model. It is then stored three more ways:

* compact: ``rdprune_onnx.compact.compact_weights`` (values + bit mask or position gaps as
  ordinary initializers, rebuilt by standard ops that onnxruntime folds at load);
* sparse_initializer: each prunable weight as an ONNX sparse initializer (values + int64
  flat indices), which onnxruntime densifies at load;
* gzip of the dense-zeros file (level 9).

Reported: file sizes, the bytes of the prunable weights alone (their tensor data, and for
compact also everything the compaction added to the file), onnx.checker results, session
load time and median inference time of dense zeros vs compact (same process, alternated),
whether the outputs are bitwise identical, whether onnxruntime folded every rebuild node,
and whether the optimised compact graph runs the same ops on the same inputs as the
optimised dense one (both from ``optimized_model_filepath`` at the basic level). The
sparse_initializer route is also loaded and its outputs compared (in the JSON).

Timings are medians (and minima for loads) in one process, one intra-op thread by default;
on a busy machine the load minima are the better guide.

    .venv/bin/python scripts/bench_storage.py [--out bench_storage.json]
"""

from __future__ import annotations

import argparse
import gzip
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from benchlib.records import RESULTS, write_json
from onnx import helper, numpy_helper

from rdprune_onnx.compact import compact_weights, compacted_weights, weight_storage_bytes
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask, magnitude_order, prune_count

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.5, 0.8, 0.95)


@dataclass
class Case:
    name: str
    path: Path
    feeds: dict[str, np.ndarray]


@dataclass
class Result:
    model: str
    ratio: float
    sparsity: float  # zeros over all prunable weights after masking
    prunable_weights: int
    file_dense: int
    file_compact: int
    file_sparse: int
    file_gzip_dense: int
    file_gzip_compact: int
    weights_dense: int  # tensor data of the prunable weights
    weights_compact: int  # tensor data that stores them in the compact model
    weights_compact_in_file: int  # file_compact minus everything that is not a prunable weight
    weights_sparse: int  # values + int64 indices
    weights_gzip: int  # gzip of their dense-zeros data
    encodings: dict[str, int]
    checker_compact: str
    checker_sparse: str
    load_ms_dense: float  # median
    load_ms_compact: float
    load_ms_sparse: float
    load_ms_dense_min: float
    load_ms_compact_min: float
    infer_ms_dense: float
    infer_ms_compact: float
    identical_compact: bool
    identical_sparse: bool
    unfolded_rebuild_nodes: int
    same_optimized_graph: bool
    notes: list[str] = field(default_factory=list)


def cases(batch: int) -> list[Case]:
    found: list[Case] = []
    digits = ROOT / "models" / "digits_cnn.onnx"
    if digits.exists():
        data = np.load(ROOT / "models" / "digits_test.npz")
        found.append(Case("digits_cnn", digits, {"input": data["input"][:batch]}))
    minilm = ROOT / "models" / "minilm" / "minilm.onnx"
    if minilm.exists():
        data = np.load(minilm.parent / "calib.npz")
        found.append(Case("minilm", minilm, {k: data[k][:batch] for k in data.files}))
    return found


def dense_zeros(model: onnx.ModelProto, ratio: float) -> tuple[onnx.ModelProto, list[str]]:
    scan = find_layers(model)
    weights = {}
    for layer in scan.layers:
        weight = read_weight(model, layer.name)
        count = prune_count(ratio, layer.size)
        weights[layer.name] = apply_mask(weight, count, magnitude_order(weight))
    return replace_weights(model, weights), [layer.name for layer in scan.layers]


def sparse_initializers(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Each named main-graph initializer as a sparse initializer (values + int64 indices)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names)
    keep = []
    for tensor in out.graph.initializer:
        if tensor.name not in wanted:
            keep.append(tensor)
            continue
        array = numpy_helper.to_array(tensor).reshape(-1)
        positions = np.flatnonzero(array.view(f"u{array.dtype.itemsize}"))
        values = numpy_helper.from_array(array[positions], tensor.name)
        indices = numpy_helper.from_array(positions.astype(np.int64), tensor.name + "_indices")
        out.graph.sparse_initializer.append(
            helper.make_sparse_tensor(values, indices, list(tensor.dims))
        )
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def check(model: onnx.ModelProto) -> str:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        return "fails: " + str(exc).strip().splitlines()[0][:200]
    return "passes"


def options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


def load(blob: bytes, threads: int) -> tuple[ort.InferenceSession, float]:
    start = time.perf_counter()
    session = ort.InferenceSession(blob, options(threads), providers=["CPUExecutionProvider"])
    return session, (time.perf_counter() - start) * 1000


def median_load_ms(blob: bytes, threads: int, repeats: int) -> float:
    return statistics.median(load(blob, threads)[1] for _ in range(repeats))


def optimized_graph(model: onnx.ModelProto, threads: int) -> onnx.GraphProto:
    """onnxruntime's optimised main graph (basic level: constant folding)."""
    with tempfile.TemporaryDirectory() as folder:
        so = options(threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath).graph


def _signature(graph: onnx.GraphProto, keep: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Each node's op and inputs; an initializer input other than a prunable weight is
    described by its type, shape and value (onnxruntime may rename shared constants)."""
    inits = {t.name: t for t in graph.initializer}

    def describe(name: str) -> str:
        t = inits.get(name)
        if t is None or name in keep:
            return name
        return f"<{t.data_type} {list(t.dims)} {numpy_helper.to_array(t).tobytes().hex()[:64]}>"

    return sorted((n.op_type, tuple(describe(i) for i in n.input)) for n in graph.node)


def folding(
    dense: onnx.ModelProto, compact: onnx.ModelProto, names: Sequence[str], threads: int
) -> tuple[int, bool]:
    """Rebuild nodes left after onnxruntime's optimisation, and whether the optimised compact
    graph runs the same ops on the same inputs as the optimised dense one."""
    graph_dense = optimized_graph(dense, threads)
    graph_compact = optimized_graph(compact, threads)
    left = sum("::compact/" in node.name for node in graph_compact.node)
    same = _signature(graph_dense, set(names)) == _signature(graph_compact, set(names))
    return left, same


def identical(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    return all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
        for x, y in zip(a, b, strict=True)
    )


def measure(case: Case, ratio: float, args: argparse.Namespace) -> Result:
    """One model at one ratio in every storage: sizes, load and inference times, checks (long:
    one keyword per field of :class:`Result`)."""
    model = onnx.load(str(case.path))
    zeros, names = dense_zeros(model, ratio)
    compact = compact_weights(zeros, names)
    sparse = sparse_initializers(zeros, names)
    blobs = {k: m.SerializeToString() for k, m in (("d", zeros), ("c", compact), ("s", sparse))}

    dense_data = b"".join(numpy_helper.to_array(t).tobytes() for t in _inits(zeros, names))
    weights_dense = len(dense_data)
    rest = len(blobs["d"]) - sum(t.ByteSize() for t in _inits(zeros, names))
    sparse_bytes = sum(
        len(s.values.raw_data) + len(s.indices.raw_data) for s in sparse.graph.sparse_initializer
    )
    encodings: dict[str, int] = {}
    for encoding in compacted_weights(compact).values():
        encodings[encoding] = encodings.get(encoding, 0) + 1
    zeros_total = sum(
        int(np.count_nonzero(numpy_helper.to_array(t) == 0)) for t in _inits(zeros, names)
    )
    total = sum(int(np.prod(t.dims)) for t in _inits(zeros, names))

    dense_session, _ = load(blobs["d"], args.threads)
    compact_session, _ = load(blobs["c"], args.threads)
    notes = []
    try:
        sparse_session, _ = load(blobs["s"], args.threads)
        sparse_out = sparse_session.run(None, case.feeds)
        load_sparse = median_load_ms(blobs["s"], args.threads, args.loads)
    except Exception as exc:  # onnxruntime's own error types
        notes.append("sparse_initializer does not load: " + str(exc).splitlines()[0][:200])
        sparse_out, load_sparse = [], float("nan")
    dense_out = dense_session.run(None, case.feeds)
    compact_out = compact_session.run(None, case.feeds)

    load_dense, load_compact = time_loads(blobs["d"], blobs["c"], args)
    times_dense, times_compact = time_runs(dense_session, compact_session, case, args)
    left, same_graph = folding(zeros, compact, names, args.threads)
    return Result(
        model=case.name,
        ratio=ratio,
        sparsity=zeros_total / total if total else 0.0,
        prunable_weights=total,
        file_dense=len(blobs["d"]),
        file_compact=len(blobs["c"]),
        file_sparse=len(blobs["s"]),
        file_gzip_dense=len(gzip.compress(blobs["d"], compresslevel=9, mtime=0)),
        file_gzip_compact=len(gzip.compress(blobs["c"], compresslevel=9, mtime=0)),
        weights_dense=weights_dense,
        weights_compact=sum(weight_storage_bytes(compact, names).values()),
        weights_compact_in_file=len(blobs["c"]) - rest,
        weights_sparse=sparse_bytes,
        weights_gzip=len(gzip.compress(dense_data, compresslevel=9, mtime=0)),
        encodings=encodings,
        checker_compact=check(compact),
        checker_sparse=check(sparse),
        load_ms_dense=statistics.median(load_dense),
        load_ms_compact=statistics.median(load_compact),
        load_ms_sparse=load_sparse,
        load_ms_dense_min=min(load_dense),
        load_ms_compact_min=min(load_compact),
        infer_ms_dense=statistics.median(times_dense),
        infer_ms_compact=statistics.median(times_compact),
        identical_compact=identical(dense_out, compact_out),
        identical_sparse=bool(sparse_out) and identical(dense_out, sparse_out),
        unfolded_rebuild_nodes=left,
        same_optimized_graph=same_graph,
        notes=notes,
    )


def time_loads(dense: bytes, compact: bytes, args: argparse.Namespace) -> tuple[list[float], ...]:
    """Session load times (ms) of the dense and the compact file, alternated so that drift
    hits both alike."""
    load_dense: list[float] = []
    load_compact: list[float] = []
    for _ in range(args.loads):
        load_dense.append(load(dense, args.threads)[1])
        load_compact.append(load(compact, args.threads)[1])
    return load_dense, load_compact


def time_runs(
    dense_session: Any, compact_session: Any, case: Case, args: argparse.Namespace
) -> tuple[list[float], ...]:
    """Inference times (ms) of both sessions, after ``--warmup`` untimed runs, alternated."""
    times_dense: list[float] = []
    times_compact: list[float] = []
    for _ in range(args.warmup):
        dense_session.run(None, case.feeds)
        compact_session.run(None, case.feeds)
    for _ in range(args.runs):
        for session, times in ((dense_session, times_dense), (compact_session, times_compact)):
            start = time.perf_counter()
            session.run(None, case.feeds)
            times.append((time.perf_counter() - start) * 1000)
    return times_dense, times_compact


def _inits(model: onnx.ModelProto, names: Sequence[str]) -> list[onnx.TensorProto]:
    wanted = set(names)
    return [t for t in model.graph.initializer if t.name in wanted]


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}"


def _rel(n: int, base: int) -> str:
    return f"{_mb(n)} ({n / base:.2f}x)" if base else _mb(n)


def table(results: Sequence[Result]) -> str:
    """Three tables: file sizes, prunable weight sizes (MB, ratio to dense), checks and times."""
    sizes: list[tuple[str, ...]] = [
        ("model", "ratio", "file dense", "compact", "sparse_init", "gzip(dense)", "gzip(compact)"),
    ]
    weights: list[tuple[str, ...]] = [
        ("model", "ratio", "weights dense", "compact data", "compact+graph", "sparse_init", "gzip")
    ]
    runs: list[tuple[str, ...]] = [
        (
            "model",
            "ratio",
            "encodings",
            "same out",
            "unfolded",
            "same graph",
            "checker c/s",
            "load ms d/c",
            "load min d/c",
            "infer ms d/c",
        )
    ]
    for r in results:
        key = (r.model, f"{r.ratio:.2f}")
        file_sizes = (r.file_compact, r.file_sparse, r.file_gzip_dense, r.file_gzip_compact)
        sizes.append((*key, _mb(r.file_dense), *(_rel(n, r.file_dense) for n in file_sizes)))
        weight_sizes = (r.weights_compact, r.weights_compact_in_file, r.weights_sparse)
        weights.append(
            (
                *key,
                _mb(r.weights_dense),
                *(_rel(n, r.weights_dense) for n in (*weight_sizes, r.weights_gzip)),
            )
        )
        runs.append(
            (
                *key,
                " ".join(f"{k}:{v}" for k, v in sorted(r.encodings.items())),
                "yes" if r.identical_compact else "NO",
                str(r.unfolded_rebuild_nodes),
                "yes" if r.same_optimized_graph else "NO",
                f"{r.checker_compact.split(':')[0]}/{r.checker_sparse.split(':')[0]}",
                f"{r.load_ms_dense:.1f}/{r.load_ms_compact:.1f}",
                f"{r.load_ms_dense_min:.1f}/{r.load_ms_compact_min:.1f}",
                f"{r.infer_ms_dense:.3f}/{r.infer_ms_compact:.3f}",
            )
        )
    return "\n\n".join(_format(rows) for rows in (sizes, weights, runs))


def _format(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(RESULTS / "bench_storage.json"), help="JSON results file"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--models", nargs="*", help="restrict to these case names")
    parser.add_argument("--runs", type=int, default=50, help="timed inference runs")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--loads", type=int, default=11, help="timed session loads")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = parser.parse_args(argv)

    results: list[Result] = []
    for case in cases(args.batch):
        if args.models and case.name not in args.models:
            continue
        for ratio in args.ratios:
            result = measure(case, ratio, args)
            results.append(result)
            print(f"{case.name} {ratio}: done", file=sys.stderr, flush=True)
    print(table(results))
    for r in results:
        if r.checker_sparse != "passes":
            print(f"{r.model} {r.ratio}: sparse_initializer checker {r.checker_sparse}")
        for note in r.notes:
            print(f"{r.model} {r.ratio}: {note}")
    report: dict[str, Any] = {
        "results": [asdict(r) for r in results],
        "settings": vars(args),
        "versions": {
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
        },
    }
    write_json(Path(args.out), report, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
