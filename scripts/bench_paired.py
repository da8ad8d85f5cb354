"""Paired noise of a benchmark comparison: is rd's margin over another allocation more than
the sampling noise of the held-out items?

``bench_pipelines.py`` scores a pruned MiniLM by recall@1 on 300 (query, document) pairs and
by the mean cosine of its 600 held-out embeddings to the dense model's, and the digits CNN by
its accuracy on 450 held-out images. These are means over held-out items, and two rows are
scored on the SAME items, so the noise of their difference is that of a paired comparison:
this script prunes the given rows again (through :func:`rdprune_onnx.prune`, the call the
benchmark makes, with its settings), keeps the per-item outcomes, and gives for every pair of
rows the items only one of them gets right and a 95% paired-bootstrap interval (2,000
resamples, seed 0) of the difference of each score. The second score is the per-text cosine
to the dense embedding (MiniLM) or minus the per-image squared error of the logits to the
dense model's (digits). A margin whose interval holds 0 is within the noise of the items.

Rows: ``METHOD[+rc]:MASK[+refit]`` (``+rc``: refit-aware curves, rd only), e.g.
``rd:sparsegpt``, ``rd+rc:sparsegpt``, ``lamp:magnitude+refit``.

    .venv/bin/python scripts/bench_paired.py --model minilm --minilm models/minilm --ratio 0.8 \\
        --rows rd+rc:sparsegpt,rd:sparsegpt,lamp:sparsegpt,uniform:sparsegpt \\
        --refit-inputs dense --out results/bench_paired_minilm_0.8.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rdprune_onnx import CalibrationSpec, prune
from rdprune_onnx.graph.load import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipelines as bp
import retrieval
from benchlib.records import RESULTS, write_json
from benchlib.scoring import cpu_session, run_batched


def parse_row(spec: str) -> bp.Row:
    """``METHOD[+rc]:MASK[+refit]`` -> the benchmark's row."""
    method, _, mask = spec.partition(":")
    refit = mask.endswith("+refit")
    mask = mask.removesuffix("+refit")
    curves = method.endswith("+rc")
    method = method.removesuffix("+rc")
    if mask not in bp.MASKS or method not in bp.METHODS or (curves and method != "rd"):
        raise SystemExit(f"bad row {spec!r}: METHOD[+rc]:MASK[+refit]")
    return bp.Row(method, mask, refit or mask == "sparsegpt", refit_curves=curves)


Outcomes = Callable[[onnx.ModelProto], tuple[np.ndarray, np.ndarray]]


def minilm_outcomes(folder: Path) -> Outcomes:
    queries, docs = retrieval.load_pairs(folder)
    dense = cpu_session(load_model(folder / "minilm.onnx"))
    reference = np.concatenate([retrieval.embed(dense, queries), retrieval.embed(dense, docs)])

    def outcomes(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
        session = cpu_session(model)
        q, d = retrieval.embed(session, queries), retrieval.embed(session, docs)
        return retrieval.ranks(q, d) == 1, retrieval.cosines(np.concatenate([q, d]), reference)

    return outcomes


def digits_outcomes() -> Outcomes:
    with np.load(bp.ROOT / "models/digits_test.npz") as f:
        inputs, labels = np.asarray(f["input"]), np.asarray(f["label"])
    dense = run_batched(
        cpu_session(load_model(bp.ROOT / "models/digits_cnn.onnx")), "input", inputs, 256
    )

    def outcomes(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
        logits = run_batched(cpu_session(model), "input", inputs, 256)
        error = ((logits.astype(np.float64) - dense) ** 2).mean(axis=1)
        return logits.argmax(axis=1) == labels, -error

    return outcomes


def interval(diff: np.ndarray, rng: np.random.Generator, n: int = 2000) -> list[float]:
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def compare(a: str, b: str, first: Any, second: Any, rng: np.random.Generator) -> dict[str, Any]:
    """Items only ``a`` / only ``b`` gets right; paired-bootstrap intervals of both scores."""
    h = first[a].astype(int) - first[b].astype(int)
    c = second[a] - second[b]
    return {
        "score_diff": h.mean(),
        "only_a": int((h > 0).sum()),
        "only_b": int((h < 0).sum()),
        "score_ci95": interval(h.astype(float), rng),
        "second_diff": c.mean(),
        "second_ci95": interval(c, rng),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", choices=("minilm", "digits"))
    p.add_argument("--minilm", type=Path, default=bp.ROOT / "models/minilm")
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument(
        "--rows", default="rd+rc:sparsegpt,rd:sparsegpt,lamp:sparsegpt,uniform:sparsegpt"
    )
    p.add_argument("--refit-inputs", default="sequential", choices=("dense", "sequential"))
    p.add_argument("--levels", type=int, default=None, help="default: 101 digits, 21 MiniLM")
    p.add_argument("--cache-dir", type=Path, default=RESULTS / "cache")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_paired.json")
    args = p.parse_args(argv)
    if args.model == "minilm":
        task, outcomes = (
            bp.minilm_task(args.minilm, args.levels or 21),
            minilm_outcomes(args.minilm),
        )
    else:
        task, outcomes = bp.digits_task(args.levels or 101), digits_outcomes()
    task.refit_inputs = args.refit_inputs
    first: dict[str, np.ndarray] = {}
    second: dict[str, np.ndarray] = {}
    for spec in args.rows.split(","):
        settings = bp.settings_for(parse_row(spec), args.ratio, task)
        calibration = CalibrationSpec(data=task.calib, batch_size=task.batch_size)
        result = prune(task.model, settings, calibration, write=False, cache_dir=args.cache_dir)
        assert result.model is not None
        first[spec], second[spec] = outcomes(result.model)
        print(f"{spec}: {task.score} {first[spec].mean():.4f} second {second[spec].mean():.4f}")
    rng = np.random.default_rng(0)
    record: dict[str, Any] = {"model": args.model, "ratio": args.ratio}
    record |= {"refit_inputs": args.refit_inputs, "score": task.score, "items": len(first[spec])}
    record["scores"] = {k: [first[k].mean(), second[k].mean()] for k in first}
    record["pairs"] = {}
    print(f"| a - b | {task.score} diff | only a / only b | 95% CI | second diff | 95% CI |")
    print("|---|---:|---:|---|---:|---|")
    for a, b in itertools.combinations(first, 2):
        pair = record["pairs"][f"{a} - {b}"] = compare(a, b, first, second, rng)
        rc, cc = pair["score_ci95"], pair["second_ci95"]
        print(
            f"| {a} - {b} | {pair['score_diff']:+.4f} | {pair['only_a']} / {pair['only_b']} | "
            f"[{rc[0]:+.3f}, {rc[1]:+.3f}] | {pair['second_diff']:+.4g} | "
            f"[{cc[0]:+.4g}, {cc[1]:+.4g}] |"
        )
    write_json(args.out, record)


if __name__ == "__main__":
    main()
