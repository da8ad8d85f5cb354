"""Benchmark: ways of measuring rate-distortion curves, on the same model and data.

For each model (a ResNet-style CNN and a MiniLM-shaped transformer, defined in torch in
``scripts/torch_models.py`` and exported to ONNX so both sides compute the same function),
every prunable layer and every level of the grid, the layer alone is pruned by magnitude and
the whole calibration set is run; the distortion is the mean squared error of the outputs
against the dense model's. Timed, in one run:

(a) PyTorch, the paper authors' loop: the layer's weight is swapped in place with the pruned
    copy (no_grad), the whole model runs, the weight is restored;
(b) ONNX Runtime, a new session per curve point: the model re-serialised with the pruned
    weight baked in (what SparseML did);
(c) rdprune-onnx's engine, ``measure_curves(engine="downstream")`` with its defaults: one
    dense pass keeps the tensors that cross every layer's cut, then per layer one session of
    the graph below the layer (the weight its only new input) serves every level; on the CPU
    two candidates run at once (2 workers x 1 intra-op thread on 2 cores);
(d) the same engine with ``engine="full"`` (whole model per candidate), to show what the
    downstream cut buys.
On CPU it also times (a) and (c) with 1 thread, (c) as one worker on 2 intra-op threads, and
(c) with the layers split over two Python threads or processes of one thread each, to choose
how to use two cores. ``--ways`` picks a subset. (b) costs about the same per point
everywhere, so by default it measures a spread of ``--session-points`` points and
extrapolates to the whole set.

The curves of every way are checked against (d) (or the first ONNX Runtime way timed): the
largest relative difference over the points whose distortion is not tiny is printed, and the
script exits with status 1 when it is above ``--tolerance``. A table is printed (wall seconds,
plus CPU seconds and the load average, since a shared machine makes wall times noisy) and a
JSON record written (``--out``): config, versions, timings, per-layer times, checks, curves.

Run it with the torch virtualenv (the project installed in it)::

    .venv-torch/bin/python scripts/bench_curves.py --out results/bench_curves.json

The CPU defaults (ResNet-18 at 64x64 on 32 images and a 4-layer MiniLM on 8 x 64 tokens, 11
levels) took 7 minutes on a busy shared 2-core machine. ``--markdown RECORD.json`` prints the
tables of a written record again, in Markdown (as in docs/bench_curves.md).

On the GPU machine (ResNet-50 at 224x224 on 256 images, torch on cuda, ORT's CUDA provider;
onnxruntime-gpu installed as /work/shared/gpu/README.md says)::

    PYTHONPATH=/tmp/site:. python3 scripts/bench_curves.py --device cuda

TF32 is off in torch there unless ``--tf32``, so that both sides compute in float32.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from benchlib.records import RESULTS, machine, write_json

from rdprune_onnx.allocate import Curve
from rdprune_onnx.calibration import batches
from rdprune_onnx.curves import (
    Reference,
    grid,
    measure_curves,
    measure_distortion,
    run_reference,
    worker_layout,
)
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.layers import Layer, find_layers, read_weight
from rdprune_onnx.graph.load import load_model
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask, magnitude_order, prune_count
from rdprune_onnx.runtime import Session, SessionConfig, resolve_provider, versions

OPSET = 17
MODELS = ("resnet", "minilm")
# Per-device defaults: small enough for 2 CPU cores in minutes; the paper's setting on a GPU.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {
        "resnet": "resnet18",
        "image_size": 64,
        "images": 32,
        "batch_size": 16,
        "texts": 8,
        "seq_len": 64,
        "text_batch": 8,
        "session_points": 88,  # 0: every point
        "threads": 2,
    },
    "cuda": {
        "resnet": "resnet50",
        "image_size": 224,
        "images": 256,
        "batch_size": 64,
        "texts": 256,
        "seq_len": 128,
        "text_batch": 64,
        "session_points": 40,
        "threads": os.cpu_count() or 1,
    },
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of resnet, minilm")
    p.add_argument("--resnet", choices=("resnet18", "resnet50"), help="ResNet kind")
    p.add_argument("--width", type=int, default=64, help="ResNet stem width (64 = standard)")
    p.add_argument("--image-size", type=int, help="ResNet input height and width")
    p.add_argument("--images", type=int, help="calibration images (standard normal)")
    p.add_argument("--batch-size", type=int, help="images per batch")
    p.add_argument("--text-layers", type=int, default=4, help="transformer layers (<= 6)")
    p.add_argument("--texts", type=int, help="calibration sequences (random tokens)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--text-batch", type=int, help="sequences per batch")
    p.add_argument("--levels", type=int, default=11, help="grid levels from 0 to 1")
    p.add_argument(
        "--session-points",
        type=int,
        help="(b) measures this many points spread over all (layer, level) pairs and "
        "extrapolates; 0 = every point",
    )
    p.add_argument("--threads", type=int, help="torch threads and ORT intra-op threads")
    p.add_argument(
        "--ways",
        help="comma list of the ways to time (a, b, c, d, and on CPU a1, c1, c12, c2t, c2p); "
        "default: all of them (a, b, c, d on cuda)",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 in torch on cuda")
    p.add_argument(
        "--omp-wait-policy",
        choices=("PASSIVE", "ACTIVE", "default"),
        default="PASSIVE",
        help="OMP_WAIT_POLICY for torch's OpenMP threads (set before torch loads, unless the "
        "environment already sets it). PASSIVE by default: with ACTIVE spinning, torch with "
        "2 threads ran 6x slower on a shared, oversubscribed 2-core machine",
    )
    p.add_argument(
        "--tiny",
        type=float,
        default=1e-5,
        help="distortions below this fraction of the dense outputs' mean square are 'tiny' "
        "(float noise) and left out of the relative check",
    )
    p.add_argument("--tolerance", type=float, default=1e-3, help="max relative difference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_curves.json")
    args = p.parse_args(argv)
    _normalise(p, args)
    return args


def _normalise(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Device defaults, comma lists to lists, and the checks of models and ways."""
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {MODELS}")
    if args.ways is None:
        args.ways = "a,b,c,d" if args.device == "cuda" else ",".join(WAYS)
    args.ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in args.ways if w not in WAYS]
    if unknown:
        p.error(f"unknown way(s) {unknown}; choose from {', '.join(WAYS)}")
    if args.device == "cuda" and set(args.ways) - set("abcd"):
        p.error("on cuda only the ways a, b, c, d are timed")
    if not set(args.ways) & {"b", "c", "d", "c1", "c12", "c2t", "c2p"}:
        p.error("--ways needs at least one ONNX Runtime way (b, c, d, ...)")


# --------------------------------------------------------------------------- models


@dataclass
class Case:
    """One benchmark model: the torch module, its calibration data and export settings."""

    name: str
    description: str
    module: Any  # torch.nn.Module
    data: dict[str, np.ndarray]
    batch_size: int
    output: str
    dynamic_axes: dict[str, dict[int, str]]
    config: dict[str, Any] = field(default_factory=dict)


def build_resnet(args: argparse.Namespace, device: str) -> Case:
    import torch
    from torch_models import calibrate_and_fold, resnet

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    shape = (args.images, 3, args.image_size, args.image_size)
    images = rng.standard_normal(shape, dtype=np.float32)
    module = resnet(args.resnet, args.width).to(device)
    calibrate_and_fold(module, torch.from_numpy(images).to(device), args.batch_size, args.seed)
    module.eval()
    config = {
        "kind": args.resnet,
        "width": args.width,
        "image_size": args.image_size,
        "images": args.images,
        "batch_size": args.batch_size,
        "data": "standard normal (the paper's zero-data option); BN statistics from it, folded",
    }
    return Case(
        name=args.resnet,
        description=f"{args.resnet}, {args.images} images {args.image_size}x{args.image_size}",
        module=module,
        data={"images": images},
        batch_size=args.batch_size,
        output="logits",
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        config=config,
    )


def build_minilm(args: argparse.Namespace, device: str) -> Case:
    import torch
    from torch_models import MiniLM

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 1)
    module = MiniLM(layers=args.text_layers).to(device).eval()
    vocab = module.word.num_embeddings
    ids = rng.integers(1000, vocab, size=(args.texts, args.seq_len), dtype=np.int64)
    lengths = rng.integers(args.seq_len // 2, args.seq_len + 1, size=args.texts)
    mask = (np.arange(args.seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = 0  # padding token
    config = {
        "layers": args.text_layers,
        "hidden": 384,
        "heads": 12,
        "intermediate": 1536,
        "texts": args.texts,
        "seq_len": args.seq_len,
        "batch_size": args.text_batch,
        "data": "random token ids, random lengths in [seq_len/2, seq_len]",
    }
    return Case(
        name=f"minilm-{args.text_layers}l",
        description=f"MiniLM-shaped, {args.text_layers} layers, {args.texts} x {args.seq_len}"
        " tokens",
        module=module,
        data={"input_ids": ids, "attention_mask": mask},
        batch_size=args.text_batch,
        output="embedding",
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "embedding": {0: "batch"},
        },
        config=config,
    )


def export(case: Case, folder: Path, device: str) -> onnx.ModelProto:
    """Export the torch module (TorchScript exporter, opset 17, constant folding) and load it."""
    import torch

    path = folder / f"{case.name}.onnx"
    example = tuple(torch.from_numpy(v[: min(2, len(v))]).to(device) for v in case.data.values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            case.module,
            example,
            str(path),
            input_names=list(case.data),
            output_names=[case.output],
            dynamic_axes=case.dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return load_model(path)


@dataclass
class TorchLayer:
    """A prunable ONNX weight and the torch parameter that holds it."""

    name: str  # the ONNX initializer name
    parameter: Any  # torch.nn.Parameter
    transposed: bool  # the ONNX tensor is the parameter transposed (MatMul of a Linear)


def map_layers(model: onnx.ModelProto, layers: Sequence[Layer], module: Any) -> list[TorchLayer]:
    """Match every ONNX layer to its torch parameter: by name, else by identical values."""
    params = dict(module.named_parameters())
    found: list[TorchLayer] = []
    used: set[str] = set()
    for layer in layers:
        weight = read_weight(model, layer.name)
        match: tuple[str, bool] | None = None
        if layer.name in params:
            value = params[layer.name].detach().cpu().numpy()
            if value.shape == weight.shape and np.array_equal(value, weight):
                match = (layer.name, False)
        for pname, param in params.items():
            if match is not None:
                break
            if pname in used or param.dim() != weight.ndim:
                continue
            value = param.detach().cpu().numpy()
            if value.shape == weight.shape and np.array_equal(value, weight):
                match = (pname, False)
            elif (
                value.ndim == 2
                and value.T.shape == weight.shape
                and np.array_equal(value.T, weight)
            ):
                match = (pname, True)
        if match is None:
            raise SystemExit(f"no torch parameter holds the ONNX weight {layer.name!r}")
        used.add(match[0])
        found.append(TorchLayer(layer.name, params[match[0]], match[1]))
    return found


# --------------------------------------------------------------------------- the ways


@dataclass
class Timing:
    """One way's result: curves (NaN where not measured) and seconds."""

    curves: dict[str, np.ndarray]
    seconds: float  # measured wall time
    points: int  # curve points measured in that time
    total_points: int  # points of the whole set of curves
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_s: float = float("nan")  # CPU time of this process and its finished children
    load: tuple[float, float] = (float("nan"), float("nan"))  # 1-min load before, after

    @property
    def per_point(self) -> float:
        return self.seconds / self.points if self.points else float("nan")

    @property
    def total(self) -> float:
        """Seconds for the whole set of curves (extrapolated when only some were measured)."""
        return self.per_point * self.total_points


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def torch_inputs(case: Case, device: str) -> list[list[Any]]:
    import torch

    return [
        [torch.from_numpy(v).to(device) for v in feeds.values()]
        for feeds in batches(case.data, case.batch_size)
    ]


def time_torch(
    case: Case,
    mapping: Sequence[TorchLayer],
    ratios: np.ndarray,
    device: str,
    threads: int | None = None,
) -> Timing:
    """(a) the paper authors' loop: swap the weight in place, run everything, restore."""
    import torch

    inputs = torch_inputs(case, device)
    model = case.module
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _torch_loop(model, inputs, mapping, ratios, device)
    finally:
        torch.set_num_threads(before)


def _torch_loop(
    model: Any,
    inputs: list[list[Any]],
    mapping: Sequence[TorchLayer],
    ratios: np.ndarray,
    device: str,
) -> Timing:
    import torch

    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        refs = [model(*x).double() for x in inputs]
        count = sum(r.numel() for r in refs)
        _sync(device)
        reference_s = time.perf_counter() - start
        curves: dict[str, np.ndarray] = {}
        _sync(device)
        start = time.perf_counter()
        for entry in mapping:
            # Prune in the ONNX layout (the transposed view for MatMul weights) so the mask,
            # ties included, is the one the ONNX side computes.
            view = entry.parameter.t() if entry.transposed else entry.parameter
            original = view.reshape(-1).clone()
            order = torch.argsort(original.abs(), stable=True)
            values = []
            for ratio in ratios:
                pruned = original.clone()
                pruned[order[: prune_count(float(ratio), original.numel())]] = 0
                view.copy_(pruned.view(view.shape))
                total = torch.zeros((), dtype=torch.float64, device=device)
                for x, ref in zip(inputs, refs, strict=True):
                    total += (model(*x).double() - ref).square().sum()
                values.append(total.item() / count)
            view.copy_(original.view(view.shape))
            curves[entry.name] = np.array(values)
        _sync(device)
        seconds = time.perf_counter() - start
    points = len(mapping) * len(ratios)
    return Timing(curves, seconds, points, points, {"reference_s": reference_s})


def time_session_per_point(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    reference: Reference,
    ratios: np.ndarray,
    config: SessionConfig,
    max_points: int,
) -> Timing:
    """(b) a new ONNX Runtime session per point, the pruned weight baked into the model."""
    total_points = len(layers) * len(ratios)
    chosen = set(range(total_points))
    if 0 < max_points < total_points:
        chosen = set(np.linspace(0, total_points - 1, max_points).round().astype(int).tolist())
    curves = {layer.name: np.full(len(ratios), np.nan) for layer in layers}
    build_s = run_s = 0.0
    start = time.perf_counter()
    for i, layer in enumerate(layers):
        todo = [j for j in range(len(ratios)) if i * len(ratios) + j in chosen]
        if not todo:
            continue
        weight = read_weight(model, layer.name)
        order = magnitude_order(weight)
        for j in todo:
            t0 = time.perf_counter()
            pruned = apply_mask(weight, prune_count(float(ratios[j]), weight.size), order)
            session = Session(replace_weights(model, {layer.name: pruned}), config)
            t1 = time.perf_counter()
            curves[layer.name][j] = measure_distortion(session, reference, "mse")
            t2 = time.perf_counter()
            build_s += t1 - t0
            run_s += t2 - t1
    seconds = time.perf_counter() - start
    extra = {"build_s": build_s, "run_s": run_s}
    return Timing(curves, seconds, len(chosen), total_points, extra)


def _as_arrays(curves: dict[str, Curve]) -> dict[str, np.ndarray]:
    return {name: curve.distortion for name, curve in curves.items()}


def time_engine(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    reference: Reference,
    ratios: np.ndarray,
    config: SessionConfig,
    engine: str,
    workers: int | None = None,
) -> Timing:
    """(c)/(d) rdprune-onnx's engine, with the time each layer's curve took."""
    stamps: list[float] = []
    start = time.perf_counter()
    curves = measure_curves(
        model,
        layers,
        reference,
        ratios=ratios,
        config=config,
        engine=engine,
        workers=workers,
        on_curve=lambda _name, _curve: stamps.append(time.perf_counter()),
    )
    seconds = time.perf_counter() - start
    per_layer = np.diff([start, *stamps]).tolist()
    points = len(layers) * len(ratios)
    count, each = worker_layout(config, workers)
    extra = {
        "per_layer_s": dict(zip([layer.name for layer in layers], per_layer, strict=True)),
        "workers": count,
        "intra_op_threads_per_worker": each.intra_op_threads,
    }
    return Timing(_as_arrays(curves), seconds, points, points, extra)


def split_layers(layers: Sequence[Layer], parts: int) -> list[list[Layer]]:
    """Deal layers out in a snake order (0,1,1,0,0,1,...) so that early layers, whose
    downstream graphs are the largest, are spread over the workers evenly."""
    out: list[list[Layer]] = [[] for _ in range(parts)]
    for i, layer in enumerate(layers):
        turn, pos = divmod(i, parts)
        out[pos if turn % 2 == 0 else parts - 1 - pos].append(layer)
    return out


def time_split_threads(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    reference: Reference,
    ratios: np.ndarray,
    provider: str,
    workers: int,
) -> Timing:
    """(c) on ``workers`` Python threads, each with its own sessions of 1 intra-op thread."""
    config = SessionConfig(provider=provider, intra_op_threads=1)
    parts = split_layers(layers, workers)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        futures = [
            pool.submit(
                measure_curves,
                model,
                part,
                reference,
                ratios=ratios,
                config=config,
                engine="downstream",
            )
            for part in parts
        ]
        curves: dict[str, Curve] = {}
        for future in futures:
            curves.update(future.result())
    seconds = time.perf_counter() - start
    points = len(layers) * len(ratios)
    return Timing(_as_arrays(curves), seconds, points, points, {"workers": workers})


def _split_worker(
    model_bytes: bytes,
    names: list[str],
    reference: Reference,
    ratios: np.ndarray,
    provider: str,
) -> tuple[dict[str, np.ndarray], float]:
    """Process body of the process split: measure the curves of ``names`` with 1 thread."""
    start = time.perf_counter()
    model = onnx.load_from_string(model_bytes)
    wanted = set(names)
    layers = [layer for layer in find_layers(model).layers if layer.name in wanted]
    config = SessionConfig(provider=provider, intra_op_threads=1)
    curves = measure_curves(model, layers, reference, ratios=ratios, config=config)
    return _as_arrays(curves), time.perf_counter() - start


def time_split_processes(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    reference: Reference,
    ratios: np.ndarray,
    provider: str,
    workers: int,
) -> Timing:
    """(c) in ``workers`` spawned processes of 1 intra-op thread each (start-up included)."""
    parts = split_layers(layers, workers)
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    blob = model.SerializeToString()
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [
            pool.submit(_split_worker, blob, [x.name for x in part], reference, ratios, provider)
            for part in parts
        ]
        curves: dict[str, np.ndarray] = {}
        inner = []
        for future in futures:
            got, worker_s = future.result()
            curves.update(got)
            inner.append(worker_s)
    seconds = time.perf_counter() - start
    points = len(layers) * len(ratios)
    return Timing(curves, seconds, points, points, {"workers": workers, "worker_s": inner})


# --------------------------------------------------------------------------- checks


def compare(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], floor: float
) -> dict[str, float]:
    """Largest relative difference where ``want`` > floor; largest absolute one elsewhere."""
    rel = 0.0
    small = 0.0
    checked = 0
    for name, target in want.items():
        value = got[name]
        measured = ~np.isnan(value)
        big = measured & (np.abs(target) > floor)
        if np.any(big):
            rel = max(rel, float(np.max(np.abs(value[big] - target[big]) / np.abs(target[big]))))
        rest = measured & ~big
        if np.any(rest):
            small = max(small, float(np.max(np.abs(value[rest] - target[rest]))))
        checked += int(measured.sum())
    return {"max_rel_diff": rel, "max_abs_diff_tiny": small, "points_checked": checked}


# --------------------------------------------------------------------------- one model

WAYS = {
    "a": "(a) torch, weight swapped in place",
    "b": "(b) ORT, new session per point",
    "c": "(c) rdprune downstream",
    "d": "(d) rdprune full model",
    "a1": "(a) torch, 1 thread",
    "c1": "(c) downstream, 1 intra-op thread",
    "c12": "(c) downstream, 1 worker x 2 intra-op threads",
    "c2t": "(c) 2 threads x 1 intra-op, layers split",
    "c2p": "(c) 2 processes x 1 intra-op, layers split",
}


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def say(message: str) -> None:
    print(message, flush=True)


def bench_case(case: Case, args: argparse.Namespace, provider: str) -> dict[str, Any]:
    ratios = grid(args.levels)
    with tempfile.TemporaryDirectory(prefix="bench-curves-") as folder:
        model = export(case, Path(folder), args.device)
    layers = find_layers(model).layers
    points = len(layers) * len(ratios)
    say(f"\n== {case.description}: {len(layers)} layers x {len(ratios)} levels = {points} points")
    params = sum(layer.size for layer in layers)
    say(f"   prunable weights {params:,}; ONNX {model.ByteSize() / 2**20:.1f} MiB")
    config = SessionConfig(provider=provider, intra_op_threads=args.threads)
    start = time.perf_counter()
    reference = run_reference(model, case.data, case.batch_size, config)
    reference_s = time.perf_counter() - start
    timings = time_ways(case, args, provider, model, layers, reference, ratios)
    ratios_out, targets = speed_ratios(timings)
    return {
        "model": case.name,
        "description": case.description,
        "config": case.config,
        "layers": len(layers),
        "levels": len(ratios),
        "points": points,
        "prunable_weights": params,
        "onnx_mib": model.ByteSize() / 2**20,
        "reference_s": {
            "ort": reference_s,
            **{f"torch_{k}": timings[k].extra["reference_s"] for k in ("a", "a1") if k in timings},
        },
        "timings": {
            key: {
                "way": WAYS[key],
                "seconds_measured": t.seconds,
                "points_measured": t.points,
                "per_point_s": t.per_point,
                "total_s": t.total,
                "cpu_s": t.cpu_s,
                "load_before_after": list(t.load),
                **t.extra,
            }
            for key, t in timings.items()
        },
        "ratios": ratios_out,
        "targets": targets,
        "checks": check_ways(timings, reference, args),
        "curves": {key: {n: v.tolist() for n, v in t.curves.items()} for key, t in timings.items()},
        "grid": ratios.tolist(),
    }


def time_ways(
    case: Case,
    args: argparse.Namespace,
    provider: str,
    model: onnx.ModelProto,
    layers: list[Layer],
    reference: Reference,
    ratios: np.ndarray,
) -> dict[str, Timing]:
    """The ways ``--ways`` names, timed in a fixed order (a, c, d, b, then the 1-thread ones)."""
    mapping = map_layers(model, layers, case.module)
    timings: dict[str, Timing] = {}
    threads = args.threads
    config = SessionConfig(provider=provider, intra_op_threads=threads)
    one = SessionConfig(provider=provider, intra_op_threads=1)
    ways: dict[str, Callable[[], Timing]] = {
        "a": lambda: time_torch(case, mapping, ratios, args.device),
        "c": lambda: time_engine(model, layers, reference, ratios, config, "downstream"),
        "d": lambda: time_engine(model, layers, reference, ratios, config, "full"),
        "b": lambda: time_session_per_point(
            model, layers, reference, ratios, config, args.session_points
        ),
        "a1": lambda: time_torch(case, mapping, ratios, args.device, threads=1),
        "c1": lambda: time_engine(model, layers, reference, ratios, one, "downstream"),
        "c12": lambda: time_engine(
            model, layers, reference, ratios, config, "downstream", workers=1
        ),
        "c2t": lambda: time_split_threads(model, layers, reference, ratios, provider, 2),
        "c2p": lambda: time_split_processes(model, layers, reference, ratios, provider, 2),
    }
    for key in ways:
        if key not in args.ways:
            continue
        say(f"   {WAYS[key]} ...")
        load = os.getloadavg()[0]
        cpu = cpu_seconds()
        timing = ways[key]()
        timing.cpu_s = cpu_seconds() - cpu
        timing.load = (load, os.getloadavg()[0])
        timings[key] = timing
        note = "" if timing.points == timing.total_points else f" ({timing.points} points)"
        say(
            f"      {timing.seconds:.2f} s{note}, {timing.per_point * 1e3:.2f} ms/point, "
            f"CPU {timing.cpu_s:.2f} s, load {timing.load[0]:.1f} -> {timing.load[1]:.1f}"
        )
    return timings


def speed_ratios(timings: dict[str, Timing]) -> tuple[dict[str, float], dict[str, bool]]:
    """Whole-grid time ratios between ways, and the speed targets they meet."""
    total = {key: t.total for key, t in timings.items()}
    ratios_out = {
        f"{x}/{y}": total[x] / total[y]
        for x, y in (("c", "a"), ("c", "b"), ("d", "a"), ("d", "b"), ("c", "d"), ("c1", "a1"))
        if x in total and y in total
    }
    targets = {
        name: bool(ratios_out[key] <= limit)
        for name, key, limit in (("c <= 0.3 a", "c/a", 0.3), ("c <= 0.1 b", "c/b", 0.1))
        if key in ratios_out
    }
    return ratios_out, targets


def check_ways(
    timings: dict[str, Timing], reference: Reference, args: argparse.Namespace
) -> dict[str, Any]:
    """Every way's curves against the reference way's (d, else the first ORT way timed)."""
    power = float(np.mean([np.mean(np.square(v[0], dtype=np.float64)) for v in reference.values]))
    floor = args.tiny * power
    base = next(k for k in ("d", "c", "c1", "c12", "b", "c2t", "c2p") if k in timings)
    want = timings[base].curves
    checks = {key: compare(t.curves, want, floor) for key, t in timings.items() if key != base}
    worst = max((c["max_rel_diff"] for c in checks.values()), default=0.0)
    return {
        "reference": base,
        "tiny_floor": floor,
        "output_mean_square": power,
        "tolerance": args.tolerance,
        "max_rel_diff": worst,
        "passed": worst <= args.tolerance,
        "per_way": checks,
    }


# --------------------------------------------------------------------------- report


def markdown(record: dict[str, Any]) -> str:
    """The tables of a JSON record (``--out``) in Markdown, for docs and the README."""
    env = record["versions"]
    lines = [
        f"onnxruntime {env['onnxruntime']}, torch {env['torch']}, {env['cpu_count']} CPUs "
        f"({env['processor']}); load average at the start "
        f"{env['load_average_start'][0]:.1f}.",
        "",
        "| model | points | way | s/point | total s | CPU s |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in record["results"]:
        for t in r["timings"].values():
            mark = "" if t["points_measured"] == r["points"] else "*"
            lines.append(
                f"| {r['model']} | {r['points']} | {t['way']} | {t['per_point_s']:.4f} | "
                f"{t['total_s']:.1f}{mark} | {t['cpu_s']:.1f} |"
            )
    lines += [
        "",
        "| model | (c)/(a) | (c)/(b) | (d)/(a) | (c)/(d) | (c)/(a), 1 thread | (c)/(a) in CPU s "
        "| max rel diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    nan = float("nan")
    for r in record["results"]:
        q = r["ratios"]
        t = r["timings"]
        cpu = t["c"]["cpu_s"] / t["a"]["cpu_s"] if "a" in t and "c" in t else nan
        lines.append(
            f"| {r['model']} | {q.get('c/a', nan):.2f} | {q.get('c/b', nan):.2f} | "
            f"{q.get('d/a', nan):.2f} | {q.get('c/d', nan):.2f} | {q.get('c1/a1', nan):.2f} | "
            f"{cpu:.2f} | {r['checks']['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def print_report(results: Sequence[dict[str, Any]], cpus: int) -> None:
    say("\nSeconds per curve point and for the whole set of curves (wall clock; lower is better)")
    head = (
        f"{'model':<12} {'points':>6} {'way':<44} {'s/point':>8} {'total s':>8} "
        f"{'CPU s':>8} {'load':>9}"
    )
    say(head)
    say("-" * len(head))
    busy = False
    for r in results:
        for t in r["timings"].values():
            mark = "" if t["points_measured"] == r["points"] else "*"
            before, after = t["load_before_after"]
            busy = busy or max(before, after) > 1.5 * cpus
            say(
                f"{r['model']:<12} {r['points']:>6} {t['way']:<44} "
                f"{t['per_point_s']:>8.4f} {t['total_s']:>8.2f}{mark:1} {t['cpu_s']:>7.2f} "
                f"{before:>4.1f}>{after:<4.1f}"
            )
        say("")
    say("* extrapolated from the points measured; load: 1-minute load average before>after")
    if busy:
        say(f"WARNING: the machine was busy (load above 1.5 x {cpus} CPUs): timings are noisy")
    nan = float("nan")
    say("\nRatios of total time, curve check (against (d) when timed), targets")
    head = (
        f"{'model':<12} {'(c)/(a)':>8} {'(c)/(b)':>8} {'(d)/(a)':>8} {'(c)/(d)':>8} "
        f"{'1 thread (c)/(a)':>16} {'max rel diff':>13}  targets"
    )
    say(head)
    say("-" * len(head))
    for r in results:
        q = r["ratios"]
        met = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items())
        say(
            f"{r['model']:<12} {q.get('c/a', nan):>8.3f} {q.get('c/b', nan):>8.3f} "
            f"{q.get('d/a', nan):>8.3f} {q.get('c/d', nan):>8.3f} {q.get('c1/a1', nan):>16.3f} "
            f"{r['checks']['max_rel_diff']:>13.2e}  {met}"
        )


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    host = machine()
    info: dict[str, Any] = {
        "python": host["python"],
        "torch": torch.__version__,
        **versions(),
        "cpu_count": host["cpus"],
        "processor": host["processor"],
        "platform": host["platform"],
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_average_start": list(os.getloadavg()),
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["tf32"] = args.tf32
    return info


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--markdown":  # tables of an earlier run's JSON
        print(markdown(json.loads(Path(argv[1]).read_text())), end="")
        return 0
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # for torch_models
    if args.omp_wait_policy != "default" and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    import torch

    torch.set_num_threads(args.threads)
    provider = "cpu"
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        try:  # let ORT find the CUDA/cuDNN libraries that torch ships
            import onnxruntime

            if hasattr(onnxruntime, "preload_dlls"):
                onnxruntime.preload_dlls()
        except Exception as exc:
            say(f"onnxruntime.preload_dlls() failed: {exc}")
        try:
            provider = resolve_provider("cuda")
        except UserError as exc:
            raise SystemExit(f"--device cuda: {exc}") from None
    env = environment(args)
    say(
        f"torch {env['torch']} ({env['torch_threads']} threads), onnxruntime "
        f"{env['onnxruntime']}, {env['cpu_count']} CPUs, device {args.device}"
    )
    builders = {"resnet": build_resnet, "minilm": build_minilm}
    results = []
    for name in args.models:
        case = builders[name](args, args.device)
        results.append(bench_case(case, args, provider))
    print_report(results, os.cpu_count() or 1)
    record = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": env,
        "results": results,
    }
    write_json(args.out, record)
    say("\n" + markdown(record))
    say(f"wrote {args.out}; its tables again: {Path(__file__).name} --markdown {args.out}")
    failed = [r["model"] for r in results if not r["checks"]["passed"]]
    if failed:
        say(f"\nFAILED: curves differ by more than {args.tolerance:g} (relative) for {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
