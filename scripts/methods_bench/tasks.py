"""Task definitions of scripts/benchmark_methods.py: which model, which calibration data, which
scorer, and the rows (variants) each task runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchlib.data import calib_subset, unpadded_calib
from benchlib.peers import ONNXSIM_PASSES
from benchlib.records import ROOT
from benchlib.scoring import digits_scorer, minilm_scorer

from rdprune_onnx.runtime import Session

RATIOS = (0.5, 0.7, 0.8, 0.9, 0.95)
QUICK_RATIOS = (0.5, 0.9)
BASELINES = ("uniform", "uniform-plus", "global", "lamp", "erk")
CLASS_METRICS = ("mse", "worst", "prob-mse", "kl")  # for class-score outputs
EMBEDDING_METRICS = ("mse", "worst")  # softmax metrics make no sense on an L2-normalised vector
MODELS = ("digits", "minilm")
# MiniLM's mean-pooled sentence vector before the L2 normalisation (the input of the final Div).
PRE_NORM = {"pre-norm": "/Div_output_0"}
RECONSTRUCT_SUFFIX = " + reconstruct"
# The onnxsim passes that the reconstruction table sets beside our refit rows.
RECONSTRUCT_PEERS = ("onnxsim SparseGPT", "onnxsim Wanda (per row)", "onnxsim Wanda (global)")


# ------------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class Variant:
    """One line of the benchmark: a way of pruning a model to a ratio."""

    label: str
    family: str  # "rd", "baseline", "onnxsim" or "diagnostic"
    method: str  # our allocation method, or the onnxsim pass
    metric: str = "mse"
    steps: int = 1
    levels: int | None = None  # None: the task's grid
    calib_samples: int | None = None  # None: the whole calibration file
    ratios: tuple[float, ...] | None = None  # None: every ratio of the run
    output: str | None = None  # measure rd's distortion on this tensor instead of the outputs
    # Re-allocate on the same curves with every layer capped at the last grid level below 1:
    # the exact-count repair otherwise interpolates towards the (excluded) whole-layer point
    # and can leave a single weight in a layer.
    cap: bool = False

    @property
    def ours(self) -> bool:
        return self.family != "onnxsim"

    @property
    def refit_label(self) -> str:
        """The label of this variant's row with the kept weights refit (``--reconstruct``)."""
        return f"{self.label}{RECONSTRUCT_SUFFIX}"


def rd_label(
    metric: str,
    steps: int = 1,
    levels: int | None = None,
    calib: int | None = None,
    output: str | None = None,
    cap: bool = False,
) -> str:
    parts = [metric if output is None else f"{metric} on {output}"]
    if steps > 1:
        parts.append(f"{steps} steps")
    if levels is not None:
        parts.append(f"{levels} levels")
    if calib is not None:
        parts.append(f"{calib} calib")
    if cap:
        parts.append("capped")
    return f"rd ({', '.join(parts)})"


def onnxsim_variants(passes: Sequence[str]) -> list[Variant]:
    return [Variant(ONNXSIM_PASSES[p], "onnxsim", p) for p in passes]


def baseline_variants(methods: Sequence[str]) -> list[Variant]:
    return [Variant(m, "baseline", m) for m in methods]


# ------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Compare:
    """Some rows' masks refit again: with ``solver`` (labelled "... + reconstruct (S)") or on
    the calibration file ``data`` (labelled "... + reconstruct (N calib)" or "(NxT calib)")."""

    solver: str
    labels: tuple[str, ...]
    data: Path | None = None
    ratios: tuple[float, ...] | None = None  # None: every ratio of the run


@dataclass
class Task:
    """A model, its calibration data and how a pruned copy of it is scored."""

    name: str
    title: str
    model: Path
    calib: Path
    levels: int
    metrics: tuple[str, ...]  # distortions measured for every row
    score: str  # the headline figure (higher is better)
    score_label: str
    extra_scores: tuple[str, ...]
    variants: list[Variant]
    score_fn: Callable[[Session], dict[str, float]] | None = None
    notes: list[str] = field(default_factory=list)
    # The solver of the "+ reconstruct" rows (every rd and baseline row refit after masking);
    # None: no such rows.
    refit_solver: str | None = None
    # Rows refit a second time, with another solver or on other calibration data.
    compares: list[Compare] = field(default_factory=list)


def make_tasks(args: argparse.Namespace, work: Path) -> list[Task]:
    """The tasks ``--models`` names, in the order of :data:`MODELS`."""
    tasks = []
    if "digits" in args.models:
        tasks.append(digits_task(args))
    if "minilm" in args.models:
        tasks.append(minilm_task(args, work))
    return tasks


def digits_task(args: argparse.Namespace) -> Task:
    """The shipped digits CNN, calibrated on 256 training images, scored by test accuracy."""
    quick = args.quick
    steps_metric = args.steps_metric
    rd = [Variant(rd_label(m), "rd", "rd", metric=m) for m in CLASS_METRICS]
    rd.append(Variant(rd_label(steps_metric, 3), "rd", "rd", metric=steps_metric, steps=3))
    if quick:
        rd = [rd[0], rd[3]]
    diagnostics = digits_diagnostics(args) if args.diagnose else []
    baselines = baseline_variants(("global", "lamp") if quick else BASELINES)
    peers = ("magnitude-global", "sparsegpt") if quick else tuple(ONNXSIM_PASSES)
    return Task(
        name="digits",
        title="digits CNN (5 layers, 57,232 prunable weights)",
        model=ROOT / "models" / "digits_cnn.onnx",
        calib=ROOT / "models" / "digits_calib.npz",
        levels=21 if quick else args.digits_levels,
        metrics=CLASS_METRICS,
        score="accuracy",
        score_label="test accuracy (450 held-out images)",
        extra_scores=(),
        variants=[*rd, *baselines, *onnxsim_variants(peers), *diagnostics],
        score_fn=digits_scorer(ROOT / "models" / "digits_test.npz"),
        refit_solver=args.refit_solver if "digits" in args.reconstruct_models else None,
        compares=[
            Compare(args.refit_solver, tuple(args.digits_refit_compare_rows), path)
            for path in args.digits_refit_data
        ],
    )


def digits_diagnostics(args: argparse.Namespace) -> list[Variant]:
    """``--diagnose``: rd on digits with another grid, less calibration data, more steps and
    capped layer ratios."""
    steps_metric = args.steps_metric
    high = tuple(sorted(args.ratios)[-2:])  # where the methods part
    diagnostics: list[Variant] = []
    for metric in ("mse", "kl"):
        for levels in (21, 51):
            diagnostics.append(
                Variant(rd_label(metric, levels=levels), "diagnostic", "rd", metric, 1, levels)
            )
        for n in (64, 128):
            diagnostics.append(
                Variant(rd_label(metric, calib=n), "diagnostic", "rd", metric, calib_samples=n)
            )
    for metric in ("mse", "prob-mse", "kl"):
        if metric != steps_metric:
            diagnostics.append(
                Variant(rd_label(metric, 3), "diagnostic", "rd", metric, 3, ratios=high)
            )
    diagnostics.append(
        Variant(rd_label(steps_metric, 5), "diagnostic", "rd", steps_metric, 5, ratios=high)
    )
    return [
        *diagnostics,
        Variant(rd_label("prob-mse", cap=True), "diagnostic", "rd", "prob-mse", cap=True),
        Variant(
            rd_label("mse", levels=21, cap=True),
            "diagnostic",
            "rd",
            levels=21,
            cap=True,
            ratios=high,
        ),
    ]


def minilm_task(args: argparse.Namespace, work: Path) -> Task:
    """all-MiniLM-L6-v2 (``models/minilm/``), calibrated on 32 docstring texts, scored by
    retrieval on held-out (query, document) pairs."""
    quick = args.quick
    folder = ROOT / "models" / "minilm"
    if not (folder / "minilm.onnx").is_file():
        raise SystemExit(
            f"{folder / 'minilm.onnx'} is missing: run scripts/export_minilm.py first "
            "(see models/README.md), or pass --models digits"
        )
    rd = [Variant(rd_label(m), "rd", "rd", metric=m) for m in args.minilm_metrics]
    if args.minilm_steps > 1:
        rd.append(Variant(rd_label("mse", args.minilm_steps), "rd", "rd", "mse", args.minilm_steps))
    baselines = baseline_variants(("global",) if quick else BASELINES)
    peers = ("magnitude-global",) if quick else tuple(ONNXSIM_PASSES)
    peer_variants, notes = minilm_peers(args, peers)
    if args.minilm_steps <= 1:
        notes.append(
            "iterative rd skipped on MiniLM: each extra step re-measures all 36 curves on the "
            "partly pruned model, for every ratio (2 x 5 more curve sets at 3 steps)"
        )
    if args.diagnose_minilm:
        rd += minilm_diagnostics(args)
    return Task(
        name="minilm",
        title="all-MiniLM-L6-v2 (36 MatMul layers, 10,616,832 prunable weights)",
        model=folder / "minilm.onnx",
        # quick: 8 texts and 11 levels, so that the smoke run measures curves in ~1 min
        calib=(
            calib_subset(folder / "calib_small.npz", 8, work)
            if quick
            else folder / "calib_small.npz"
        ),
        levels=11 if quick else args.minilm_levels,
        metrics=EMBEDDING_METRICS,
        score="recall_at_1",
        score_label=f"retrieval recall@1 ({args.pairs or 300} docstring pairs)",
        extra_scores=("mrr", "recall_at_5", "cosine"),
        variants=[*rd, *baselines, *peer_variants],
        score_fn=minilm_scorer(folder, args.pairs, args.threads),
        notes=notes,
        refit_solver=(args.minilm_refit_solver if "minilm" in args.reconstruct_models else None),
        compares=minilm_compares(args, folder, work),
    )


def minilm_peers(args: argparse.Namespace, peers: Sequence[str]) -> tuple[list[Variant], list[str]]:
    """onnxsim's rows on MiniLM (SparseGPT at ``--minilm-sparsegpt-ratios`` only), and the note
    that says so."""
    peer_variants = onnxsim_variants(peers)
    notes = []
    if "sparsegpt" in peers and args.minilm_sparsegpt_ratios != args.ratios:
        peer_variants = [
            replace(v, ratios=tuple(args.minilm_sparsegpt_ratios)) if v.method == "sparsegpt" else v
            for v in peer_variants
        ]
        skipped = [r for r in args.ratios if r not in args.minilm_sparsegpt_ratios]
        if skipped:
            notes.append(
                "onnxsim SparseGPT on MiniLM ran at "
                + ", ".join(f"{r:g}" for r in args.minilm_sparsegpt_ratios)
                + " only (--minilm-sparsegpt-ratios): one call takes 4-18 min on this shared "
                "2-core machine (265 s and 1,092 s measured, depending on the load; 184 s of "
                "CPU even with 2 calibration texts of 16 tokens, so the cost is "
                "its per-layer float64 Hessian work, not the data)"
            )
    return peer_variants, notes


def minilm_diagnostics(args: argparse.Namespace) -> list[Variant]:
    """``--diagnose-minilm``: rd on 8 calibration texts (as is, on the pre-normalisation vector,
    on 41 levels; 8 texts keep each extra curve set to a quarter of the main one) and capped."""
    high = tuple(sorted(args.ratios)[-3:])
    diag = [
        Variant(rd_label("mse", calib=8), "diagnostic", "rd", calib_samples=8),
        Variant(
            rd_label("mse", calib=8, output="pre-norm"),
            "diagnostic",
            "rd",
            calib_samples=8,
            output="pre-norm",
        ),
        Variant(
            rd_label("mse", levels=41, calib=8),
            "diagnostic",
            "rd",
            levels=41,
            calib_samples=8,
        ),
    ]
    return [
        *(replace(v, ratios=high) for v in diag),
        Variant(
            rd_label("mse", cap=True),
            "diagnostic",
            "rd",
            cap=True,
            ratios=tuple(r for r in args.ratios if r >= 0.7),
        ),
    ]


def minilm_compares(args: argparse.Namespace, folder: Path, work: Path) -> list[Compare]:
    """MiniLM rows refit again: with ``--minilm-refit-compare``'s solver, and on the files of
    ``--minilm-refit-data`` / ``--minilm-refit-unpadded``."""
    compares = (
        [
            Compare(
                args.minilm_refit_compare,
                tuple(args.minilm_refit_compare_rows),
                ratios=tuple(args.minilm_refit_compare_ratios) or None,
            )
        ]
        if args.minilm_refit_compare
        else []
    )
    data = [
        *args.minilm_refit_data,
        *(unpadded_calib(folder / "calib.npz", n, work) for n in args.minilm_refit_unpadded),
    ]
    return compares + [
        Compare(
            args.minilm_refit_data_solver,
            tuple(args.minilm_refit_data_rows),
            path,
            tuple(args.minilm_refit_data_ratios) or None,
        )
        for path in data
    ]
