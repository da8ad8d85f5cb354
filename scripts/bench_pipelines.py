"""Benchmark of issue #11: every allocation method x every mask x with / without refit, beside
onnxsim's pruning passes, on the shipped models.

Rows (all through :func:`rdprune_onnx.prune`, the call the command line makes, so every row
runs the pipeline a user gets: same calibration data, same masks for the same mask name, the
same refit):

* ``METHOD / MASK`` for METHOD in rd, uniform, uniform-plus, global, lamp, erk and MASK in
  magnitude, wanda (plain masking), and ``METHOD / MASK + refit`` (``--reconstruct``), and
  ``METHOD / sparsegpt`` (which always rewrites the kept weights);
* rd's curves are measured with the mask that is applied (wanda: the wanda mask at every
  point); ``rd (refit curves) / MASK + refit`` measures every point pruned AND refit
  (``--refit-curves``; with sparsegpt each point's mask is chosen by OBS), beside the default
  rd row (curves of plain masking, refit applied afterwards);
* ``onnxsim PASS``: onnxsim 0.8.1's magnitude (global), Wanda (per row, global) and
  SparseGPT passes, given the same calibration batches (when onnxsim is importable).

Scores: ``digits`` test accuracy (450 images, one image = 0.22%); ``recognizer`` character
error rate on the held-out lines (lower is better); ``minilm`` recall@1 on 300 query/document
pairs (one query = 0.33%) and the mean cosine to the dense embeddings.

For every task and ratio the summary says, per pipeline (mask, refit), whether the best rd row
beats the best row of the other allocations, and whether the best rd row beats onnxsim's best
pass, with the margin and the noise (one test item). Margins within one item are ties.

Run from the repository root with the benchmark extra (onnxsim), e.g.::

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'
    .venv-bench/bin/python scripts/bench_pipelines.py --models digits
    .venv-bench/bin/python scripts/bench_pipelines.py --models recognizer --levels 51

Rows are written to ``--out`` (JSON) after every row; ``--resume`` keeps the rows of that file.
The tables go to ``--markdown``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from benchlib.data import calibration_batches
from benchlib.peers import ONNXSIM_PASSES, run_onnxsim
from benchlib.records import RESULTS, ROOT, version_record, write_text
from benchlib.scoring import digits_scorer, minilm_scorer, recognizer_scorer
from benchlib.tables import ratio_header

from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.graph.load import load_model
from rdprune_onnx.pipeline import load_calibration

RATIOS = (0.5, 0.7, 0.8, 0.9, 0.95)
METHODS = ("rd", "uniform", "uniform-plus", "global", "lamp", "erk")
MASKS = ("magnitude", "wanda", "sparsegpt")
ONNXSIM = {p: ONNXSIM_PASSES[p] for p in ("magnitude-global", "wanda", "wanda-global", "sparsegpt")}
Scorer = Callable[[onnx.ModelProto], dict[str, float]]


@dataclass
class Task:
    name: str
    model: Path
    calib: Path
    score: str  # headline figure
    higher: bool  # higher is better
    items: int  # held-out items: one item is the noise
    scorer: Scorer
    levels: int
    metric: str = "mse"
    batch_size: int = 32
    refit_inputs: str = "sequential"  # --refit-inputs of every refit row


def digits_task(levels: int) -> Task:
    scorer = digits_scorer()
    return Task(
        "digits",
        ROOT / "models/digits_cnn.onnx",
        ROOT / "models/digits_calib.npz",
        "accuracy",
        True,
        scorer.items,
        lambda model: scorer.on_model(model),
        levels,
    )


def recognizer_task(levels: int, metric: str) -> Task:
    scorer = recognizer_scorer()
    return Task(
        "recognizer",
        ROOT / "models/recognizer.onnx",
        ROOT / "models/recognizer_calib.npz",
        "cer",
        False,
        scorer.items,
        lambda model: scorer.on_model(model),
        levels,
        metric,
    )


def minilm_task(folder: Path, levels: int) -> Task:
    scorer = minilm_scorer(folder)

    def score(model: onnx.ModelProto) -> dict[str, float]:
        result = scorer.on_model(model)
        return {"recall@1": result["recall_at_1"], "cosine": result["cosine"]}

    return Task(
        "minilm",
        folder / "minilm.onnx",
        folder / "calib_small.npz",
        "recall@1",
        True,
        scorer.items,
        score,
        levels,
    )


@dataclass(frozen=True)
class Row:
    method: str
    mask: str
    refit: bool
    refit_curves: bool = False  # rd curves with each point pruned AND refit
    onnxsim: str | None = None

    @property
    def label(self) -> str:
        if self.onnxsim is not None:
            return ONNXSIM[self.onnxsim]
        method = "rd (refit curves)" if self.refit_curves else self.method
        refit = " + refit" if self.refit and self.mask != "sparsegpt" else ""
        return f"{method} / {self.mask}{refit}"

    @property
    def pipeline(self) -> str:
        """What is applied: rows with the same pipeline differ only in their allocation."""
        if self.onnxsim is not None:
            return "onnxsim"
        return f"{self.mask}{' + refit' if self.refit and self.mask != 'sparsegpt' else ''}"


def rows_for(
    methods: Sequence[str], masks: Sequence[str], refits: Sequence[bool], refit_curves: bool = True
) -> list[Row]:
    rows = []
    for mask in masks:
        for refit in refits:
            if mask == "sparsegpt" and not refit:
                continue  # sparsegpt rewrites the kept weights: refit is implied
            for method in methods:
                rows.append(Row(method, mask, refit or mask == "sparsegpt"))
            if (
                refit_curves
                and "rd" in methods
                and (refit or mask == "sparsegpt")
                and mask != "wanda"
            ):
                rows.append(Row("rd", mask, True, refit_curves=True))
    return rows


def settings_for(row: Row, ratio: float, task: Task) -> PruneSettings:
    return PruneSettings(
        ratio=ratio,
        method=row.method,
        metric=task.metric,
        levels=task.levels,
        provider="cpu",
        mask=row.mask,
        reconstruct=row.refit,
        refit_curves=row.refit_curves,
        refit_inputs=task.refit_inputs,
    )


def run_ours(row: Row, ratio: float, task: Task, cache: Path) -> dict[str, Any]:
    settings = settings_for(row, ratio, task)
    t = time.perf_counter()
    result = prune(
        task.model,
        settings,
        CalibrationSpec(data=task.calib, batch_size=task.batch_size),
        write=False,
        cache_dir=cache,
    )
    seconds = time.perf_counter() - t
    assert result.model is not None
    return {
        "achieved_ratio": result.achieved_ratio,
        "predicted": result.predicted_distortion,
        "measured": result.measured_distortion,
        "layer_ratios": {layer.name: layer.ratio for layer in result.layers},
        "timings": result.timings,
        "seconds": seconds,
        "scores": task.scorer(result.model),
    }


def run_peer(row: Row, ratio: float, task: Task) -> dict[str, Any]:
    """onnxsim's pass of ``row`` at ``ratio``, on the task's calibration batches, scored."""
    model = load_model(task.model)
    data, batch = load_calibration(model, CalibrationSpec(data=task.calib))
    t = time.perf_counter()
    assert row.onnxsim is not None
    pruned = run_onnxsim(row.onnxsim, model, ratio, calibration_batches(data, batch))
    return {"seconds": time.perf_counter() - t, "scores": task.scorer(pruned)}


def better(task: Task, a: float, b: float) -> float:
    """How much ``a`` is better than ``b`` in the task's direction."""
    return a - b if task.higher else b - a


def summary(task: Task, rows: Sequence[dict[str, Any]], ratios: Sequence[float]) -> list[str]:
    """Per ratio and pipeline: best rd row against the best other allocation; and the best rd
    row overall against onnxsim's best pass."""
    noise = 1.0 / task.items
    lines = []
    for ratio in ratios:
        at = [r for r in rows if r["ratio"] == ratio and "scores" in r]
        if not at:
            continue
        value = {r["label"]: r["scores"][task.score] for r in at}
        pipelines = sorted({r["pipeline"] for r in at} - {"onnxsim"})
        for pipe in pipelines:
            group = [r for r in at if r["pipeline"] == pipe]
            rd = [r for r in group if r["method"] == "rd"]
            other = [r for r in group if r["method"] != "rd"]
            if not rd or not other:
                continue
            best_rd = max(rd, key=lambda r: better(task, value[r["label"]], 0.0))
            best_other = max(other, key=lambda r: better(task, value[r["label"]], 0.0))
            margin = better(task, value[best_rd["label"]], value[best_other["label"]])
            lines.append(_verdict(ratio, pipe, best_rd, best_other, value, margin, noise))
        ours = [r for r in at if r["pipeline"] != "onnxsim" and r["method"] == "rd"]
        sims = [r for r in at if r["pipeline"] == "onnxsim"]
        if ours and sims:
            best_rd = max(ours, key=lambda r: better(task, value[r["label"]], 0.0))
            best_sim = max(sims, key=lambda r: better(task, value[r["label"]], 0.0))
            margin = better(task, value[best_rd["label"]], value[best_sim["label"]])
            lines.append(_verdict(ratio, "any vs onnxsim", best_rd, best_sim, value, margin, noise))
    return lines


def _verdict(
    ratio: float,
    pipe: str,
    ours: Mapping[str, Any],
    other: Mapping[str, Any],
    value: Mapping[str, float],
    margin: float,
    noise: float,
) -> str:
    word = "tie" if abs(margin) <= noise + 1e-12 else ("win" if margin > 0 else "LOSS")
    return (
        f"| {ratio:g} | {pipe} | {ours['label']} {value[ours['label']]:.4f} | "
        f"{other['label']} {value[other['label']]:.4f} | {margin:+.4f} | {noise:.4f} | {word} |"
    )


def table(task: Task, rows: Sequence[dict[str, Any]], ratios: Sequence[float]) -> list[str]:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = ratio_header("row", ratios, right=False)
    for label in labels:
        cells = []
        for ratio in ratios:
            found = [r for r in rows if r["label"] == label and r["ratio"] == ratio]
            if not found or "scores" not in found[0]:
                cells.append("-" if not found else "err")
                continue
            row = found[0]
            cell = f"{row['scores'][task.score]:.3f}"
            if row.get("predicted") is not None and row.get("measured"):
                cell += f" ({row['predicted']:.3g}/{row['measured']:.3g})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits", help="comma list: digits,recognizer,minilm")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--masks", default=",".join(MASKS))
    p.add_argument("--refit", default="none,reconstruct", help="comma list: none,reconstruct")
    p.add_argument("--onnxsim", default=",".join(ONNXSIM), help="comma list, or 'none'")
    p.add_argument(
        "--no-refit-curves",
        action="store_true",
        help="no 'rd (refit curves)' rows (refit-aware curves take long on wide models)",
    )
    p.add_argument("--levels", type=int, default=None, help="default: 101 digits, 51 others")
    p.add_argument("--metric", default=None, help="rd metric (default mse; kl on recognizer)")
    p.add_argument("--minilm", type=Path, default=ROOT / "models/minilm")
    p.add_argument(
        "--refit-inputs",
        default="sequential",
        choices=("sequential", "dense"),
        help="where the refit rows take their Hessians (labels say 'dense Hessians')",
    )
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "rdbench")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_pipelines.json")
    p.add_argument("--markdown", type=Path, default=RESULTS / "bench_pipelines.md")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: merge the rows of these JSON files (by label and ratio, later files "
        "win) into --out and write the tables of --ratios to --markdown",
    )
    return p.parse_args(argv)


def make_task(name: str, args: argparse.Namespace) -> Task:
    levels = args.levels or (101 if name == "digits" else 51)
    if name == "digits":
        task = digits_task(levels)
    elif name == "recognizer":
        task = recognizer_task(levels, args.metric or "kl")
    elif name == "minilm":
        task = minilm_task(args.minilm, levels)
    else:
        raise SystemExit(f"unknown model {name}")
    if args.metric and name != "recognizer":
        task.metric = args.metric
    task.refit_inputs = args.refit_inputs
    return task


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ratios = [float(r) for r in args.ratios.split(",")]
    refits = [{"none": False, "reconstruct": True}[r] for r in args.refit.split(",")]
    ours = rows_for(
        args.methods.split(","), args.masks.split(","), refits, not args.no_refit_curves
    )
    sims = (
        []
        if args.onnxsim == "none"
        else [Row("-", "-", False, onnxsim=p) for p in args.onnxsim.split(",")]
    )
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        sims = []
    if args.merge:
        record = merged(args.merge)
        write_text(args.out, json.dumps(record, indent=1, default=float))
        text = markdown(record, ratios, args)
        write_text(args.markdown, text)
        print(text)
        return
    record: dict[str, Any] = {"tasks": {}}
    if args.resume and args.out.is_file():
        record = json.loads(args.out.read_text())
    record["config"] = {k: str(v) for k, v in vars(args).items()}
    record["versions"] = version_record()
    for name in args.models.split(","):
        run_task(make_task(name, args), record, [*ours, *sims], ratios, args)
    text = markdown(record, ratios, args)
    write_text(args.markdown, text)
    print(text)


def merged(paths: Sequence[Path]) -> dict[str, Any]:
    """The rows of several runs in one record (by task, label and ratio; later files win),
    with each run's configuration and versions kept under ``runs``."""
    record: dict[str, Any] = {"tasks": {}, "runs": []}
    for path in paths:
        run = json.loads(path.read_text())
        record["runs"].append({"file": path.name} | {k: run.get(k) for k in ("config", "versions")})
        for name, saved in run["tasks"].items():
            into = record["tasks"].setdefault(name, {"rows": []})
            into.setdefault("dense", saved.get("dense"))
            into["config"] = saved.get("config")
            rows = {(r["label"], r["ratio"]): r for r in into["rows"]}
            rows |= {(r["label"], r["ratio"]): r for r in saved["rows"]}
            into["rows"] = sorted(rows.values(), key=lambda r: (r["ratio"], r["label"]))
    return record


def run_task(
    task: Task,
    record: dict[str, Any],
    rows: Sequence[Row],
    ratios: Sequence[float],
    args: argparse.Namespace,
) -> None:
    """Every missing row of ``task`` into ``record``, which is rewritten after each one."""
    name = task.name
    saved = record["tasks"].setdefault(name, {"rows": []})
    done = {(r["label"], r["ratio"]) for r in saved["rows"] if "scores" in r}
    if "dense" not in saved:
        saved["dense"] = task.scorer(load_model(task.model))
    saved["config"] = dataclasses.asdict(task) | {"scorer": None, "model": str(task.model)}
    saved["config"]["calib"] = str(task.calib)
    print(f"=== {name}: dense {saved['dense']}", flush=True)
    for ratio in ratios:
        for row in rows:
            label, pipeline = row.label, row.pipeline
            if row.refit and row.onnxsim is None and task.refit_inputs != "sequential":
                label += f" ({task.refit_inputs} Hessians)"
                pipeline += f" ({task.refit_inputs} Hessians)"
            if (label, ratio) in done:
                continue
            entry = run_entry(task, row, ratio, label, pipeline, args.cache_dir)
            saved["rows"] = [
                r for r in saved["rows"] if (r["label"], r["ratio"]) != (label, ratio)
            ] + [entry]
            print(
                f"{name} {ratio:g} {label}: "
                f"{entry.get('scores', entry.get('error'))} ({entry['wall_s']:.1f} s)",
                flush=True,
            )
            write_text(args.out, json.dumps(record, indent=1, default=float))


def run_entry(
    task: Task, row: Row, ratio: float, label: str, pipeline: str, cache: Path
) -> dict[str, Any]:
    """One row at one ratio; a row that fails is recorded with its error, the run goes on."""
    t = time.perf_counter()
    entry: dict[str, Any] = {
        "label": label,
        "pipeline": pipeline,
        "method": row.method,
        "mask": row.mask,
        "refit": row.refit,
        "ratio": ratio,
    }
    try:
        if row.onnxsim is not None:
            entry |= run_peer(row, ratio, task)
        else:
            entry |= run_ours(row, ratio, task, cache)
    except Exception as exc:  # a row that fails is recorded, the run goes on
        entry["error"] = f"{type(exc).__name__}: {exc}"
    entry["wall_s"] = time.perf_counter() - t
    return entry


def markdown(record: Mapping[str, Any], ratios: Sequence[float], args: argparse.Namespace) -> str:
    """Per task of this run: the score table and the rd verdicts."""
    lines = []
    for name, saved in record["tasks"].items():
        task = make_task(name, args) if name in args.models.split(",") else None
        if task is None:
            continue
        lines += [f"## {name} ({task.score}, dense {saved['dense'][task.score]:.4f})", ""]
        lines += [*table(task, saved["rows"], ratios), ""]
        lines += [
            "| ratio | pipeline | best rd | best other | margin | noise | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [*summary(task, saved["rows"], ratios), ""]
        lines += [*additivity(task, saved["rows"], ratios), ""]
    return "\n".join(lines)


def additivity(task: Task, rows: Sequence[dict[str, Any]], ratios: Sequence[float]) -> list[str]:
    """The additivity check of every rd row: its predicted distortion (the sum of its curve
    points at the allocation) against the distortion measured on the pruned model, on the
    calibration data, in the task's metric. Rows whose curves model plain masking but whose
    pipeline refits are over-predicted by design (the refit undoes part of the masking)."""
    lines = [
        f"Additivity ({task.metric}, calibration data): predicted / measured per rd row",
        "",
        *ratio_header("rd row", ratios, right=True),
    ]
    for label in dict.fromkeys(r["label"] for r in rows if r["method"] == "rd"):
        cells = []
        for ratio in ratios:
            found = [r for r in rows if r["label"] == label and r["ratio"] == ratio]
            row = found[0] if found else {}
            if row.get("predicted") is None or not row.get("measured"):
                cells.append("-")
                continue
            cells.append(
                f"{row['predicted']:.3g} / {row['measured']:.3g} "
                f"({row['predicted'] / row['measured']:.2f})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
