"""Benchmark a model over protobuf's 2 GiB limit: peak memory, time, and the files written.

A float32 MLP of ``--layers`` MatMul layers of ``--hidden`` x ``--hidden`` weights (the
default, nine 8192 x 8192 layers, is 2.42 GB) is generated straight into an external data
file, one weight at a time (generation stays at about one layer of memory). Then, each in
its own process, with its peak resident memory (``ru_maxrss`` from ``wait4``; the anonymous
and file-backed parts sampled from ``/proc/PID/status`` every 0.1 s):

* loading: ``onnx.load`` (with external data), ``onnx_graphsurgeon.import_onnx`` (then every
  constant's values, then ``export_onnx``), and ``onnx_ir.load`` (lazy, memory-mapped
  external data; then every weight read, masked and replaced, then ``onnx_ir.save``): what
  each graph library costs on a model this size;
* sessions: ``rdprune_onnx.runtime.Session`` (staged external data), ONNX Runtime opening
  the input file itself, ``SessionOptions.add_external_initializers`` with OrtValues over
  numpy arrays, and the staged route with pre-packing disabled;
* ``rdprune-onnx prune MODEL --ratio 0.5 --method global --synthetic 4 --no-cache`` (no
  curves) and the same with ``--method rd --levels 3`` (curves): peak memory / model size,
  time, a fresh ``out.onnx.data`` beside the output (its only data file), the input's files
  unchanged (SHA-256 before and after), and the ratio met (zeros counted in the data file);
* ``phases-*``: the same two prunes run in one process with the pipeline's steps wrapped,
  recording resident memory after each step and the peak since the previous one (the peak
  counter is reset through ``/proc/self/clear_refs``), to attribute the peak to its copies.

Linux only (``/proc``; no psutil needed). The load cases need ``onnx_ir`` and
``onnx_graphsurgeon`` (measurement only: ``pip install onnx-ir``). Disk: about 3x the model
size in ``--workdir``. Cases above ``--max-rss-gb`` (default 80% of the free memory) are
killed and reported as such.

    .venv/bin/python scripts/bench_large.py --out bench_large.json
    .venv/bin/python scripts/bench_large.py --cases load,session --layers 3   # quick look
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3
ALL_CASES = ("load", "session", "prune", "phases")


# --- memory, from /proc ---------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem in bytes (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak() -> None:
    """Reset this process's VmHWM (Linux >= 4.0); best effort."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


# --- the model ---------------------------------------------------------------------------


def generate(path: Path, layers: int, hidden: int, seed: int = 0) -> None:
    """An MLP (MatMul, Relu, ..., MatMul) with all weights in ``<path>.data``."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits = []
    nodes = []
    previous = "x"
    with open(path.parent / data_name, "wb") as fh:
        for i in range(layers):
            weight = rng.standard_normal((hidden, hidden), dtype=np.float32)
            weight *= np.float32(1.5 / np.sqrt(hidden))
            offset = -(-fh.tell() // 65536) * 65536
            fh.seek(offset)
            fh.write(memoryview(weight).cast("B"))
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=weight.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(weight.nbytes)),
            ):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            inits.append(tensor)
            del weight
            out = f"h{i}" if i < layers - 1 else "y"
            nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [out], name=f"fc{i}"))
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [out], [f"r{i}"]))
                previous = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", hidden])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def model_files(path: Path) -> list[Path]:
    """The model file and every external data file it names."""
    import onnx
    from onnx import external_data_helper

    model = onnx.load_model(str(path), load_external_data=False)
    names = {
        external_data_helper.ExternalDataInfo(t).location
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t)
    }
    return [path, *(path.parent / n for n in sorted(names))]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(64 * 1024**2):
            digest.update(chunk)
    return digest.hexdigest()


def check_output(out: Path, source: Path, ratio: float) -> dict[str, Any]:
    """Files written for ``out``, and the fraction of zeros in the weights (memory-mapped)."""
    import onnx
    from onnx import external_data_helper

    model = onnx.load_model(str(out), load_external_data=False)
    zeros = total = 0
    locations = set()
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            array = onnx.numpy_helper.to_array(tensor)
        else:
            info = external_data_helper.ExternalDataInfo(tensor)
            locations.add(info.location)
            array = np.memmap(
                out.parent / info.location,
                dtype=np.float32,
                mode="r",
                offset=info.offset,
                shape=tuple(tensor.dims),
            )
        zeros += int(np.count_nonzero(array == 0))
        total += array.size
        del array
    data = out.parent / (out.name + ".data")
    source_data = {p.resolve() for p in model_files(source)[1:]}
    return {
        "data_files": sorted(locations),
        "fresh_data_file": locations == {data.name}
        and data.is_file()
        and data.resolve() not in source_data,
        "output_bytes": out.stat().st_size + (data.stat().st_size if data.is_file() else 0),
        "zero_fraction": zeros / total if total else 0.0,
        "ratio_met": total > 0 and zeros / total >= ratio - 1e-9,
    }


# --- measured child processes --------------------------------------------------------------


def run_measured(
    command: Sequence[str], limit: int, log: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``command``; its peak RSS (wait4), sampled peaks of anon/file RSS, and its time."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    killed = False
    done = threading.Event()

    def sample() -> None:
        nonlocal killed
        while not done.is_set():
            status = proc_status(proc.pid)
            for key in peaks:
                peaks[key] = max(peaks[key], status.get(key, 0))
            if status.get("VmRSS", 0) > limit and not killed:
                killed = True
                os.kill(proc.pid, signal.SIGKILL)
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    thread.join()
    text = log.read_text(errors="replace")
    result: dict[str, Any] = {
        "command": " ".join(str(c) for c in command),
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss": usage.ru_maxrss * 1024,  # kilobytes on Linux
        "peak_anon_sampled": peaks["RssAnon"],
        "peak_file_sampled": peaks["RssFile"],
        "killed_over_limit": killed,
    }
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("EVENT ")]
    if events:
        result["child"] = {"events": events}
        # The phases child resets its peak counter, which ru_maxrss shares: take the events'.
        result["peak_rss"] = max(e["peak_since_last"] for e in events)
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            result["child"] = json.loads(line[len("RESULT ") :])
            break
    steps = [v for v in (result.get("child") or {}).values() if isinstance(v, dict)]
    peaks = [v["peak"] for v in steps if v.get("peak")]
    if peaks:  # the children reset their peak counter (shared with ru_maxrss) per step
        result["peak_rss"] = max([result["peak_rss"], *peaks])
    if proc.returncode != 0:
        result["tail"] = text[-2000:]
    return result


def _emit(result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def _snap(label: str, into: dict[str, Any]) -> None:
    """Resident memory now, and the peak since the previous snapshot (then reset)."""
    status = proc_status()
    gc.collect()
    after = proc_status()
    into[label] = {
        "rss": after.get("VmRSS"),
        "anon": after.get("RssAnon"),
        "peak": status.get("VmHWM"),
    }
    reset_peak()


def child_load(kind: str, path: Path, workdir: Path) -> None:
    out: dict[str, Any] = {}
    t = time.perf_counter()
    if kind == "onnx":
        import onnx

        model = onnx.load_model(str(path))
        _snap("loaded", out)
        del model
    elif kind == "gs":
        import onnx
        import onnx_graphsurgeon as gs

        model = onnx.load_model(str(path))
        _snap("onnx.load", out)
        graph = gs.import_onnx(model)
        del model
        _snap("import_onnx, proto dropped", out)
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                np.asarray(tensor.values)
        _snap("every constant's values", out)
        exported = gs.export_onnx(graph)
        _snap("export_onnx", out)
        del exported, graph
    elif kind == "ir":
        import onnx_ir as ir

        model = ir.load(str(path))
        _snap("ir.load (lazy)", out)
        total = 0.0
        for value in model.graph.initializers.values():
            assert value.const_value is not None
            total += float(np.abs(value.const_value.numpy()).max())
        _snap("every weight read", out)
        for value in list(model.graph.initializers.values()):
            assert value.const_value is not None
            array = value.const_value.numpy()
            pruned = np.where(np.abs(array) >= np.median(np.abs(array)), array, 0)
            value.const_value = ir.Tensor(pruned.astype(np.float32), name=value.name)
            del array, pruned
        _snap("every weight masked and replaced", out)
        target = workdir / "ir_out.onnx"
        ir.save(model, target, external_data=target.name + ".data")
        _snap("ir.save", out)
        # What a pipeline on onnx-ir would do next: verify the written file in ONNX Runtime
        # once its own arrays are gone (ORT reads the new data file itself).
        import onnxruntime as ort

        del model, value
        gc.collect()  # onnx-ir's graph has reference cycles
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        x = np.ones((4, int(session.get_inputs()[0].shape[1])), np.float32)
        session.run(None, {"x": x})
        _snap("model dropped, ORT session on the output, run", out)
        del session
        for p in (target, target.with_name(target.name + ".data")):
            p.unlink(missing_ok=True)
    out["seconds"] = round(time.perf_counter() - t, 1)
    _emit(out)


def child_session(kind: str, path: Path, hidden: int) -> None:
    import onnxruntime as ort

    from rdprune_onnx.graph.load import load_model
    from rdprune_onnx.runtime import Session, write_for_runtime

    out: dict[str, Any] = {}
    x = np.random.default_rng(0).standard_normal((4, hidden)).astype(np.float32)
    t = time.perf_counter()
    keep: list[Any] = []
    if kind == "ort-path":  # ONNX Runtime reads the input's external data itself
        session: Any = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda: session.run(None, {"x": x})  # noqa: E731
    else:
        model = load_model(path, check=False)
        _snap("load_model", out)
        if kind == "staged":
            wrapped = Session(model)
            run = lambda: wrapped.run({"x": x})  # noqa: E731
        elif kind == "staged-noprepack":
            options = ort.SessionOptions()
            options.add_session_config_entry("session.disable_prepacking", "1")
            folder = Path(tempfile.mkdtemp(prefix="bench-ort-"))
            session = ort.InferenceSession(
                str(write_for_runtime(model, folder)), options, providers=["CPUExecutionProvider"]
            )
            shutil.rmtree(folder)
            run = lambda: session.run(None, {"x": x})  # noqa: E731
        elif kind == "add-external":
            holder = [model]
            del model  # the session is measured without the loaded model (see the function)
            session = _external_initializer_session(holder, out, keep)
            run = lambda: session.run(None, {"x": x})  # noqa: E731
        else:
            raise ValueError(kind)
    out["create_seconds"] = round(time.perf_counter() - t, 1)
    _snap("session created", out)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    out["run_seconds"] = round(float(np.median(times)), 3)
    _snap("after 3 runs", out)
    _emit(out)


def _external_initializer_session(holder: list[Any], out: dict[str, Any], keep: list[Any]) -> Any:
    """numpy copies of the weights wrapped (not copied) by OrtValues; the model keeps
    placeholders. Measures what ORT adds on top of arrays the caller holds (``keep`` holds
    them for the session's life). ``holder`` has the loaded model, dropped once copied."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    names, values = [], []
    small = onnx.ModelProto()
    small.CopyFrom(holder[0])  # not what a library would do: see the notes
    holder.clear()
    for tensor in small.graph.initializer:
        array = numpy_helper.to_array(tensor)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "absent.bin"), ("offset", "0")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        value = ort.OrtValue.ortvalue_from_numpy(array)
        keep.append((array, value))
        names.append(tensor.name)
        values.append(value)
    _snap("arrays + placeholders", out)
    options = ort.SessionOptions()
    options.add_external_initializers(names, values)
    return ort.InferenceSession(
        small.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


# The names child_phases wraps where the pipeline and the curve engine look them up (their
# module namespaces); a name that moved elsewhere is skipped, so the record only loses a step.
PIPELINE_STEPS = (
    "read_model",
    "find_layers",
    "model_fingerprint",
    "run_reference",
    "read_weight",
    "get_allocator",
    "apply_mask",
    "replace_weights",
    "Session",
    "measure_distortion",
    "measure_curves",
    "write_external",
    "save_model",
)
CURVES_STEPS = ("expose_as_inputs", "Session", "downstream", "with_outputs", "infer_types")


def child_phases(method: str, path: Path, output: Path, levels: int) -> None:
    """Run the prune pipeline in-process with its steps wrapped, recording memory."""
    from rdprune_onnx import CalibrationSpec, PruneSettings, curves, job, pipeline, stages

    events: list[dict[str, Any]] = []
    started = time.perf_counter()
    depth = [0]

    def record(label: str) -> None:
        status = proc_status()
        event = {
            "t": round(time.perf_counter() - started, 1),
            "event": "  " * depth[0] + label,
            "rss": status.get("VmRSS", 0),
            "anon": status.get("RssAnon", 0),
            "peak_since_last": status.get("VmHWM", 0),
        }
        events.append(event)
        print("EVENT " + json.dumps(event), flush=True)  # kept if the run is killed
        reset_peak()

    def wrap(module: Any, name: str) -> None:
        original = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            record(f"> {name}")
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
                record(f"< {name}")

        setattr(module, name, wrapper)

    for module, names in (
        (pipeline, PIPELINE_STEPS),
        (job, PIPELINE_STEPS),
        (stages, PIPELINE_STEPS),
        (curves, CURVES_STEPS),
    ):
        for name in names:
            if hasattr(module, name):  # the flow's stages live in pipeline, job and stages
                wrap(module, name)
    reset_peak()
    record("start")
    result = pipeline.prune(
        path,
        PruneSettings(ratio=0.5, method=method, levels=levels, provider="cpu"),
        CalibrationSpec(synthetic=4),
        output=output,
        force=True,
    )
    record("end")
    del result
    for p in (output, output.with_name(output.name + ".data")):
        p.unlink(missing_ok=True)
    _emit({"events": events})


# --- the parent ---------------------------------------------------------------------------


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("rdprune-onnx")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("rdprune-onnx")
    if found:
        return [found]
    return [sys.executable, "-c", "from rdprune_onnx_cli.main import main; main()"]


# The command line with ``load_model(check=True)`` turned off: the checker path of
# rdprune_onnx/graph/load.py calls ``ModelProto.ByteSize()``, which upb refuses over 2 GiB.
_NO_CHECK = (
    "import sys, rdprune_onnx.graph.load as load; load.load_model.__kwdefaults__['check'] = False;"
    " from rdprune_onnx_cli.main import main; main()"
)


def _cases(
    args: argparse.Namespace, model: Path, model_bytes: int
) -> Iterator[tuple[str, list[str], Callable[[], dict[str, Any]] | None, list[str] | None]]:
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--model", str(model), "--workdir", str(args.workdir), "--hidden", str(args.hidden)]
    if "load" in args.cases:
        for kind in ("onnx", "gs", "ir"):
            yield f"load: {kind}", [*me, "--child", f"load-{kind}", *common], None, None
    if "session" in args.cases:
        for kind in ("staged", "ort-path", "add-external", "staged-noprepack"):
            yield f"session: {kind}", [*me, "--child", f"session-{kind}", *common], None, None
    if "prune" in args.cases:
        for method, extra in (("global", []), ("rd", ["--levels", str(args.levels)])):
            if method not in args.methods:
                continue
            out = args.workdir / f"out_{method}.onnx"
            arguments = [
                "prune",
                str(model),
                "--ratio",
                "0.5",
                "--method",
                method,
                *extra,
                "--synthetic",
                "4",
                "-o",
                str(out),
                "--no-cache",
                "--no-progress",
                "--provider",
                "cpu",
            ]

            def check(out: Path = out) -> dict[str, Any]:
                found = check_output(out, model, 0.5)
                for p in (out, out.with_name(out.name + ".data")):
                    p.unlink(missing_ok=True)
                return found

            fallback = [sys.executable, "-c", _NO_CHECK, *arguments]
            yield f"prune: {method}", [*_cli(), *arguments], check, fallback
    if "phases" in args.cases:
        for method in ("global", "rd"):
            yield (
                f"phases: {method}",
                [*me, "--child", f"phases-{method}", *common, "--levels", str(args.levels)],
                None,
                None,
            )


def _print_table(rows: list[dict[str, Any]], model_bytes: int) -> None:
    head = (
        f"{'case':<30}{'rc':>4}{'peak RSS GiB':>14}{'x model':>9}{'anon GiB':>10}"
        f"{'file GiB':>10}{'time s':>9}  notes"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        notes = []
        if row.get("killed_over_limit"):
            notes.append("KILLED above --max-rss")
        if "check" in row:
            c = row["check"]
            notes.append(
                f"data={','.join(c['data_files'])} fresh={c['fresh_data_file']} "
                f"zeros={c['zero_fraction']:.4f} ratio_met={c['ratio_met']}"
            )
        if "input_unchanged" in row:
            notes.append(f"input_unchanged={row['input_unchanged']}")
        child = row.get("child") or {}
        if "run_seconds" in child:
            notes.append(f"create {child['create_seconds']} s, run {child['run_seconds']} s")
        print(
            f"{row['case']:<30}{row['rc']:>4}{gib(row['peak_rss']):>14}"
            f"{row['peak_rss'] / model_bytes:>9.2f}{gib(row['peak_anon_sampled']):>10}"
            f"{gib(row['peak_file_sampled']):>10}{row['seconds']:>9.1f}  {'; '.join(notes)}"
        )


def _print_steps(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        child = row.get("child") or {}
        steps = {k: v for k, v in child.items() if isinstance(v, dict) and "rss" in v}
        if steps:
            print(f"\n{row['case']}: resident memory after each step (GiB)")
            for label, value in steps.items():
                print(
                    f"  {label:<48} rss {gib(value['rss'])}  anon {gib(value['anon'])}"
                    f"  peak {gib(value.get('peak'))}"
                )
        if "events" in child:
            events = child["events"]
            top = max(e["peak_since_last"] for e in events)
            print(f"\n{row['case']}: pipeline steps (GiB; peak = highest RSS since the line above)")
            shown = 0
            for i, e in enumerate(events):
                near_top = e["peak_since_last"] >= 0.9 * top
                if i < 60 or near_top:
                    mark = "  <= peak" if e["peak_since_last"] == top else ""
                    print(
                        f"  {e['t']:>7.1f}s {e['event']:<36} rss {gib(e['rss'])}"
                        f"  anon {gib(e['anon'])}  peak {gib(e['peak_since_last'])}{mark}"
                    )
                    shown += 1
            if shown < len(events):
                print(f"  ({len(events) - shown} more events in the JSON)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated subset")
    parser.add_argument("--methods", default="global,rd", help="prune cases: comma-separated")
    parser.add_argument("--workdir", type=Path, default=None, help="[a new temporary folder]")
    parser.add_argument("--model", type=Path, default=None, help="reuse a generated model")
    parser.add_argument("--keep", action="store_true", help="keep the generated model")
    parser.add_argument(
        "--max-rss-gb", type=float, default=None, help="kill a case above this [80%% of free]"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        kind, _, sub = args.child.partition("-")
        if kind == "load":
            child_load(sub, args.model, args.workdir)
        elif kind == "session":
            child_session(sub, args.model, args.hidden)
        elif kind == "phases":
            child_phases(sub, args.model, args.workdir / f"phases_{sub}.onnx", args.levels)
        return 0

    if not Path("/proc/self/status").exists():
        print("bench_large.py needs Linux (/proc)", file=sys.stderr)
        return 2
    args.cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    args.methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    own_workdir = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-large-")).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    needed = 3.2 * args.layers * args.hidden**2 * 4
    if free < needed:
        print(f"{args.workdir} has {free / GiB:.1f} GiB free; needs {needed / GiB:.1f}")
        return 2
    limit = memory_limit(args.max_rss_gb)
    generated = args.model is None
    model = (args.model or args.workdir / "big.onnx").resolve()
    try:
        if generated:
            t = time.perf_counter()
            generate(model, args.layers, args.hidden)
            print(f"generated {model} in {time.perf_counter() - t:.1f} s")
        files = model_files(model)
        model_bytes = sum(p.stat().st_size for p in files)
        print(
            f"model: {model_bytes / 1e9:.2f} GB ({model_bytes / GiB:.2f} GiB) in {len(files)} files"
        )
        rows = run_cases(args, model, model_bytes, limit, {str(p): sha256(p) for p in files})
        print()
        print(
            f"model {model_bytes / GiB:.2f} GiB ({args.layers} x {args.hidden}^2 float32); "
            f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
            f"limit {limit / GiB:.1f} GiB"
        )
        _print_table(rows, model_bytes)
        _print_steps(rows)
        if args.out is not None:
            write_record(args, model_bytes, rows)
            print(f"\nwrote {args.out}")
    finally:
        if generated and not args.keep:
            for p in model.parent.glob(model.name + "*"):
                p.unlink(missing_ok=True)
        if own_workdir and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


def memory_limit(max_rss_gb: float | None) -> int:
    """Bytes of resident memory a case may reach before it is killed (80% of what is free)."""
    with open("/proc/meminfo") as fh:
        available = next(
            int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:")
        )
    return int((max_rss_gb * GiB) if max_rss_gb else 0.8 * available)


def run_cases(
    args: argparse.Namespace, model: Path, model_bytes: int, limit: int, hashes: dict[str, str]
) -> list[dict[str, Any]]:
    """Every case in its own measured process (one retry without the checker when the first
    attempt fails to serialize); checks, and whether the input files stayed unchanged."""
    rows: list[dict[str, Any]] = []
    for name, command, check, fallback in _cases(args, model, model_bytes):
        attempts = [(name, command)]
        while attempts:
            label, argv = attempts.pop(0)
            print(f"running {label} ...", flush=True)
            log = args.workdir / f"{label.replace(': ', '_').replace(' ', '_')}.log"
            row = {"case": label, **run_measured(argv, limit, log)}
            if check is not None and row["rc"] == 0:
                row["check"] = check()
                row["input_unchanged"] = all(sha256(Path(p)) == h for p, h in hashes.items())
            rows.append(row)
            print(
                f"  rc {row['rc']}, peak {gib(row['peak_rss'])} GiB "
                f"({row['peak_rss'] / model_bytes:.2f}x), {row['seconds']} s",
                flush=True,
            )
            if row["rc"] != 0:
                print(row.get("tail", ""))
                if fallback and "serialize" in row.get("tail", ""):
                    attempts.append((f"{name} (no checker)", fallback))
                    fallback = None
    return rows


def write_record(args: argparse.Namespace, model_bytes: int, rows: list[dict[str, Any]]) -> None:
    """The JSON record of ``--out``: model size, versions, CPU count, every case's row."""
    import onnx
    import onnxruntime as ort
    from benchlib.records import write_text

    record = {
        "model_bytes": model_bytes,
        "layers": args.layers,
        "hidden": args.hidden,
        "versions": {
            "python": platform.python_version(),
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    write_text(args.out, json.dumps(record, indent=1))


if __name__ == "__main__":
    sys.exit(main())
