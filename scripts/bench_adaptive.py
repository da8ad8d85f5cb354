"""Benchmark: the adaptive curve grid against the full grid and two torch loops.

On the models of ``scripts/bench_curves.py`` (a ResNet-18 and a MiniLM-shaped encoder, built
in torch and exported, so both sides compute the same function) and on the shipped digits
CNN (ONNX only, with labels), at ``--levels`` resolution (101 by default), in one process:

(a) PyTorch, the paper authors' loop (bench_curves' ``time_torch``): swap the weight, run
    the whole model, restore;
(e) PyTorch, the fair loop: one dense pass caches the tensor entering each top-level stage
    (ResNet: stem, each residual block, the head; MiniLM: embeddings, each encoder layer,
    pooling); each candidate re-runs only the stages from the layer's own onward. Level 0
    (nothing pruned) is not run, as rdprune-onnx's engine does not run it;
(c) rdprune-onnx, ``--grid full``: every level of every layer;
(f) rdprune-onnx, ``--grid adaptive``: refined for one ratio (what one ``prune`` run
    measures), for each of ``--ratios``, and for all of them at once (``curves``).

(a) and (e) cost the same per point at every level of a layer, so with ``--torch-levels K``
they run K levels spread over the grid for every layer and the per-layer time is scaled to
the full grid (the table marks it). For every ratio the table gives the allocation of the
adaptive grid against the full grid's: layers whose ratio changed and by how much, the
predicted distortion of each (both read on the full curves) and the measured one (the
pruned model run on the calibration data), plus top-1 accuracy on held-out data where the
case has labels. Wall and CPU seconds, with the load average: the machine is shared.

Run with the torch virtualenv and the repository on the path::

    PYTHONPATH=. .venv-torch/bin/python scripts/bench_adaptive.py --out results/bench_adaptive.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_curves import (
    DEFAULTS,
    build_minilm,
    build_resnet,
    cpu_seconds,
    export,
    map_layers,
    say,
    time_torch,
    torch_inputs,
)
from benchlib.records import RESULTS, write_json

from rdprune_onnx.allocate import Allocation, AllocationProblem, Curve, LayerSpec
from rdprune_onnx.allocate.rd import RateDistortionAllocator
from rdprune_onnx.calibration import batches
from rdprune_onnx.curves import Reference, grid, measure_distortion, run_reference
from rdprune_onnx.graph.layers import Layer, find_layers, read_weight
from rdprune_onnx.graph.load import load_model
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.grid import GridResult, measure_grid
from rdprune_onnx.masks import apply_mask, prune_count
from rdprune_onnx.runtime import Session, SessionConfig, versions

MODELS = Path(__file__).resolve().parent.parent / "models"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits,resnet,minilm", help="digits, resnet, minilm")
    p.add_argument("--levels", type=int, default=101)
    p.add_argument("--ratios", default="0.5,0.7,0.9")
    p.add_argument("--ways", default="a,e,c,f", help="a (naive torch), e (fair torch), c, f")
    p.add_argument("--torch-levels", type=int, default=0, help="(a)/(e): levels run, 0 = all")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--texts", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_adaptive.json")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.ways = [w for w in args.ways.split(",") if w]
    return args


# --------------------------------------------------------------------------- torch (e)


@dataclass
class Stages:
    """A torch model as a chain of stages over a state; ``owner`` maps a parameter name to
    the stage that uses it."""

    stages: list[Callable[[Any], Any]]
    owner: Callable[[str], int]
    finish: Callable[[Any], Any]


def resnet_stages(module: Any) -> Stages:
    import torch

    def stem(x: Any) -> Any:
        return module.pool(torch.relu(module.stem(x)))

    def head(x: Any) -> Any:
        return module.fc(torch.flatten(x.mean(dim=(2, 3), keepdim=True), 1))

    blocks = list(module.blocks)

    def owner(name: str) -> int:
        if name.startswith("stem."):
            return 0
        if name.startswith("blocks."):
            return 1 + int(name.split(".")[1])
        return 1 + len(blocks)

    return Stages([stem, *blocks, head], owner, lambda y: y)


def minilm_stages(module: Any) -> Stages:
    import torch
    from torch import nn

    def embed(inputs: Any) -> Any:
        ids, attention = inputs
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = module.norm(module.word(ids) + module.position(positions)[None])
        mask = attention.to(x.dtype)
        bias = (1.0 - mask[:, None, None, :]) * torch.finfo(x.dtype).min
        return (x, bias, mask)

    def layer_stage(layer: Any) -> Callable[[Any], Any]:
        return lambda state: (layer(state[0], state[1]), state[1], state[2])

    def pool(state: Any) -> Any:
        x, _, mask = state
        summed = (x * mask[:, :, None]).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)

    layers = list(module.layers)

    def owner(name: str) -> int:
        return 1 + int(name.split(".")[1]) if name.startswith("layers.") else 0

    return Stages([embed, *(layer_stage(x) for x in layers), pool], owner, lambda y: y)


def fair_torch_loop(
    module: Any, stages: Stages, inputs: list[list[Any]], mapping: Sequence[Any], ratios: np.ndarray
) -> tuple[dict[str, np.ndarray], float]:
    """(e): per layer, the cached input of its stage, then only the stages from there."""
    import torch

    names = {id(p): n for n, p in module.named_parameters()}
    curves: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    with torch.no_grad():
        states: list[list[Any]] = []  # per batch: the state entering each stage
        refs = []
        for x in inputs:
            state: Any = x if len(x) > 1 else x[0]
            if len(x) > 1:
                state = tuple(x)
            entering = []
            for stage in stages.stages:
                entering.append(state)
                state = stage(state)
            states.append(entering)
            refs.append(state.double())
        count = sum(r.numel() for r in refs)
        for entry in mapping:
            first = stages.owner(names[id(entry.parameter)])
            view = entry.parameter.t() if entry.transposed else entry.parameter
            original = view.reshape(-1).clone()
            order = torch.argsort(original.abs(), stable=True)
            values = []
            for ratio in ratios:
                k = prune_count(float(ratio), original.numel())
                if k == 0:
                    values.append(0.0)
                    continue
                pruned = original.clone()
                pruned[order[:k]] = 0
                view.copy_(pruned.view(view.shape))
                total = torch.zeros((), dtype=torch.float64)
                for entering, ref in zip(states, refs, strict=True):
                    state = entering[first]
                    for stage in stages.stages[first:]:
                        state = stage(state)
                    total += (state.double() - ref).square().sum()
                values.append(total.item() / count)
            view.copy_(original.view(view.shape))
            curves[entry.name] = np.array(values)
    return curves, time.perf_counter() - start


# --------------------------------------------------------------------------- helpers


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float, tuple[float, float]]:
    load = os.getloadavg()[0]
    cpu, wall = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall, cpu_seconds() - cpu, (load, os.getloadavg()[0])


def spread(levels: int, count: int) -> np.ndarray:
    if count <= 0 or count >= levels:
        return np.arange(levels)
    return np.unique(np.linspace(1, levels - 1, count).round().astype(int))


def allocate_on(curves: dict[str, Curve], specs: list[LayerSpec], ratio: float) -> Allocation:
    return RateDistortionAllocator().allocate(AllocationProblem(specs, ratio, curves))


def pruned_model(model: onnx.ModelProto, counts: dict[str, int]) -> onnx.ModelProto:
    weights = {n: apply_mask(read_weight(model, n), int(c)) for n, c in counts.items()}
    return replace_weights(model, weights)


def top1(model: onnx.ModelProto, data: dict[str, np.ndarray], labels: np.ndarray) -> float:
    session = Session(model, SessionConfig())
    hits = 0
    for feeds, start in zip(batches(data, 64), range(0, len(labels), 64), strict=False):
        logits = session.run(feeds, session.output_names[:1])[0]
        hits += int((np.argmax(logits, axis=1) == labels[start : start + len(logits)]).sum())
    return hits / len(labels)


@dataclass
class OnnxCase:
    name: str
    model: onnx.ModelProto
    data: dict[str, np.ndarray]
    batch_size: int
    torch: Any = None  # bench_curves.Case when the torch arms apply
    eval_data: dict[str, np.ndarray] | None = None
    eval_labels: np.ndarray | None = None


class Rows:
    """The timing rows of one case, each printed as it is added."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self, way: str, points: int, wall: float, cpu: float, load: Any, note: str = ""
    ) -> None:
        self.rows.append(
            {"way": way, "points": points, "wall_s": wall, "cpu_s": cpu, "load": load, "note": note}
        )
        say(
            f"  {way:<34} {points:>6} pts  wall {wall:8.2f} s  CPU {cpu:8.2f} s  "
            f"load {load[0]:.1f}>{load[1]:.1f} {note}"
        )


def bench(case: OnnxCase, args: argparse.Namespace) -> dict[str, Any]:
    levels = args.levels
    layers: list[Layer] = find_layers(case.model).layers
    specs = [LayerSpec(layer.name, layer.shape) for layer in layers]
    full_points = len(layers) * levels
    config = SessionConfig(intra_op_threads=args.threads)
    reference: Reference = run_reference(case.model, case.data, case.batch_size, config)
    say(f"\n== {case.name}: {len(layers)} layers x {levels} levels = {full_points} points")
    rows = Rows()
    chosen, torch_curves = time_torch_ways(case, args, layers, rows)

    def run_grid(kind: str, targets: Sequence[float]) -> GridResult:
        result: GridResult = measure_grid(
            case.model,
            layers,
            reference,
            specs,
            levels=levels,
            kind=kind,
            targets=targets,
            config=config,
        )
        return result

    full, wall, cpu, load = timed(lambda: run_grid("full", []))
    rows.add("(c) rdprune-onnx, full grid", full.measured, wall, cpu, load)
    torch_check = None
    if torch_curves is not None:
        torch_check = torch_curve_check(torch_curves, full, chosen)
        say(f"  (e) curves vs (c): max relative difference {torch_check:.2e}")
    adaptive: dict[str, GridResult] = {}
    for ratio in args.ratios:
        got, wall, cpu, load = timed(lambda r=ratio: run_grid("adaptive", [r]))  # type: ignore[misc]
        adaptive[f"{ratio:g}"] = got
        note = f"rounds {got.rounds}"
        rows.add(f"(f) adaptive, refined for {ratio:g}", got.measured, wall, cpu, load, note)
    every, wall, cpu, load = timed(lambda: run_grid("adaptive", args.ratios))
    adaptive["all"] = every
    label = f"(f) adaptive, refined for all {len(args.ratios)}"
    rows.add(label, every.measured, wall, cpu, load, f"rounds {every.rounds}")
    worst = adaptive_check(adaptive, full, levels)
    say(f"  adaptive points vs full grid values: max relative difference {worst:.2e}")
    allocations = [
        allocation_entry(case, specs, full, adaptive, ratio, label, config, reference, levels)
        for ratio in args.ratios
        for label in (f"{ratio:g}", "all")
    ]
    return {
        "model": case.name,
        "layers": len(layers),
        "full_points": full_points,
        "timings": rows.rows,
        "curve_check_max_rel": worst,
        "torch_fair_check_max_rel": torch_check,
        "allocations": allocations,
    }


def time_torch_ways(
    case: OnnxCase, args: argparse.Namespace, layers: list[Layer], rows: Rows
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """(a) and (e), on ``--torch-levels`` levels scaled to the whole grid; the levels run, and
    (e)'s curves at them (None when (e) did not run)."""
    levels = args.levels
    fine = grid(levels)
    full_points = len(layers) * levels
    chosen = np.arange(levels)
    torch_curves: dict[str, np.ndarray] | None = None
    if case.torch is None or not {"a", "e"} & set(args.ways):
        return chosen, torch_curves
    mapping = map_layers(case.model, layers, case.torch.module)
    chosen = spread(levels, args.torch_levels)
    # (a) runs every level, (e) every level but 0: scaled from the levels run.
    scale_a = levels / len(chosen) if len(chosen) < levels else 1.0
    scale = (levels - 1) / len(chosen) if len(chosen) < levels else 1.0
    note = f"(scaled from {len(chosen)} levels per layer)" if scale != 1.0 else ""
    if "a" in args.ways:
        _, wall, cpu, load = timed(
            lambda: time_torch(case.torch, mapping, fine[chosen], "cpu", args.threads)
        )
        rows.add("(a) torch, whole model", full_points, wall * scale_a, cpu * scale_a, load, note)
    if "e" in args.ways:
        import torch

        stages = (resnet_stages if "resnet" in case.name else minilm_stages)(case.torch.module)
        inputs = torch_inputs(case.torch, "cpu")
        before = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            (curves_e, _), wall, cpu, load = timed(
                lambda: fair_torch_loop(case.torch.module, stages, inputs, mapping, fine[chosen])
            )
        finally:
            torch.set_num_threads(before)
        torch_curves = curves_e
        label = "(e) torch, cached stage inputs"
        rows.add(label, full_points, wall * scale, cpu * scale, load, note)
    return chosen, torch_curves


def torch_curve_check(
    torch_curves: dict[str, np.ndarray], full: GridResult, chosen: np.ndarray
) -> float:
    """The largest relative difference of (e)'s curves from (c)'s, where (c)'s are not tiny."""
    diffs = []
    for name, values in torch_curves.items():
        want = full.curves[name].distortion[chosen]
        big = np.abs(want) > 1e-6 * max(float(np.max(np.abs(want))), 1e-30)
        if np.any(big):
            diffs.append(float(np.max(np.abs(values[big] - want[big]) / np.abs(want[big]))))
    return max(diffs) if diffs else 0.0


def adaptive_check(adaptive: dict[str, GridResult], full: GridResult, levels: int) -> float:
    """The full grid's values where the adaptive grid measured: the same runs, so the largest
    relative difference should be float noise."""
    worst = 0.0
    for got in adaptive.values():
        for name, curve in got.curves.items():
            index = np.rint(curve.ratios * (levels - 1)).astype(int)
            want = full.curves[name].distortion[index]
            scale_d = max(float(np.max(np.abs(want))), 1e-30)
            worst = max(worst, float(np.max(np.abs(curve.distortion - want))) / scale_d)
    return worst


def allocation_entry(
    case: OnnxCase,
    specs: list[LayerSpec],
    full: GridResult,
    adaptive: dict[str, GridResult],
    ratio: float,
    label: str,
    config: SessionConfig,
    reference: Reference,
    levels: int,
) -> dict[str, Any]:
    """The adaptive grid's allocation at ``ratio`` (refined for ``label``) against the full
    grid's: changed layers, predicted (on the full curves) and measured distortion, top-1."""
    fine = grid(levels)
    want = allocate_on(full.curves, specs, ratio)
    got = allocate_on(adaptive[label].curves, specs, ratio)
    changed = {
        s.name: round((got.counts[s.name] - want.counts[s.name]) / s.size, 4)
        for s in specs
        if got.counts[s.name] != want.counts[s.name]
    }

    def on_full(a: Allocation) -> float:
        return sum(
            float(np.interp(a.counts[s.name] / s.size, fine, full.curves[s.name].distortion))
            for s in specs
        )

    truth = {"full": on_full(want), "adaptive": on_full(got)}
    measured = {
        key: measure_distortion(
            Session(pruned_model(case.model, dict(a.counts)), config), reference, "mse"
        )
        for key, a in (("full", want), ("adaptive", got))
    }
    accuracy = None
    if case.eval_data is not None and case.eval_labels is not None:
        accuracy = {
            key: top1(pruned_model(case.model, dict(a.counts)), case.eval_data, case.eval_labels)
            for key, a in (("full", want), ("adaptive", got))
        }
    acc = f" top-1 {accuracy['full']:.4f}/{accuracy['adaptive']:.4f}" if accuracy else ""
    predicted_x = truth["adaptive"] / truth["full"]
    measured_x = measured["adaptive"] / measured["full"]
    say(
        f"  ratio {ratio:g} (refined for {label}): predicted x{predicted_x:.4f}, "
        f"measured x{measured_x:.4f}{acc}; changed {changed or 'none'}"
    )
    return {
        "ratio": ratio,
        "refined_for": label,
        "points": adaptive[label].measured,
        "changed": changed,
        "predicted": truth,
        "measured": measured,
        "accuracy": accuracy,
    }


def digits_case() -> OnnxCase:
    model = load_model(MODELS / "digits_cnn.onnx")
    calib = dict(np.load(MODELS / "digits_calib.npz"))
    test = dict(np.load(MODELS / "digits_test.npz"))
    labels = test.pop("label")
    return OnnxCase("digits-cnn", model, calib, 64, eval_data=test, eval_labels=labels)


def torch_case(name: str, args: argparse.Namespace, folder: Path) -> OnnxCase:
    ns = argparse.Namespace(**DEFAULTS["cpu"])
    ns.resnet, ns.width, ns.seed = "resnet18", 64, args.seed
    ns.image_size, ns.images, ns.batch_size = args.image_size, args.images, args.batch_size
    ns.text_layers, ns.texts, ns.seq_len = args.text_layers, args.texts, args.seq_len
    ns.text_batch = args.texts
    case = build_resnet(ns, "cpu") if name == "resnet" else build_minilm(ns, "cpu")
    model = export(case, folder, "cpu")
    return OnnxCase(case.description, model, case.data, case.batch_size, torch=case)


def markdown(record: dict[str, Any]) -> str:
    """The tables of a written record, in Markdown."""
    lines = [
        "| model | way | points | wall s | CPU s | CPU / (e) | CPU / (a) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in record["results"]:
        rows = {r["way"][:3]: r for r in result["timings"]}
        fair, naive = rows.get("(e)"), rows.get("(a)")
        for r in result["timings"]:
            vs_e = f"{r['cpu_s'] / fair['cpu_s']:.3f}" if fair else "-"
            vs_a = f"{r['cpu_s'] / naive['cpu_s']:.3f}" if naive else "-"
            scaled = " *" if r["note"].startswith("(scaled") else ""
            lines.append(
                f"| {result['model']} | {r['way']}{scaled} | {r['points']} | {r['wall_s']:.1f} | "
                f"{r['cpu_s']:.1f} | {vs_e} | {vs_a} |"
            )
    lines += [
        "",
        "| model | ratio | refined for | points (of full) | predicted x | measured x | top-1 full"
        " / adaptive | layers whose ratio changed (adaptive - full) |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for result in record["results"]:
        for a in result["allocations"]:
            share = a["points"] / result["full_points"]
            acc = a["accuracy"]
            top1 = f"{acc['full']:.4f} / {acc['adaptive']:.4f}" if acc else "-"
            changed = ", ".join(f"{k} {v:+.4f}" for k, v in a["changed"].items()) or "none"
            lines.append(
                f"| {result['model']} | {a['ratio']:g} | {a['refined_for']} | {a['points']} "
                f"({share:.1%}) | {a['predicted']['adaptive'] / a['predicted']['full']:.4f} | "
                f"{a['measured']['adaptive'] / a['measured']['full']:.4f} | {top1} | {changed} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--markdown":  # tables of an earlier run's JSON
        print(markdown(json.loads(Path(argv[1]).read_text())), end="")
        return 0
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    say(f"load average at start {os.getloadavg()}; {os.cpu_count()} CPUs (shared machine)")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-adaptive-") as folder:
        for name in args.models:
            if name == "digits":
                case = digits_case()
            else:
                import torch

                torch.set_num_threads(args.threads)
                case = torch_case(name, args, Path(folder))
            results.append(bench(case, args))
    record = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": versions(),
        "load_average_end": list(os.getloadavg()),
        "results": results,
    }
    write_json(args.out, record)
    say("\n" + markdown(record))
    say(f"wrote {args.out}; its tables again: {Path(__file__).name} --markdown {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
