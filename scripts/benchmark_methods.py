"""Benchmark: every allocation method of rdprune-onnx, and onnxsim's pruning passes, at the same
sparsity ratios, on two real models.

* ``digits``: the shipped CNN (``models/digits_cnn.onnx``), calibrated on
  ``models/digits_calib.npz`` (256 training images), scored by top-1 accuracy on the 450 held-out
  images of ``models/digits_test.npz``.
* ``minilm``: all-MiniLM-L6-v2 exported to ONNX by ``scripts/export_minilm.py``
  (``models/minilm/``), calibrated on ``calib_small.npz`` (32 docstring texts, 64 tokens),
  scored by recall@1 and MRR on 300 (query, document) docstring pairs that share no text with
  the calibration set, and by the mean cosine of the 600 held-out embeddings to the dense
  model's (``scripts/retrieval.py``).

Rows: ``rd`` with several distortion metrics (one-shot, and iterative with re-measured curves),
the baselines ``uniform``, ``uniform-plus``, ``global``, ``lamp``, ``erk`` (all through
:func:`rdprune_onnx.prune`, same magnitude masks), and, when the ``onnxsim`` package is
importable, its post-training pruning passes: magnitude (per row, and global), Wanda (per row,
and global) and SparseGPT (which also rewrites the kept weights), given the same calibration
batches. Every pruned model is run with ONNX Runtime on the calibration data (distortion
against the dense model, in every metric that applies) and on the evaluation data; the sparsity
each row reaches is counted over the same prunable layers for every method.

For ``rd`` the predicted distortion (the sum of the chosen curve points) is recorded beside the
measured one, and every allocation of our methods is also scored by the curves (the sum of
single-layer distortions at its per-layer ratios): this shows whether the rd objective ranks
allocations the way the joint distortion and the task metric do (see ``docs/findings.md``).
``--diagnose`` (on by default for a full run) adds rd runs on the digits model with a coarser
grid, less calibration data, more iterative steps and capped layer ratios; ``--diagnose-minilm``
adds MiniLM rd runs on 8 calibration texts (as is, on the vector before the L2 normalisation,
on a 41-level grid) and with capped layer ratios. ``--report-only JSON...`` rebuilds the
tables and the plot from recorded runs (merging their rows).

Reconstruction (issue 7, part 5): every ``rd`` and baseline row also gets a ``+ reconstruct``
row: the same masks (re-pruned from the cached curves, checked against the plain row's per-layer
ratios) with the kept weights and biases refit by :func:`rdprune_onnx.reconstruct.reconstruct`,
the call ``--reconstruct`` makes, on the task's calibration data. ``--refit-solver`` (digits,
default ``auto``) and ``--minilm-refit-solver`` (default ``sparsegpt``) pick the solver;
``--minilm-refit-compare auto`` refits the MiniLM rows again with ``auto`` (exact on MiniLM:
rows labelled ``... + reconstruct (auto)``). ``--digits-refit-data NPZ`` and
``--minilm-refit-data NPZ`` / ``--minilm-refit-unpadded T`` refit some rows again on other
calibration data (labelled ``(N calib)`` / ``(NxT calib)``). A MiniLM refit of the whole model
took 17-105 s with ``sparsegpt`` (load average 3-6) and 16-58 s with ``auto`` (exact) at load
1-2, but 617 s for one ``auto`` refit at 0.5 under a load average of ~5 (exact per-row solves at
50% sparsity are the costly case); a digits refit 1-18 s.

Resuming: ``--resume JSON...`` keeps the rows of earlier records (a finished
``benchmark_methods.json`` or the ``benchmark_methods.partial.json`` written after every row)
and computes only the missing ones; a resumed row that lacks a score the scorer now gives
(MiniLM's ``cosine``) is recomputed (``--rescore``, default: our rows only).

MiniLM dominates the cost (2 shared CPU cores): its 36 curves on a 21-level grid took 1,255 s
under a load average of ~10; scoring a pruned model (600 texts) 6-30 s; onnxsim SparseGPT
265-1,092 s per call, so it runs at ``--minilm-sparsegpt-ratios`` (default 0.5) only. With
warm curves the full run without reconstruction took 19 min (27.7 min with
``--diagnose-minilm``); the recorded reconstruction rows took about 110 min more, over five
resumed runs (commands in docs/findings.md).

Outputs in ``--out-dir`` (default ``results/``; ``--quick``: a new temporary folder):
``benchmark_methods.json`` (configuration, versions, timings, every row), ``benchmark.md`` (the
tables) and ``benchmark_methods.png`` (task metric vs ratio, one line per method; rd predicted
vs measured distortion).

The code is in parts: ``scripts/methods_bench/`` holds the task definitions (``tasks.py``), the
runner (``runner.py``) and the report writer (``report.py``, ``plot.py``); the helpers it shares
with the other benchmarks (scorers, onnxsim's passes, atomic JSON writes, resuming, tables,
machine records) are in ``scripts/benchlib/``.

Run from the repository root in the benchmark virtualenv, which has onnxsim (never a
dependency of the library)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -e '.[bench]'
    .venv-bench/bin/python scripts/benchmark_methods.py              # full run
    .venv-bench/bin/python scripts/benchmark_methods.py --quick      # smoke run, ~3 min cold

Curves are cached in ``--cache-dir`` (default ``/tmp/rdprune-bench-cache``): each
(model, data, metric, levels) set is measured once and reused across ratios and reruns.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib.records import (
    RESULTS,
    dumps,
    host_record,
    load_average,
    resumed_rows,
    shown,
    version_record,
    write_json,
    write_text,
)
from methods_bench.report import add_analysis, merge_records, report
from methods_bench.runner import run_task
from methods_bench.tasks import EMBEDDING_METRICS, MODELS, QUICK_RATIOS, RATIOS, make_tasks

import rdprune_onnx
from rdprune_onnx.reconstruct import SOLVERS

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "rdprune-bench-cache"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only is not None:
        record = merge_records([json.loads(p.read_text()) for p in args.report_only])
        add_analysis(record)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(args.out_dir / "benchmark_methods.json", record)
        report(record, args.out_dir)
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    start = time.perf_counter()
    load_start = load_average()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results = run_tasks(args)
    record = {
        "config": config_record(args),
        "versions": version_record(onnxsim=True),
        "host": host_record(load_start),
        "timings": {"total_s": time.perf_counter() - start}
        | {t["name"]: t["seconds"] for t in results},
        "tasks": results,
    }
    if args.resume:  # the runs whose rows were kept: their configuration and timings
        record["resumed_from"] = resumed_from(args.resume)
    add_analysis(record)
    write_json(args.out_dir / "benchmark_methods.json", record)
    (args.out_dir / "benchmark_methods.partial.json").unlink(missing_ok=True)
    report(record, args.out_dir)


def run_tasks(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every task's record; ``benchmark_methods.partial.json`` holds every finished row so far
    (resumable with ``--resume PARTIAL``), rewritten atomically after each one."""
    done = resumed_rows(args.resume or [])
    results: list[dict[str, Any]] = []
    partial = args.out_dir / "benchmark_methods.partial.json"

    def save(current: dict[str, Any]) -> None:
        write_text(partial, dumps({"tasks": [*results, current]}, indent=None))

    with tempfile.TemporaryDirectory(prefix="rdbench-") as work:
        for task in make_tasks(args, Path(work)):
            results.append(run_task(task, args, Path(work), done.get(task.name), save))
            write_text(partial, dumps({"tasks": results}, indent=None))
    return results


def config_record(args: argparse.Namespace) -> dict[str, Any]:
    """The run's command and settings, as recorded in the JSON and shown in benchmark.md."""
    keys = [
        "ratios",
        "models",
        "quick",
        "diagnose",
        "digits_levels",
        "minilm_levels",
        "minilm_metrics",
        "minilm_steps",
        "steps_metric",
        "pairs",
        "minilm_sparsegpt_ratios",
        "threads",
    ]
    refit_keys = [
        "reconstruct_models",
        "refit_solver",
        "minilm_refit_solver",
        "minilm_refit_compare",
        "minilm_refit_compare_rows",
        "minilm_refit_compare_ratios",
    ]
    return {
        "command": " ".join(["python", *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **{k: getattr(args, k) for k in keys},
        "cache_dir": str(args.cache_dir),
        **{k: getattr(args, k) for k in refit_keys},
        "digits_refit_data": [str(p) for p in args.digits_refit_data],
        "digits_refit_compare_rows": args.digits_refit_compare_rows,
        "minilm_refit_data": [str(p) for p in args.minilm_refit_data],
        "minilm_refit_data_rows": args.minilm_refit_data_rows,
        "minilm_refit_data_ratios": args.minilm_refit_data_ratios,
        "minilm_refit_unpadded": args.minilm_refit_unpadded,
        "minilm_refit_data_solver": args.minilm_refit_data_solver,
        "resume": [str(p) for p in args.resume or []],
        "rescore": args.rescore,
        # where the library came from (a snapshot on PYTHONPATH, or the checkout)
        "library": str(Path(rdprune_onnx.__file__).resolve().parent),
    }


def resumed_from(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The configuration, timings, host and versions of the records ``--resume`` kept rows of."""
    out = []
    for path in paths:
        if path.is_file() and isinstance(old := json.loads(path.read_text()), dict):
            kept = {k: old[k] for k in ("config", "timings", "host", "versions") if k in old}
            kept["resumed_from"] = old.get("resumed_from", [])
            out.append({"path": shown(path.resolve()), **kept})
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_options(parser)
    add_minilm_options(parser)
    add_refit_options(parser)
    add_refit_data_options(parser)
    add_resume_options(parser)
    args = parser.parse_args(argv)
    normalise(parser, args)
    return args


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Models, ratios, output and cache folders, grids, metrics."""
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: digits,minilm")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default results/ (quick: a temp dir)"
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--quick", action="store_true", help="smoke run: few methods and ratios")
    parser.add_argument("--digits-levels", type=int, default=101)
    parser.add_argument("--minilm-levels", type=int, default=21)
    parser.add_argument("--minilm-metrics", default="mse", help="rd metrics on MiniLM (mse,worst)")
    parser.add_argument("--minilm-steps", type=int, default=1, help="iterative rd on MiniLM (>1)")
    parser.add_argument("--steps-metric", default="kl", help="metric of iterative rd on digits")


def add_minilm_options(parser: argparse.ArgumentParser) -> None:
    """MiniLM's onnxsim ratios, scoring threads, diagnostics, report-only."""
    parser.add_argument(
        "--minilm-sparsegpt-ratios",
        default="0.5",
        help="ratios at which onnxsim SparseGPT runs on MiniLM ('all': every ratio; it is slow)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads of the scoring sessions"
    )
    parser.add_argument(
        "--diagnose-minilm",
        action="store_true",
        help="extra rd runs on MiniLM (8 calibration texts: as is, on the pre-normalisation "
        "vector, with 41 levels); about 3 more curve sets",
    )
    parser.add_argument(
        "--only-diagnostics",
        action="store_true",
        help="run only the diagnostic rows (merge them with --report-only A.json B.json)",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="rebuild the JSON, benchmark.md and the plot in --out-dir from one or more "
        "benchmark_methods.json (the rows of a model found in several are merged)",
    )
    parser.add_argument("--pairs", type=int, default=None, help="use only the first N MiniLM pairs")


def add_refit_options(parser: argparse.ArgumentParser) -> None:
    """The ``+ reconstruct`` rows: solvers, and refits on other data."""
    parser.add_argument(
        "--reconstruct-models",
        default=None,
        help="models whose rd and baseline rows also get a '+ reconstruct' row (the masks refit "
        "as --reconstruct does); comma-separated, '' for none; default: digits,minilm "
        "(quick: digits)",
    )
    parser.add_argument("--refit-solver", default="auto", choices=SOLVERS, help="digits")
    parser.add_argument(
        "--minilm-refit-solver",
        default="sparsegpt",
        choices=SOLVERS,
        help="MiniLM (auto picks exact, ~5-6 min a model at 0.5 on 2 cores; sparsegpt ~1 min)",
    )
    parser.add_argument(
        "--minilm-refit-compare",
        default="auto",
        help="refit some MiniLM rows again with this solver ('' for none)",
    )
    parser.add_argument(
        "--minilm-refit-compare-rows",
        default="rd (mse),uniform,uniform-plus,global,lamp,erk",
        help="the rows (labels, comma-separated) of --minilm-refit-compare",
    )
    parser.add_argument(
        "--minilm-refit-compare-ratios",
        default="",
        help="the ratios of --minilm-refit-compare (comma-separated; default: all)",
    )
    parser.add_argument(
        "--digits-refit-data",
        type=Path,
        nargs="*",
        default=[],
        metavar="NPZ",
        help="refit some digits rows again on these calibration files (e.g. the whole training "
        "split), to see what more calibration rows than fc1's 257 inputs change",
    )


def add_refit_data_options(parser: argparse.ArgumentParser) -> None:
    """Some rows' masks refit again on other calibration data."""
    parser.add_argument(
        "--minilm-refit-data",
        type=Path,
        nargs="*",
        default=[],
        metavar="NPZ",
        help="refit some MiniLM rows again on these calibration files (more texts, no padding)",
    )
    parser.add_argument(
        "--minilm-refit-data-solver",
        default="auto",
        choices=SOLVERS,
        help="the solver of --minilm-refit-data and --minilm-refit-unpadded",
    )
    parser.add_argument(
        "--minilm-refit-unpadded",
        type=int,
        nargs="*",
        default=[],
        metavar="T",
        help="also refit on the calib.npz texts of at least T tokens cut to T (no padding rows)",
    )
    parser.add_argument(
        "--minilm-refit-data-rows",
        default="rd (mse),uniform",
        help="the rows (labels, comma-separated) of --minilm-refit-data",
    )
    parser.add_argument(
        "--minilm-refit-data-ratios",
        default="",
        help="the ratios of --minilm-refit-data (comma-separated; default: all)",
    )
    parser.add_argument(
        "--digits-refit-compare-rows",
        default="rd (mse),uniform,global,lamp,erk",
        help="the rows (labels, comma-separated) of --digits-refit-data",
    )


def add_resume_options(parser: argparse.ArgumentParser) -> None:
    """Resuming from earlier records, rescoring, digits diagnostics."""
    parser.add_argument(
        "--resume",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="keep the rows of these records (benchmark_methods.json or .partial.json; later "
        "files win) and compute only the missing ones",
    )
    parser.add_argument(
        "--rescore",
        choices=("none", "ours", "all"),
        default="ours",
        help="with --resume: recompute resumed rows that lack a score the scorer now gives "
        "(ours: only our methods' rows; onnxsim's are kept)",
    )
    parser.add_argument(
        "--diagnose",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="extra rd runs on digits (grid, calibration size, steps); default: on unless --quick",
    )


def normalise(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Comma lists to lists, checks, and the defaults that depend on ``--quick``."""
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.minilm_sparsegpt_ratios = (
        list(args.ratios)
        if args.minilm_sparsegpt_ratios == "all"
        else [float(r) for r in args.minilm_sparsegpt_ratios.split(",") if r.strip()]
    )
    args.minilm_metrics = [m.strip() for m in args.minilm_metrics.split(",") if m.strip()]
    bad = set(args.minilm_metrics) - set(EMBEDDING_METRICS)
    if bad:
        parser.error(f"MiniLM outputs an embedding: use {', '.join(EMBEDDING_METRICS)}, not {bad}")
    if args.quick:
        if args.ratios == list(RATIOS):
            args.ratios = list(QUICK_RATIOS)
        if args.pairs is None:
            args.pairs = 64
    if args.diagnose is None:
        args.diagnose = not args.quick
    if args.reconstruct_models is None:
        args.reconstruct_models = "digits" if args.quick else ",".join(MODELS)
    args.reconstruct_models = [m.strip() for m in args.reconstruct_models.split(",") if m.strip()]
    if args.minilm_refit_compare not in ("", *SOLVERS):
        parser.error(f"--minilm-refit-compare: choose from {', '.join(SOLVERS)} or ''")
    if args.minilm_refit_compare in ("", args.minilm_refit_solver):
        args.minilm_refit_compare = None
    args.minilm_refit_compare_rows = [
        r.strip() for r in args.minilm_refit_compare_rows.split(",") if r.strip()
    ]
    args.digits_refit_compare_rows = [
        r.strip() for r in args.digits_refit_compare_rows.split(",") if r.strip()
    ]
    args.minilm_refit_data_rows = [
        r.strip() for r in args.minilm_refit_data_rows.split(",") if r.strip()
    ]
    args.minilm_refit_compare_ratios = [
        float(r) for r in args.minilm_refit_compare_ratios.split(",") if r.strip()
    ]
    args.minilm_refit_data_ratios = [
        float(r) for r in args.minilm_refit_data_ratios.split(",") if r.strip()
    ]
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="rdbench-")) if args.quick else RESULTS


if __name__ == "__main__":
    main()
