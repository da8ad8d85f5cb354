"""Allocations on the shipped text-line recognizer, scored by character error rate; and the
additivity check (predicted vs measured distortion of rd) on any model.

``cer``: for each ratio, method (rd with each metric, lamp, global, uniform) and with /
without ``--reconstruct``, what ``rdprune-onnx prune models/recognizer.onnx --ratio R --data
models/recognizer_calib.npz --method M [--metric K] [--reconstruct] --levels L`` writes, scored
by the CER of greedy CTC decoding on ``models/recognizer_test.npz``. rd curves are measured
once per metric (a cache folder) and reused across ratios.

``additivity``: rd's predicted distortion (the sum of the layers' curve values at their
ratios) against the distortion measured on the pruned model, per metric and ratio.

    .venv/bin/python scripts/bench_recognizer.py cer --ratios 0.5,0.7,0.9 --levels 21
    .venv/bin/python scripts/bench_recognizer.py additivity --model models/digits_cnn.onnx \\
        --data models/digits_calib.npz --metrics mse,kl,prob-mse
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rdprune_onnx import CalibrationSpec, PruneSettings, prune

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from recognizer_cer import cer  # noqa: E402 (a sibling script, not a package)

MODEL = ROOT / "models" / "recognizer.onnx"
CALIB = ROOT / "models" / "recognizer_calib.npz"
TEST = ROOT / "models" / "recognizer_test.npz"


def run_cer(args: argparse.Namespace) -> dict[str, Any]:
    ratios = [float(r) for r in args.ratios.split(",")]
    work = Path(tempfile.mkdtemp(prefix="recognizer-bench-", dir=args.scratch))
    rows: list[dict[str, Any]] = []
    dense = cer(MODEL, TEST)
    variants = [("rd", m) for m in args.metrics.split(",")]
    variants += [(m, "mse") for m in ("lamp", "global", "uniform")]
    for method, metric in variants:
        for reconstruct in (False, True):
            for ratio in ratios:
                out = work / f"{method}-{metric}-{int(reconstruct)}-{ratio}.onnx"
                t = time.perf_counter()
                result = prune(
                    MODEL,
                    PruneSettings(
                        ratio=ratio,
                        method=method,
                        metric=metric,
                        levels=args.levels,
                        reconstruct=reconstruct,
                    ),
                    CalibrationSpec(data=str(CALIB)),
                    output=out,
                    force=True,
                    cache_dir=work / f"cache-{metric}",
                )
                seconds = time.perf_counter() - t
                row = {
                    "method": method,
                    "metric": metric if method == "rd" else None,
                    "reconstruct": reconstruct,
                    "ratio": ratio,
                    "achieved_ratio": result.achieved_ratio,
                    "cer": cer(out, TEST),
                    "predicted": result.predicted_distortion,
                    "measured": result.measured_distortion,
                    "seconds": seconds,
                }
                rows.append(row)
                label = f"{method}{f' ({metric})' if method == 'rd' else ''}"
                label += " +refit" if reconstruct else ""
                print(
                    f"{label:<20} {ratio:>4}  CER {row['cer']:.4f}  ({seconds:.0f} s)", flush=True
                )
    return {"dense_cer": dense, "levels": args.levels, "rows": rows}


def run_additivity(args: argparse.Namespace) -> dict[str, Any]:
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as work:
        for metric in args.metrics.split(","):
            for ratio in ratios:
                result = prune(
                    args.model,
                    PruneSettings(ratio=ratio, metric=metric, levels=args.levels),
                    CalibrationSpec(data=args.data),
                    write=False,
                    cache_dir=Path(work) / metric,
                )
                kinds = result.to_dict()["distortion"]["output_kinds"]
                row = {
                    "metric": metric,
                    "ratio": ratio,
                    "predicted": result.predicted_distortion,
                    "measured": result.measured_distortion,
                    "kinds": {n: k["kind"] for n, k in (kinds or {}).items()},
                }
                rows.append(row)
                p, m = row["predicted"] or 0.0, row["measured"] or 0.0
                print(
                    f"{metric:<9} {ratio:>4}  predicted {p:.4g}  measured {m:.4g}  "
                    f"ratio {p / m if m else float('nan'):.2f}  {row['kinds']}",
                    flush=True,
                )
    return {"model": str(args.model), "levels": args.levels, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["cer", "additivity"])
    parser.add_argument("--ratios", default="0.5,0.7,0.9")
    parser.add_argument("--levels", type=int, default=21)
    parser.add_argument("--metrics", default="mse,kl")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--data", default=str(CALIB))
    parser.add_argument("--scratch", default=None, help="folder for pruned models and caches")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = run_cer(args) if args.mode == "cer" else run_additivity(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
