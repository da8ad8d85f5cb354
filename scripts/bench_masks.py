"""Benchmark: magnitude vs Wanda masks (dense and sequential statistics) on the digits CNN.

Every (method, mask, mask inputs, ratio) row prunes ``models/digits_cnn.onnx`` with
:func:`rdprune_onnx.prune` on ``models/digits_calib.npz`` (256 training images) and scores
top-1 accuracy on the 450 held-out images of ``models/digits_test.npz``. rd curves are
cached per mask in ``--cache-dir`` (shared by the ratios). Prints a table and writes JSON
(configuration, versions, every row with its timings).

    .venv/bin/python scripts/bench_masks.py --out /tmp/A/bench_masks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.runtime import versions

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB = ROOT / "models" / "digits_calib.npz"
TEST = ROOT / "models" / "digits_test.npz"
MASKS = [("magnitude", "dense"), ("wanda", "dense"), ("wanda", "sequential")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rd,lamp,global,uniform")
    parser.add_argument("--ratios", default="0.8,0.9,0.95")
    parser.add_argument("--metric", default="mse")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--cache-dir", default="/tmp/A/cache")
    parser.add_argument("--out", default="/tmp/A/bench_masks.json")
    args = parser.parse_args()
    rows = []
    for method in args.methods.split(","):
        for mask, inputs in MASKS:
            for ratio in (float(r) for r in args.ratios.split(",")):
                settings = PruneSettings(
                    ratio=ratio,
                    method=method,
                    metric=args.metric,
                    steps=args.steps if method == "rd" else 1,
                    mask=mask,
                    mask_inputs=inputs,
                )
                started = time.perf_counter()
                result = prune(
                    MODEL,
                    settings,
                    CalibrationSpec(data=CALIB),
                    write=False,
                    eval_data=TEST,
                    labels="label",
                    cache_dir=args.cache_dir,
                )
                assert result.evaluation is not None
                row = {
                    "method": method,
                    "mask": mask,
                    "mask_inputs": inputs,
                    "ratio": ratio,
                    "achieved": result.achieved_ratio,
                    "accuracy": result.evaluation.pruned_accuracy,
                    "measured_distortion": result.measured_distortion,
                    "seconds": time.perf_counter() - started,
                    "timings": result.timings,
                }
                rows.append(row)
                print(
                    f"{method:8s} {mask:9s} {inputs:10s} {ratio:4.2f} "
                    f"acc {row['accuracy']:.4f}  mse {row['measured_distortion']:.3f}",
                    flush=True,
                )
    record = {
        "config": vars(args),
        "versions": versions() | {"python": platform.python_version()},
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
