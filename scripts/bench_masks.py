"""Benchmark: magnitude vs Wanda masks (dense and sequential statistics).

* digits (default): every (method, mask, mask inputs, ratio) row prunes
  ``models/digits_cnn.onnx`` with :func:`rdprune_onnx.prune` on ``models/digits_calib.npz``
  (256 training images) and scores top-1 accuracy on the 450 held-out images of
  ``models/digits_test.npz``.
* ``--minilm DIR``: all-MiniLM-L6-v2 from ``scripts/export_minilm.py`` (``DIR/minilm.onnx``,
  32 calibration texts of ``calib_small.npz``), scored by recall@1, MRR and the mean cosine
  of the 600 held-out embeddings to the dense model's (``scripts/retrieval.py``). Use
  methods without curves (``uniform,lamp``) unless there is time for MiniLM's rd curves.

rd curves are cached per mask in ``--cache-dir`` (shared by the ratios). Prints a table and
writes JSON (configuration, versions, load average, every row with its timings).

    .venv/bin/python scripts/bench_masks.py --out results/bench_masks.json
    .venv/bin/python scripts/bench_masks.py --minilm models/minilm --methods uniform,lamp \\
        --ratios 0.5,0.7 --out results/bench_masks_minilm.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib.records import RESULTS, version_record, write_json

from rdprune_onnx import CalibrationSpec, PruneResult, PruneSettings, prune
from rdprune_onnx.runtime import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
MASKS = [("magnitude", "dense"), ("wanda", "dense"), ("wanda", "sequential")]


def _digits() -> tuple[Path, Path, dict[str, Any], Callable[[PruneResult], dict[str, float]]]:
    models = ROOT / "models"

    def score(result: PruneResult) -> dict[str, float]:
        assert result.evaluation is not None and result.evaluation.pruned_accuracy is not None
        return {"accuracy": result.evaluation.pruned_accuracy}

    extra = {"eval_data": models / "digits_test.npz", "labels": "label"}
    return models / "digits_cnn.onnx", models / "digits_calib.npz", extra, score


def _minilm(
    folder: Path,
) -> tuple[Path, Path, dict[str, Any], Callable[[PruneResult], dict[str, float]]]:
    import onnx

    sys.path.insert(0, str(ROOT / "scripts"))
    from retrieval import embed, evaluate, load_pairs

    queries, docs = load_pairs(folder)
    dense_session = Session(onnx.load(str(folder / "minilm.onnx")), SessionConfig())
    dense = (embed(dense_session, queries), embed(dense_session, docs))

    def score(result: PruneResult) -> dict[str, float]:
        assert result.model is not None
        found: dict[str, float] = evaluate(
            Session(result.model, SessionConfig()), queries, docs, dense=dense
        )
        return found

    return folder / "minilm.onnx", folder / "calib_small.npz", {}, score


def run_row(
    args: argparse.Namespace,
    method: str,
    mask: str,
    inputs: str,
    ratio: float,
    model: Path,
    calib: Path,
    extra: dict[str, Any],
    score: Callable[[PruneResult], dict[str, float]],
) -> dict[str, Any]:
    """One prune (method, mask and its statistics' inputs, ratio), scored and printed."""
    settings = PruneSettings(
        ratio=ratio,
        method=method,
        metric=args.metric,
        levels=args.levels,
        steps=args.steps if method == "rd" else 1,
        mask=mask,
        mask_inputs=inputs,
        reconstruct=args.reconstruct,
    )
    started = time.perf_counter()
    result = prune(
        model,
        settings,
        CalibrationSpec(data=calib),
        write=False,
        cache_dir=args.cache_dir,
        **extra,
    )
    row = {
        "method": method,
        "mask": mask,
        "mask_inputs": inputs,
        "ratio": ratio,
        "achieved": result.achieved_ratio,
        **score(result),
        "measured_distortion": result.measured_distortion,
        "seconds": time.perf_counter() - started,
        "timings": result.timings,
    }
    scores = "  ".join(
        f"{k} {row[k]:.4f}" for k in ("accuracy", "recall_at_1", "cosine") if k in row
    )
    print(
        f"{method:8s} {mask:9s} {inputs:10s} {ratio:4.2f}  {scores}  "
        f"{args.metric} {row['measured_distortion']:.4g}  "
        f"stats {result.timings.get('mask_statistics', 0.0):.1f} s",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rd,lamp,global,uniform")
    parser.add_argument("--ratios", default="0.8,0.9,0.95")
    parser.add_argument("--metric", default="mse")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--levels", type=int, default=101)
    parser.add_argument(
        "--masks",
        default=",".join(f"{m}:{i}" for m, i in MASKS),
        help="MASK:INPUTS rows, comma-separated.",
    )
    parser.add_argument("--reconstruct", action="store_true", help="Refit after masking.")
    parser.add_argument("--minilm", type=Path, help="Folder of the exported MiniLM model.")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "rdbench"))
    parser.add_argument("--out", default=str(RESULTS / "bench_masks.json"))
    args = parser.parse_args()
    model, calib, extra, score = _minilm(args.minilm) if args.minilm else _digits()
    rows = [
        run_row(args, method, mask, inputs, ratio, model, calib, extra, score)
        for method in args.methods.split(",")
        for mask, inputs in (item.split(":") for item in args.masks.split(","))
        for ratio in (float(r) for r in args.ratios.split(","))
    ]
    record = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "versions": version_record(),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    write_json(Path(args.out), record)


if __name__ == "__main__":
    main()
