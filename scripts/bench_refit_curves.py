"""Refit-aware curves (--refit-curves) against plain curves + --reconstruct.

``digits``: the shipped CNN at several ratios, rd on plain-mask curves + --reconstruct
against rd on refit-aware curves + --reconstruct: test accuracy, predicted vs measured
distortion, curve time (each curve set measured once, in its own cache folder, and reused
across ratios). ``minilm-cost``: the per-layer cost of a refit-aware curve on MiniLM, one
layer of each shape (Hessian pass, and every level's solve), without measuring the curves.
``minilm``: the full comparison on MiniLM (slow: curves on 36 layers).

    .venv/bin/python scripts/bench_refit_curves.py digits --ratios 0.8,0.9,0.95
    .venv/bin/python scripts/bench_refit_curves.py minilm-cost --levels 21
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.curves import grid
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.masks import apply_mask, magnitude_order, prune_count
from rdprune_onnx.pipeline import load_calibration
from rdprune_onnx.reconstruct import RefitCandidates


def _row(result: Any, mode: str, curve_s: float) -> dict[str, Any]:
    ev = result.evaluation
    return {
        "mode": mode,
        "ratio": result.target_ratio,
        "accuracy": None if ev is None else ev.to_dict().get("pruned_accuracy"),
        "evaluation": None if ev is None else ev.to_dict(),
        "predicted": result.predicted_distortion,
        "measured": result.measured_distortion,
        "curves_s": curve_s,
        "timings": result.timings,
        "ratios": {layer.name: round(layer.ratio, 4) for layer in result.layers},
    }


def run_prune(args: argparse.Namespace, model: str, calib: str, **extra: Any) -> list[dict]:
    rows = []
    ratios = [float(r) for r in args.ratios.split(",")]
    curve_sets: dict[str, Any] = {}
    for mode, refit_curves in (("plain curves + reconstruct", False), ("refit curves", True)):
        cache = tempfile.mkdtemp(prefix="refit-bench-")
        curve_s = 0.0
        for ratio in ratios:
            settings = PruneSettings(
                ratio=ratio, levels=args.levels, reconstruct=True, refit_curves=refit_curves
            )
            result = prune(
                model,
                settings,
                CalibrationSpec(data=calib, batch_size=args.batch_size),
                write=False,
                cache_dir=cache,
                **extra,
            )
            curve_s += result.timings.get("curves", 0.0)
            curve_sets[mode] = result.curves
            row = _row(result, mode, result.timings.get("curves", 0.0))
            rows.append(row)
            print(
                f"{mode:28s} {ratio:5.2f} acc={row['accuracy']} pred={row['predicted']:.4g} "
                f"meas={row['measured']:.4g} curves={row['curves_s']:.1f}s "
                f"refit(h/solve)={result.timings.get('curves_refit_hessian', 0):.1f}/"
                f"{result.timings.get('curves_refit_solve', 0):.1f}s "
                f"reconstruct={result.timings.get('reconstruct', 0):.1f}s",
                flush=True,
            )
    # Each allocation scored by both objectives: the sum of its plain and of its refit-aware
    # curve points (which objective ranks the allocations like the measured distortion?).
    for row in rows:
        row["curve_sums"] = {
            mode: sum(
                float(np.interp(r, curves[n].ratios, curves[n].distortion))
                for n, r in row["ratios"].items()
            )
            for mode, curves in curve_sets.items()
        }
        print(
            row["mode"], row["ratio"], "curve sums", row["curve_sums"], "measured", row["measured"]
        )
    return rows


def minilm_cost(args: argparse.Namespace) -> list[dict]:
    model = onnx.load(args.model)
    data, batch = load_calibration(
        model, CalibrationSpec(data=args.data, batch_size=args.batch_size)
    )
    layers = find_layers(model).layers
    seen: set[tuple[int, ...]] = set()
    chosen = []
    for layer in layers:  # the first layer of each shape (Q reads x; K would share its pass)
        if layer.shape not in seen:
            seen.add(layer.shape)
            chosen.append(layer)
    factory = RefitCandidates(model, data, batch_size=batch, solver=args.solver)
    rows = []
    for layer in chosen:
        dense = read_weight(model, layer.name)
        started = time.perf_counter()
        candidates = factory(layer, dense)
        assert candidates is not None
        order = magnitude_order(dense)
        per_level = []
        for ratio in grid(args.levels):
            t = time.perf_counter()
            candidates.make(apply_mask(dense, prune_count(float(ratio), dense.size), order), ratio)
            per_level.append(time.perf_counter() - t)
        cost = factory.costs[layer.name]
        row = {
            "layer": layer.name,
            "shape": list(layer.shape),
            "width": cost.width,
            "rows": cost.rows,
            "hessian_s": cost.hessian_s,
            "solve_s": cost.solve_s,
            "total_s": time.perf_counter() - started,
            "methods": cost.methods,
            "slowest_level_s": max(per_level),
            "per_level_s": [round(t, 3) for t in per_level],
        }
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_level_s"}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["digits", "minilm", "minilm-cost"])
    parser.add_argument("--ratios", default="0.8,0.9,0.95")
    parser.add_argument("--levels", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.what == "digits":
        args.levels = args.levels or 101
        rows = run_prune(
            args,
            "models/digits_cnn.onnx",
            "models/digits_calib.npz",
            eval_data="models/digits_test.npz",
            labels="label",
        )
    elif args.what == "minilm":
        args.levels = args.levels or 21
        rows = run_prune(args, "models/minilm/minilm.onnx", "models/minilm/calib_small.npz")
    else:
        args.levels = args.levels or 21
        args.model, args.data = "models/minilm/minilm.onnx", "models/minilm/calib_small.npz"
        rows = minilm_cost(args)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
