"""Benchmark the rate-distortion allocation DP on realistic layer sizes.

Cases (synthetic curves, 101 levels s = k/100, seeded):

* ``resnet50``: the 54 conv/fc weight tensors of ResNet-50 (written out below), parameter
  budget, targets 0.2 / 0.5 / 0.8; plus ``resnet50-flops`` (MACs per weight as unit cost, 224x224
  input) at 0.5, which exercises the exact-count repair with unequal costs;
* ``llm7b``: a 7-billion-weight transformer, 32 blocks x (q, k, v, o 4096x4096; gate, up
  11008x4096; down 4096x11008) = 224 linear layers, target 0.5.

For each, it times :func:`solve_mckp` (plan + DP) and the whole ``rd`` allocator (options, DP,
Lagrangian bound, exact-count repair), and measures peak memory: the tracemalloc peak (numpy
reports its buffers to tracemalloc) and the process's ru_maxrss, each case in a fresh process.

It also runs the authors' per-weight formulation (one DP cell per kept weight: a table of L x
(kept weights + 1) float64 values plus uint8 choices) on a copy of ResNet-50 with every layer
1000x smaller, checks that its optimum equals ours there, and extrapolates its table to full size.

Run: ``.venv/bin/python scripts/bench_dp.py [--out results/bench_dp.json] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from benchlib.records import RESULTS, machine, write_json

from rdprune_onnx.allocate.base import Allocation, AllocationProblem, Curve, FloatArray, LayerSpec
from rdprune_onnx.allocate.dp import (
    DEFAULT_MAX_UNITS,
    DEFAULT_MAX_WORK,
    DEFAULT_TOLERANCE,
    DPResult,
    IntArray,
    solve_mckp,
)
from rdprune_onnx.allocate.rd import RateDistortionAllocator, build_options

LEVELS = 101
SEED = 20231001
SCALE_DOWN = 1000
PER_WEIGHT_BYTES_PER_CELL = 8 + 1  # float64 value + uint8 choice


# ----------------------------------------------------------------------------------------------
# Layer shapes


def resnet50_layers() -> list[tuple[str, tuple[int, ...], int]]:
    """(name, weight shape, MACs per weight at 224x224) for the 54 ResNet-50 conv/fc weights.

    torchvision layout (stride on the 3x3 conv): conv1 64x3x7x7 at 112x112; stages of 3, 4, 6, 3
    bottleneck blocks with widths 64, 128, 256, 512 (output 4x width) at 56, 28, 14, 7; the
    first block of each stage has a 1x1 downsample conv; fc 1000x2048.
    """
    layers: list[tuple[str, tuple[int, ...], int]] = [("conv1", (64, 3, 7, 7), 112 * 112)]
    in_ch = 64
    in_hw = 56
    for stage, (width, blocks, out_hw) in enumerate(
        [(64, 3, 56), (128, 4, 28), (256, 6, 14), (512, 3, 7)], start=1
    ):
        out_ch = 4 * width
        for b in range(blocks):
            cin = in_ch if b == 0 else out_ch
            hw1 = in_hw if b == 0 else out_hw  # 1x1 reduce runs at the block's input size
            p = f"layer{stage}.{b}"
            layers.append((f"{p}.conv1", (width, cin, 1, 1), hw1 * hw1))
            layers.append((f"{p}.conv2", (width, width, 3, 3), out_hw * out_hw))
            layers.append((f"{p}.conv3", (out_ch, width, 1, 1), out_hw * out_hw))
            if b == 0:
                layers.append((f"{p}.downsample", (out_ch, cin, 1, 1), out_hw * out_hw))
        in_ch, in_hw = out_ch, out_hw
    layers.append(("fc", (1000, 2048), 1))
    return layers


def llm7b_layers() -> list[tuple[str, tuple[int, ...], int]]:
    d, ff = 4096, 11008
    layers: list[tuple[str, tuple[int, ...], int]] = []
    for blk in range(32):
        p = f"blocks.{blk}"
        for name in ("q", "k", "v", "o"):
            layers.append((f"{p}.attn.{name}", (d, d), 1))
        layers.append((f"{p}.mlp.gate", (ff, d), 1))
        layers.append((f"{p}.mlp.up", (ff, d), 1))
        layers.append((f"{p}.mlp.down", (d, ff), 1))
    return layers


# ----------------------------------------------------------------------------------------------
# Synthetic curves


def synthetic_curve(rng: np.random.Generator, name: str) -> Curve:
    """Convex-ish exponential growth with multiplicative noise and non-monotone low-ratio wiggles.

    d(0) = 0; the layer's sensitivity spans three decades; whole-layer removal (s = 1) is far
    worse than s = 0.99.
    """
    s = np.linspace(0.0, 1.0, LEVELS)
    sens = 10 ** rng.uniform(-4.0, -1.0)
    growth = rng.uniform(4.0, 12.0)
    d = sens * np.expm1(growth * s) / np.expm1(growth)
    d = d * (1.0 + 0.03 * rng.standard_normal(LEVELS))
    wiggle = sens * 2e-3 * np.abs(rng.standard_normal(LEVELS)) * (s < 0.3)
    d = np.abs(d + wiggle)
    d[0] = 0.0
    d[-1] = max(d[-1], 10.0 * d[-2])
    return Curve(name, s, d.astype(np.float64))


def make_problem(
    case: str, target: float, *, scale_down: int = 1, flops: bool = False
) -> AllocationProblem:
    rng = np.random.default_rng(SEED)
    spec = resnet50_layers() if case.startswith("resnet50") else llm7b_layers()
    layers: list[LayerSpec] = []
    curves: dict[str, Curve] = {}
    for name, shape, macs in spec:
        if scale_down > 1:
            size = max(1, round(math.prod(shape) / scale_down))
            shape = (size,)
        layers.append(LayerSpec(name, shape, unit_cost=macs if flops else 1))
        curves[name] = synthetic_curve(rng, name)
    return AllocationProblem(layers, target, curves)


def dp_inputs(problem: AllocationProblem) -> tuple[list[IntArray], list[FloatArray], int, int]:
    assert problem.curves is not None
    opts = [
        build_options(la, problem.curves[la.name], allow_layer_removal=False)
        for la in problem.layers
    ]
    removed = [o.counts * o.unit_cost for o in opts]
    values = [o.values for o in opts]
    return removed, values, problem.required_cost, problem.total_cost


# ----------------------------------------------------------------------------------------------
# The authors' per-weight formulation


def per_weight_dp(
    sizes: Sequence[int], removed: Sequence[IntArray], values: Sequence[FloatArray], kept: int
) -> tuple[float, list[int], int]:
    """Exact DP whose state is the number of kept weights, 0..kept: one cell per kept weight.

    Keeps the full (L + 1) x (kept + 1) float64 value table and an L x (kept + 1) uint8 choice
    table, as a per-weight implementation does. Returns (optimum, choices, table bytes).
    """
    n_layers = len(sizes)
    table = np.full((n_layers + 1, kept + 1), np.inf)
    choice = np.zeros((n_layers, kept + 1), dtype=np.uint8)
    table[0, 0] = 0.0
    for li in range(n_layers):
        keep_g = sizes[li] - removed[li]
        prev, cur = table[li], table[li + 1]
        for g in range(keep_g.size):
            kg = int(keep_g[g])
            if kg > kept:
                continue
            cand = prev[: kept + 1 - kg] + values[li][g]
            better = cand < cur[kg:]
            cur[kg:][better] = cand[better]
            choice[li, kg:][better] = g
    t = int(np.argmin(table[n_layers]))
    best = float(table[n_layers, t])
    picks: list[int] = []
    for li in range(n_layers - 1, -1, -1):
        g = int(choice[li, t])
        picks.append(g)
        t -= int(sizes[li] - removed[li][g])
    picks.reverse()
    return best, picks, int(table.nbytes + choice.nbytes)


# ----------------------------------------------------------------------------------------------
# Measurement


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _timed(fn: Callable[[], object], repeat: int) -> tuple[list[float], object]:
    times: list[float] = []
    out: object = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _traced_peak_mb(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2**20


def run_case(case: str, target: float, repeat: int) -> dict[str, Any]:
    rss_start = _maxrss_mb()
    problem = make_problem(case, target, flops=case.endswith("-flops"))
    removed, values, required, total = dp_inputs(problem)
    rss_inputs = _maxrss_mb()

    def dp() -> object:
        return solve_mckp(removed, values, required, total=total)

    def alloc() -> object:
        return RateDistortionAllocator().allocate(problem)

    dp_times, res_obj = _timed(dp, repeat)
    alloc_times, alloc_obj = _timed(alloc, repeat)
    assert isinstance(res_obj, DPResult) and isinstance(alloc_obj, Allocation)
    res, allocation = res_obj, alloc_obj
    dp_peak = _traced_peak_mb(dp)
    alloc_peak = _traced_peak_mb(alloc)
    rss_end = _maxrss_mb()
    info = res.info
    ainfo = allocation.info
    return {
        "case": case,
        "target": target,
        "layers": len(problem.layers),
        "total_cost": total,
        "required_cost": required,
        "unit_size": res.unit_size,
        "units": res.units,
        "states": info["states"],
        "work": info["work"],
        "full_work": info["full_work"],
        "pointer_bytes": info["pointer_bytes"],
        "max_overshoot_ratio": info["max_overshoot_ratio"],
        "tolerance_met": info["tolerance_met"],
        "plan_s_last": info["plan_s"],
        "dp_only_s_last": info["dp_s"],
        "dp_s": dp_times,
        "dp_s_median": statistics.median(dp_times),
        "alloc_s": alloc_times,
        "alloc_s_median": statistics.median(alloc_times),
        "dp_tracemalloc_peak_mb": dp_peak,
        "alloc_tracemalloc_peak_mb": alloc_peak,
        "maxrss_start_mb": rss_start,
        "maxrss_after_inputs_mb": rss_inputs,
        "maxrss_end_mb": rss_end,
        "dp_objective": res.objective,
        "objective": ainfo["objective"],
        "lower_bound": ainfo["lower_bound"],
        "gap": ainfo["gap"],
        "removed_cost": ainfo["removed_cost"],
        "excess_cost": ainfo["excess_cost"],
        "achieved_ratio": ainfo["achieved_ratio"],
        "notes": info["notes"],
    }


def run_per_weight(target: float) -> dict[str, Any]:
    rss_start = _maxrss_mb()
    problem = make_problem("resnet50", target, scale_down=SCALE_DOWN)
    removed, values, required, total = dp_inputs(problem)
    sizes = [la.size for la in problem.layers]
    kept = total - required
    t0 = time.perf_counter()
    ours = solve_mckp(removed, values, required, total=total)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs, picks, table_bytes = per_weight_dp(sizes, removed, values, kept)
    t_theirs = time.perf_counter() - t0
    peak = _traced_peak_mb(lambda: per_weight_dp(sizes, removed, values, kept))
    theirs_removed = sum(int(r[g]) for r, g in zip(removed, picks, strict=True))
    full = make_problem("resnet50", target)
    full_kept = full.total_cost - full.required_cost
    full_cells = len(full.layers) * (full_kept + 1)
    cells = len(sizes) * (kept + 1)
    return {
        "case": f"resnet50/{SCALE_DOWN}",
        "target": target,
        "total": total,
        "kept": kept,
        "cells": cells,
        "table_bytes": table_bytes,
        "per_weight_s": t_theirs,
        "per_weight_tracemalloc_peak_mb": peak,
        "ours_s": t_ours,
        "ours_unit_size": ours.unit_size,
        "ours_objective": ours.objective,
        "per_weight_objective": theirs,
        "per_weight_removed": theirs_removed,
        "abs_diff": abs(ours.objective - theirs),
        "match": bool(math.isclose(ours.objective, theirs, rel_tol=1e-9, abs_tol=1e-12)),
        "full_kept": full_kept,
        "full_cells": full_cells,
        "full_bytes_extrapolated": full_cells * PER_WEIGHT_BYTES_PER_CELL,
        "full_s_extrapolated": t_theirs * full_cells / cells,
        "maxrss_start_mb": rss_start,
        "maxrss_end_mb": _maxrss_mb(),
    }


def _in_subprocess(kind: str, case: str, target: float, repeat: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        kind,
        case,
        repr(target),
        "--repeat",
        str(repeat),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "bench_dp.json"), help="JSON output path")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per case")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "CASE", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        kind, case, target = args.one
        if kind == "case":
            result = run_case(case, float(target), args.repeat)
        else:
            result = run_per_weight(float(target))
        print(json.dumps(result))
        return 0

    cases = [("resnet50", t) for t in (0.2, 0.5, 0.8)] + [("resnet50-flops", 0.5), ("llm7b", 0.5)]
    results = []
    for case, target in cases:
        repeat = args.repeat if case != "llm7b" else max(1, min(args.repeat, 3))
        results.append(_in_subprocess("case", case, target, repeat))
    per_weight = [_in_subprocess("per-weight", "resnet50", t, 1) for t in (0.2, 0.5, 0.8)]
    print_cases(results)
    print()
    print_per_weight(per_weight)
    write_json(Path(args.out), record(args.repeat, results, per_weight), indent=2)
    print(f"\nwrote {args.out}")
    ok = all(p["match"] for p in per_weight)
    return 0 if ok else 1


def print_cases(results: list[dict[str, Any]]) -> None:
    """The table of the DP cases (one line per case and target)."""
    host = machine()
    print(
        f"rd DP benchmark: {LEVELS} levels, seed {SEED}, python {host['python']}, "
        f"numpy {np.__version__}, {host['cpus']} CPUs ({host['processor']})"
    )
    header = (
        f"{'case':<15}{'L':>4}{'target':>7}{'unit':>6}{'U':>9}{'states':>10}{'work':>11}"
        f"{'DP s':>8}{'rd s':>8}{'DP MB':>8}{'rd MB':>8}{'rss MB':>8}"
        f"{'gap/obj':>9}{'ovr bound':>10}{'excess':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        gap_rel = r["gap"] / r["dp_objective"] if r["dp_objective"] else 0.0
        print(
            f"{r['case']:<15}{r['layers']:>4}{r['target']:>7.2f}{r['unit_size']:>6}"
            f"{r['units']:>9}{r['states']:>10}{r['work']:>11.3g}"
            f"{r['dp_s_median']:>8.3f}{r['alloc_s_median']:>8.3f}"
            f"{r['dp_tracemalloc_peak_mb']:>8.1f}{r['alloc_tracemalloc_peak_mb']:>8.1f}"
            f"{r['maxrss_end_mb']:>8.0f}{gap_rel:>9.1e}{r['max_overshoot_ratio']:>10.1e}"
            f"{r['excess_cost']:>7}"
        )
    print(
        "DP s / rd s: median wall time of solve_mckp / the whole rd allocator; DP MB / rd MB: "
        "tracemalloc peak; rss MB: ru_maxrss of the case's process (baseline after imports "
        f"{statistics.median(r['maxrss_start_mb'] for r in results):.0f} MB); gap/obj: "
        "(DP optimum - Lagrangian bound) / optimum; ovr bound: worst-case flooring shift of the "
        "target as a ratio; excess: removed - required budget units after the repair."
    )


def print_per_weight(per_weight: list[dict[str, Any]]) -> None:
    """The table of the authors' per-weight DP on the scaled-down ResNet-50."""
    header2 = (
        f"{'per-weight DP':<16}{'target':>7}{'kept':>8}{'cells':>11}{'s':>8}{'MB':>8}"
        f"{'ours obj':>13}{'per-weight obj':>16}{'match':>6}"
        f"{'full cells':>12}{'full GB':>9}{'full s':>9}"
    )
    print(header2)
    print("-" * len(header2))
    for p in per_weight:
        print(
            f"{p['case']:<16}{p['target']:>7.2f}{p['kept']:>8}{p['cells']:>11}"
            f"{p['per_weight_s']:>8.3f}{p['per_weight_tracemalloc_peak_mb']:>8.1f}"
            f"{p['ours_objective']:>13.6g}{p['per_weight_objective']:>16.6g}"
            f"{'yes' if p['match'] else 'NO':>6}"
            f"{p['full_cells']:>12.3g}{p['full_bytes_extrapolated'] / 1e9:>9.1f}"
            f"{p['full_s_extrapolated']:>9.0f}"
        )
    print(
        f"per-weight: (L+1) x (kept+1) float64 + L x (kept+1) uint8 table on ResNet-50 with layers "
        f"{SCALE_DOWN}x smaller; full GB / full s extrapolate cells x "
        f"{PER_WEIGHT_BYTES_PER_CELL} bytes and time linearly in cells to full size."
    )


def record(
    repeat: int, results: list[dict[str, Any]], per_weight: list[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON record: configuration, versions, every case and the per-weight runs."""
    host = machine()
    payload = {
        "config": {
            "levels": LEVELS,
            "seed": SEED,
            "scale_down": SCALE_DOWN,
            "repeat": repeat,
            "max_units": DEFAULT_MAX_UNITS,
            "max_work": DEFAULT_MAX_WORK,
            "tolerance": DEFAULT_TOLERANCE,
            "per_weight_bytes_per_cell": PER_WEIGHT_BYTES_PER_CELL,
        },
        "versions": {
            "python": host["python"],
            "numpy": np.__version__,
            "platform": host["platform"],
            "cpus": host["cpus"],
        },
        "cases": results,
        "per_weight": per_weight,
    }
    return payload


if __name__ == "__main__":
    raise SystemExit(main())
