"""Cost of each mask and refit, beside plain magnitude curves, in one run (issue #11).

For every model, the same rd prune (same ratio, grid, calibration data, CPU provider, no
curve cache) is run once per pipeline, in one process, one after the other:

* ``magnitude``                  plain magnitude curves (the anchor)
* ``wanda``                      input statistics + curves with the Wanda mask at every point
* ``magnitude + refit``          plain curves, then the sequential refit (``--reconstruct``)
* ``sparsegpt``                  plain curves, then the SparseGPT selection + refit
* ``magnitude + refit curves``   every point pruned and refit (``--refit-curves``)
* ``sparsegpt + refit curves``   every point selected by SparseGPT and refit

and the stages' times (``PruneResult.timings``: curves, mask statistics, refit) are printed
as ratios to the anchor's curve time, with the number of curve points measured (the adaptive
grid measures what the allocation needs, so the per-point cost is given too). Absolute times
depend on the machine and its load; the ratios are the result. The load average is recorded.

    .venv/bin/python scripts/bench_mask_cost.py --models digits,recognizer \\
        --out results/bench_mask_cost.json --markdown results/bench_mask_cost.md
    .venv/bin/python scripts/bench_mask_cost.py --models minilm --minilm models/minilm ...
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.runtime import versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.records import write_json, write_text

ROOT = Path(__file__).resolve().parent.parent

# label: (mask, reconstruct, refit_curves)
PIPELINES: dict[str, tuple[str, bool, bool]] = {
    "magnitude": ("magnitude", False, False),
    "wanda": ("wanda", False, False),
    "magnitude + refit": ("magnitude", True, False),
    "sparsegpt": ("sparsegpt", True, False),
    "magnitude + refit curves": ("magnitude", True, True),
    "sparsegpt + refit curves": ("sparsegpt", True, True),
}


def model_files(name: str, minilm: Path) -> tuple[Path, Path, int]:
    """(model, calibration data, levels) of a benchmark model."""
    if name == "digits":
        return ROOT / "models/digits_cnn.onnx", ROOT / "models/digits_calib.npz", 101
    if name == "recognizer":
        return ROOT / "models/recognizer.onnx", ROOT / "models/recognizer_calib.npz", 51
    if name == "minilm":
        return minilm / "minilm.onnx", minilm / "calib_small.npz", 21
    raise SystemExit(f"unknown model {name!r}: choose digits, recognizer or minilm")


def run(
    model: Path, calib: Path, levels: int, ratio: float, pipeline: str, repeat: int
) -> dict[str, Any]:
    """The median of ``repeat`` runs, stage by stage (the first run also warms caches)."""
    runs = [run_once(model, calib, levels, ratio, pipeline) for _ in range(repeat)]
    stages = sorted({k for r in runs for k in r["timings"]})
    out = dict(runs[0])
    out["timings"] = {k: float(np.median([r["timings"].get(k, 0.0) for r in runs])) for k in stages}
    out["wall_s"] = float(np.median([r["wall_s"] for r in runs]))
    out["runs"] = [r["timings"] for r in runs]
    return out


def run_once(model: Path, calib: Path, levels: int, ratio: float, pipeline: str) -> dict[str, Any]:
    mask, refit, refit_curves = PIPELINES[pipeline]
    settings = PruneSettings(
        ratio=ratio,
        levels=levels,
        provider="cpu",
        mask=mask,
        reconstruct=refit,
        refit_curves=refit_curves,
    )
    t = time.perf_counter()
    result = prune(model, settings, CalibrationSpec(data=calib), write=False, cache_dir=None)
    wall = time.perf_counter() - t
    points = (result.curve_points or {}).get("curve_points_measured")
    return {
        "pipeline": pipeline,
        "wall_s": wall,
        "timings": result.timings,
        "points": points,
        "measured_distortion": result.measured_distortion,
    }


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    anchor = next(r for r in rows if r["pipeline"] == "magnitude")
    base = anchor["timings"].get("curves", 0.0)
    per_point = base / anchor["points"] if anchor["points"] else None
    lines = [
        "| pipeline | curves | points | per point | mask statistics | refit | total |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["timings"]
        curves = t.get("curves", 0.0)
        pp = curves / r["points"] if r["points"] else None
        cells = [
            f"{curves:.1f} s ({curves / base:.2f}x)",
            str(r["points"]),
            f"{pp / per_point:.2f}x" if pp and per_point else "-",
            f"{t.get('mask_statistics', 0.0):.1f} s",
            f"{t.get('reconstruct', 0.0):.1f} s ({t.get('reconstruct', 0.0) / base:.2f}x)",
            f"{t.get('total', r['wall_s']):.1f} s ({t.get('total', r['wall_s']) / base:.2f}x)",
        ]
        lines.append(f"| {r['pipeline']} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits,recognizer")
    p.add_argument("--pipelines", default=",".join(PIPELINES))
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--repeat", type=int, default=3, help="runs per pipeline (median)")
    p.add_argument("--minilm", type=Path, default=ROOT / "models/minilm")
    p.add_argument("--out", type=Path, default=ROOT / "results/bench_mask_cost.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "results/bench_mask_cost.md")
    args = p.parse_args(argv)
    record: dict[str, Any] = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "versions": versions() | {"python": platform.python_version()},
        "load_before": os.getloadavg(),
        "models": {},
    }
    lines: list[str] = []
    for name in args.models.split(","):
        model, calib, levels = model_files(name, args.minilm)
        rows = []
        for pipeline in args.pipelines.split(","):
            rows.append(run(model, calib, levels, args.ratio, pipeline, args.repeat))
            print(f"{name} {pipeline}: {rows[-1]['timings']}", flush=True)
        record["models"][name] = {"levels": levels, "rows": rows}
        lines += [
            f"## {name} (rd at {args.ratio}, {levels} levels, adaptive grid, "
            f"median of {args.repeat})",
            "",
        ]
        lines += [*table(rows), ""]
    record["load_after"] = os.getloadavg()
    lines.append(
        f"load average before / after: {record['load_before'][0]:.2f} / "
        f"{record['load_after'][0]:.2f}"
    )
    write_json(args.out, record)
    write_text(args.markdown, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
