"""Paired noise of a MiniLM comparison: is rd's margin over another allocation more than the
sampling noise of the 300 held-out queries?

Each row of ``bench_pipelines.py`` scores a pruned MiniLM by recall@1 on 300 (query, document)
pairs and by the mean cosine of its 600 held-out embeddings to the dense model's. Both are
means over held-out items, and two rows are scored on the SAME items, so the noise of their
difference is that of a paired comparison: this script prunes the given rows again (through
:func:`rdprune_onnx.prune`, the call the benchmark makes, with its settings), keeps the
per-query hits and per-text cosines, and gives for every pair of rows the queries only one of
them gets right and a 95% paired-bootstrap interval (2,000 resamples, seed 0) of the
difference of each score. A margin whose interval holds 0 is within the noise of the queries.

    .venv/bin/python scripts/bench_paired.py --minilm models/minilm --ratio 0.8 \\
        --out results/bench_paired_minilm_0.8.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rdprune_onnx import CalibrationSpec, prune
from rdprune_onnx.graph.load import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipelines as bp
import retrieval
from benchlib.records import RESULTS, write_json
from benchlib.scoring import cpu_session

ROWS = {
    "rd (refit curves)": bp.Row("rd", "sparsegpt", True, refit_curves=True),
    "rd": bp.Row("rd", "sparsegpt", True),
    "lamp": bp.Row("lamp", "sparsegpt", True),
    "uniform": bp.Row("uniform", "sparsegpt", True),
}


def per_item(emb: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``emb`` to the same row of ``dense`` (0 for a zero row)."""
    a, b = emb.astype(np.float64), dense.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)


def hits_at_1(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per query: is its own document the nearest (ties count against it, as retrieval.py)?"""
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    sim = np.nan_to_num(q.astype(np.float64) @ d.astype(np.float64).T, nan=-np.inf)
    rank = 1 + ((sim >= np.diag(sim)[:, None]) & ~np.eye(len(sim), dtype=bool)).sum(axis=1)
    return np.asarray(rank == 1)


def interval(diff: np.ndarray, rng: np.random.Generator, n: int = 2000) -> list[float]:
    means = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minilm", type=Path, default=bp.ROOT / "models/minilm")
    p.add_argument("--ratio", type=float, default=0.8)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--refit-inputs", default="dense", choices=("dense", "sequential"))
    p.add_argument("--cache-dir", type=Path, default=RESULTS / "cache")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_paired_minilm.json")
    args = p.parse_args(argv)
    task = bp.minilm_task(args.minilm, 21)
    task.refit_inputs = args.refit_inputs
    queries, docs = retrieval.load_pairs(args.minilm)
    dense = cpu_session(load_model(task.model))
    dq, dd = retrieval.embed(dense, queries), retrieval.embed(dense, docs)
    hits: dict[str, np.ndarray] = {}
    cosines: dict[str, np.ndarray] = {}
    for name in args.rows.split(","):
        settings = bp.settings_for(ROWS[name], args.ratio, task)
        calibration = CalibrationSpec(data=task.calib, batch_size=task.batch_size)
        result = prune(task.model, settings, calibration, write=False, cache_dir=args.cache_dir)
        assert result.model is not None
        session = cpu_session(result.model)
        q, d = retrieval.embed(session, queries), retrieval.embed(session, docs)
        hits[name] = hits_at_1(q, d)
        cosines[name] = np.concatenate([per_item(q, dq), per_item(d, dd)])
        print(f"{name}: recall@1 {hits[name].mean():.4f} cosine {cosines[name].mean():.4f}")
    rng = np.random.default_rng(0)
    record: dict[str, Any] = {"ratio": args.ratio, "refit_inputs": args.refit_inputs}
    record["scores"] = {k: [hits[k].mean(), cosines[k].mean()] for k in hits}
    record["pairs"] = {}
    print("| a - b | recall@1 diff | only a / only b | 95% CI | cosine diff | 95% CI |")
    print("|---|---:|---:|---|---:|---|")
    for a, b in itertools.combinations(hits, 2):
        h = hits[a].astype(int) - hits[b].astype(int)
        c = cosines[a] - cosines[b]
        pair = {
            "recall_diff": h.mean(),
            "only_a": int((h > 0).sum()),
            "only_b": int((h < 0).sum()),
            "recall_ci95": interval(h.astype(float), rng),
            "cosine_diff": c.mean(),
            "cosine_ci95": interval(c, rng),
        }
        record["pairs"][f"{a} - {b}"] = pair
        rc, cc = pair["recall_ci95"], pair["cosine_ci95"]
        print(
            f"| {a} - {b} | {pair['recall_diff']:+.4f} | {pair['only_a']} / {pair['only_b']} | "
            f"[{rc[0]:+.3f}, {rc[1]:+.3f}] | {pair['cosine_diff']:+.4f} | "
            f"[{cc[0]:+.4f}, {cc[1]:+.4f}] |"
        )
    write_json(args.out, record)


if __name__ == "__main__":
    main()
