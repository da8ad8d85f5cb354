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

Outputs in ``--out-dir`` (default ``docs``): ``benchmark_methods.json`` (configuration,
versions, timings, every row), ``benchmark.md`` (the tables) and ``benchmark_methods.png``
(task metric vs ratio, one line per method; rd predicted vs measured distortion).

Run from the repository root in the benchmark virtualenv, which has onnxsim (never a
dependency of the library)::

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install -e . onnxsim==0.8.1 matplotlib
    .venv-bench/bin/python scripts/benchmark_methods.py              # full run
    .venv-bench/bin/python scripts/benchmark_methods.py --quick      # smoke run, ~3 min cold

Curves are cached in ``--cache-dir`` (default ``/tmp/rdprune-bench-cache``): each
(model, data, metric, levels) set is measured once and reused across ratios and reruns.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import rdprune_onnx
from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.allocate import AllocationProblem, Curve, LayerSpec, get_allocator
from rdprune_onnx.curves import Reference, run_reference
from rdprune_onnx.distortion import DistortionMeter
from rdprune_onnx.evaluate import accuracy
from rdprune_onnx.graph.cut import upstream
from rdprune_onnx.graph.layers import Layer, find_layers, read_weight
from rdprune_onnx.graph.load import load_model
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask
from rdprune_onnx.pipeline import load_calibration
from rdprune_onnx.reconstruct import SOLVERS, reconstruct
from rdprune_onnx.runtime import Session, SessionConfig, versions

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.5, 0.7, 0.8, 0.9, 0.95)
QUICK_RATIOS = (0.5, 0.9)
BASELINES = ("uniform", "uniform-plus", "global", "lamp", "erk")
CLASS_METRICS = ("mse", "worst", "prob-mse", "kl")  # for class-score outputs
EMBEDDING_METRICS = ("mse", "worst")  # softmax metrics make no sense on an L2-normalised vector
MODELS = ("digits", "minilm")
# MiniLM's mean-pooled sentence vector before the L2 normalisation (the input of the final Div).
PRE_NORM = {"pre-norm": "/Div_output_0"}
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "rdprune-bench-cache"
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


ONNXSIM_PASSES: dict[str, str] = {
    "magnitude": "onnxsim magnitude (per row)",
    "magnitude-global": "onnxsim magnitude (global)",
    "wanda": "onnxsim Wanda (per row)",
    "wanda-global": "onnxsim Wanda (global)",
    "sparsegpt": "onnxsim SparseGPT",
}


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


def digits_scorer(test_path: Path) -> Callable[[Session], dict[str, float]]:
    with np.load(test_path) as f:
        inputs = np.asarray(f["input"])
        labels = np.asarray(f["label"])

    def score(session: Session) -> dict[str, float]:
        logits = np.concatenate(
            [session.run({"input": inputs[s : s + 256]})[0] for s in range(0, len(inputs), 256)]
        )
        return {"accuracy": accuracy(logits, labels)}

    return score


def minilm_scorer(
    folder: Path, pairs: int | None, threads: int
) -> Callable[[Session], dict[str, float]]:
    """Retrieval figures, and the mean cosine of each held-out embedding to the dense one."""
    import retrieval  # scripts/retrieval.py (the folder is put on sys.path by main)

    queries, docs = retrieval.load_pairs(folder)
    if pairs is not None:
        queries = {k: v[:pairs] for k, v in queries.items()}
        docs = {k: v[:pairs] for k, v in docs.items()}
    dense_session = Session(
        load_model(folder / "minilm.onnx"), SessionConfig(provider="cpu", intra_op_threads=threads)
    )
    dense = (retrieval.embed(dense_session, queries), retrieval.embed(dense_session, docs))
    del dense_session

    def score(session: Session) -> dict[str, float]:
        result: dict[str, float] = retrieval.evaluate(session, queries, docs, dense=dense)
        return result

    return score


def make_tasks(args: argparse.Namespace, work: Path) -> list[Task]:
    tasks = []
    quick = args.quick
    if "digits" in args.models:
        steps_metric = args.steps_metric
        rd = [Variant(rd_label(m), "rd", "rd", metric=m) for m in CLASS_METRICS]
        rd.append(Variant(rd_label(steps_metric, 3), "rd", "rd", metric=steps_metric, steps=3))
        if quick:
            rd = [rd[0], rd[3]]
        diagnostics: list[Variant] = []
        if args.diagnose:
            high = tuple(sorted(args.ratios)[-2:])  # where the methods part
            for metric in ("mse", "kl"):
                for levels in (21, 51):
                    diagnostics.append(
                        Variant(
                            rd_label(metric, levels=levels), "diagnostic", "rd", metric, 1, levels
                        )
                    )
                for n in (64, 128):
                    diagnostics.append(
                        Variant(
                            rd_label(metric, calib=n), "diagnostic", "rd", metric, calib_samples=n
                        )
                    )
            for metric in ("mse", "prob-mse", "kl"):
                if metric != steps_metric:
                    diagnostics.append(
                        Variant(rd_label(metric, 3), "diagnostic", "rd", metric, 3, ratios=high)
                    )
            diagnostics.append(
                Variant(rd_label(steps_metric, 5), "diagnostic", "rd", steps_metric, 5, ratios=high)
            )
            diagnostics += [
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
        baselines = baseline_variants(("global", "lamp") if quick else BASELINES)
        peers = ("magnitude-global", "sparsegpt") if quick else tuple(ONNXSIM_PASSES)
        tasks.append(
            Task(
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
        )
    if "minilm" in args.models:
        folder = ROOT / "models" / "minilm"
        if not (folder / "minilm.onnx").is_file():
            raise SystemExit(
                f"{folder / 'minilm.onnx'} is missing: run scripts/export_minilm.py first "
                "(see models/README.md), or pass --models digits"
            )
        rd = [Variant(rd_label(m), "rd", "rd", metric=m) for m in args.minilm_metrics]
        if args.minilm_steps > 1:
            rd.append(
                Variant(rd_label("mse", args.minilm_steps), "rd", "rd", "mse", args.minilm_steps)
            )
        baselines = baseline_variants(("global",) if quick else BASELINES)
        peers = ("magnitude-global",) if quick else tuple(ONNXSIM_PASSES)
        peer_variants = onnxsim_variants(peers)
        notes = []
        if "sparsegpt" in peers and args.minilm_sparsegpt_ratios != args.ratios:
            peer_variants = [
                replace(v, ratios=tuple(args.minilm_sparsegpt_ratios))
                if v.method == "sparsegpt"
                else v
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
        if args.minilm_steps <= 1:
            notes.append(
                "iterative rd skipped on MiniLM: each extra step re-measures all 36 curves on the "
                "partly pruned model, for every ratio (2 x 5 more curve sets at 3 steps)"
            )
        if args.diagnose_minilm:
            # 8 calibration texts keep each extra curve set to a quarter of the main one.
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
            rd += [replace(v, ratios=high) for v in diag]
            rd.append(
                Variant(
                    rd_label("mse", cap=True),
                    "diagnostic",
                    "rd",
                    cap=True,
                    ratios=tuple(r for r in args.ratios if r >= 0.7),
                )
            )
        tasks.append(
            Task(
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
                refit_solver=(
                    args.minilm_refit_solver if "minilm" in args.reconstruct_models else None
                ),
                compares=(
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
                + [
                    Compare(
                        args.minilm_refit_data_solver,
                        tuple(args.minilm_refit_data_rows),
                        path,
                        tuple(args.minilm_refit_data_ratios) or None,
                    )
                    for path in [
                        *args.minilm_refit_data,
                        *(
                            unpadded_calib(folder / "calib.npz", n, work)
                            for n in args.minilm_refit_unpadded
                        ),
                    ]
                ],
            )
        )
    return tasks


# ------------------------------------------------------------------------------ measuring


def calib_subset(path: Path, n: int, folder: Path) -> Path:
    """The first ``n`` samples of a calibration file, written to ``folder`` (cached by name)."""
    out = folder / f"{path.stem}.first{n}.npz"
    if not out.exists():
        with np.load(path) as f:
            np.savez(out, **{k: np.asarray(f[k])[:n] for k in f.files})
    return out


def unpadded_calib(path: Path, length: int, folder: Path) -> Path:
    """The texts of a token calibration file with at least ``length`` tokens, cut to
    ``length`` (the last kept token replaced by [SEP]): every row a real token, no padding."""
    out = folder / f"{path.stem}.unpadded{length}.npz"
    if not out.exists():
        with np.load(path) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
        keep = arrays["attention_mask"].sum(axis=1) >= length
        cut = {k: np.ascontiguousarray(v[keep, :length]) for k, v in arrays.items()}
        cut["input_ids"][:, length - 1] = 102  # [SEP] of the BERT vocabulary
        np.savez(out, **cut)
    return out


@dataclass
class DenseLayers:
    """The dense model's prunable layers and where each weight enters the graph."""

    layers: list[Layer]
    slots: dict[str, tuple[int, int]]  # weight name -> (node index, input slot) of its first use

    @classmethod
    def of(cls, dense: onnx.ModelProto) -> DenseLayers:
        layers = find_layers(dense).layers
        names = {layer.name for layer in layers}
        slots: dict[str, tuple[int, int]] = {}
        for index, node in enumerate(dense.graph.node):
            for slot, tensor in enumerate(node.input):
                if tensor in names and tensor not in slots:
                    slots[tensor] = (index, slot)
        missing = names - set(slots)
        if missing:  # a weight used only inside a subgraph: not in these two models
            raise RuntimeError(f"weights not used by a main-graph node: {sorted(missing)}")
        return cls(layers, slots)

    @property
    def total(self) -> int:
        return sum(layer.size for layer in self.layers)

    def weights(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """Each layer's weight as it is in ``model``, found by node position and input slot.

        onnxsim's passes write the pruned weight as a new initializer (``_v_N``) and point the
        node at it, leaving the original unused, so weights are matched through the nodes.
        """
        inits = {t.name: t for t in model.graph.initializer}
        consts = {
            node.output[0]: attr.t
            for node in model.graph.node
            if node.op_type == "Constant"
            for attr in node.attribute
            if attr.name == "value"
        }
        out: dict[str, np.ndarray] = {}
        for name, (index, slot) in self.slots.items():
            tensor_name = model.graph.node[index].input[slot]
            tensor = inits.get(tensor_name) or consts.get(tensor_name)
            if tensor is None:
                raise RuntimeError(f"{name}: node {index} input {slot} is not a constant")
            out[name] = onnx.numpy_helper.to_array(tensor)
        return out


def measure_model(
    model: onnx.ModelProto,
    task: Task,
    reference: Reference,
    dense_layers: DenseLayers,
    config: SessionConfig,
) -> dict[str, Any]:
    """Sparsity over the dense model's prunable layers, calibration distortions, task scores."""
    zeros = {n: int(np.count_nonzero(w == 0)) for n, w in dense_layers.weights(model).items()}
    session = Session(model, config)
    meters = {metric: DistortionMeter(metric) for metric in task.metrics}
    for feeds, ref in zip(reference.batches, reference.values, strict=True):
        out = session.run(feeds, reference.outputs)
        for meter in meters.values():
            meter.add(ref, out)
    t = time.perf_counter()
    assert task.score_fn is not None
    scores = task.score_fn(session)
    return {
        "achieved_ratio": sum(zeros.values()) / dense_layers.total,
        "layer_ratios": {
            layer.name: zeros[layer.name] / layer.size for layer in dense_layers.layers
        },
        "distortion": {metric: meter.value() for metric, meter in meters.items()},
        "scores": scores,
        "eval_s": time.perf_counter() - t,
    }


def run_onnxsim(
    pass_name: str, model: onnx.ModelProto, ratio: float, batches: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
    from onnxsim import pruning

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if pass_name == "magnitude":
        return pruning.apply_magnitude_pruning(copy, sparsity=ratio)
    if pass_name == "magnitude-global":
        return pruning.apply_magnitude_pruning(copy, sparsity=ratio, global_sparsity=True)
    if pass_name == "wanda":
        return pruning.apply_wanda_pruning(copy, calibration_data=batches, sparsity=ratio)
    if pass_name == "wanda-global":
        return pruning.apply_wanda_pruning(
            copy, calibration_data=batches, sparsity=ratio, global_sparsity=True
        )
    if pass_name == "sparsegpt":
        return pruning.apply_sparsegpt_pruning(copy, calibration_data=batches, sparsity=ratio)
    raise ValueError(pass_name)


def with_output(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """``model`` with ``tensor`` (float, rank 2) as its only output; nodes after it removed."""
    rank2 = onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, ["batch", None])
    return upstream(model, [tensor], output_types={tensor: rank2})


def onnxsim_version() -> str | None:
    try:
        import onnxsim
    except ImportError:
        return None
    return str(getattr(onnxsim, "__version__", "unknown"))


def curve_sum(curves: Mapping[str, Curve], ratios: Mapping[str, float]) -> float:
    """The rd objective of an allocation: the sum of single-layer distortions (interpolated)."""
    return float(
        sum(
            np.interp(ratios[name], curve.ratios, curve.distortion)
            for name, curve in curves.items()
        )
    )


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def run_task(
    task: Task,
    args: argparse.Namespace,
    work: Path,
    done: Mapping[tuple[str, float], dict[str, Any]] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every row of ``task``; rows found in ``done`` (resumed runs) are kept, not recomputed.

    A resumed row of our methods that lacks a score the scorer now gives (MiniLM's ``cosine``)
    is recomputed (``--rescore ours``; ``all`` also recomputes onnxsim rows). ``save`` gets the
    task's record after every row, so that an interrupted run can be resumed.
    """
    done = dict(done or {})
    # One intra-op thread: on 2 shared cores it embedded the 600 MiniLM texts in 14-16 s,
    # against 19-22 s with 2 threads.
    config = SessionConfig(provider="cpu", intra_op_threads=args.threads)
    print(f"\n=== {task.name}: {task.title}", flush=True)
    t0 = time.perf_counter()
    dense = load_model(task.model)
    dense_layers = DenseLayers.of(dense)
    data, batch_size = load_calibration(dense, CalibrationSpec(data=task.calib))
    reference = run_reference(dense, data, batch_size, config)
    dense_row = measure_model(dense, task, reference, dense_layers, config)
    dense_row["eval_s"] = 0.0
    print(f"dense: {fmt_scores(task, dense_row['scores'])}", flush=True)
    score_keys = set(dense_row["scores"])
    has_onnxsim = onnxsim_version() is not None
    skipped: list[str] = []
    rows: dict[tuple[str, float], dict[str, Any]] = {}
    errors: list[dict[str, Any]] = []
    measured: dict[str, tuple[str, dict[str, Any]]] = {}  # weights digest -> (row, measurement)
    refits: dict[str, dict[str, Any]] = {}  # masked weights digest -> reconstructed row
    for row in done.values():
        if row.get("reconstruct") and "mask_digest" in row and "same_as" not in row:
            key = f"{row['mask_digest']} {row['solver']} {row.get('refit_calib_samples')}"
            refits.setdefault(key, row)
    curves: dict[str, dict[str, Curve]] = {}  # metric -> one-shot curves on the dense model
    resumed = [0]  # rows taken from --resume
    order = {v.label: i for i, v in enumerate(task.variants)}

    def record() -> dict[str, Any]:
        def key(row: Mapping[str, Any]) -> tuple[int, bool, float]:
            base = row.get("base", row["label"])
            return (order.get(base, len(order)), bool(row.get("reconstruct")), row["ratio"])

        return {
            "name": task.name,
            "title": task.title,
            "model": _shown(task.model),
            "calibration": _shown(task.calib),
            "calibration_samples": len(next(iter(data.values()))),
            "batch_size": batch_size,
            "levels": task.levels,
            "metrics": list(task.metrics),
            "score": task.score,
            "score_label": task.score_label,
            "extra_scores": list(task.extra_scores),
            "refit_solver": task.refit_solver,
            "layers": {layer.name: layer.size for layer in dense_layers.layers},
            "dense": dense_row,
            "rows": sorted(rows.values(), key=key),
            "resumed_rows": resumed[0],
            "notes": task.notes,
            "errors": errors,
            "seconds": time.perf_counter() - t0,
        }

    def complete(row: Mapping[str, Any]) -> bool:
        if score_keys <= set(row["scores"]) or args.rescore == "none":
            return True
        return args.rescore == "ours" and row["family"] == "onnxsim"

    def failed(label: str, ratio: float, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        errors.append({"label": label, "ratio": ratio, "error": message})
        print(f"{label:<34} {ratio:.2f}  FAILED: {message}", flush=True)

    # Our methods first (uniform-plus last of them), then onnxsim: an interrupted MiniLM run
    # has the main rows and their reconstruction first.
    def priority(v: Variant) -> tuple[int, int]:
        rank = 2 if v.family == "onnxsim" else 1 if v.method == "uniform-plus" else 0
        return (rank, order[v.label])

    def process(variant: Variant) -> None:
        if args.only_diagnostics and variant.family != "diagnostic":
            return
        if variant.family == "onnxsim" and not has_onnxsim:
            if variant.label not in skipped:
                skipped.append(variant.label)
            return
        refit = task.refit_solver is not None and variant.family in ("rd", "baseline")
        ratios = variant.ratios or tuple(args.ratios)
        for ratio in ratios:
            if ratio not in args.ratios:
                continue
            model: onnx.ModelProto | None = None
            prior = done.get((variant.label, ratio))
            if prior is not None and complete(prior):
                rows[(variant.label, ratio)] = prior
                resumed[0] += 1
            else:
                try:
                    row, model = run_variant(
                        task,
                        variant,
                        ratio,
                        dense,
                        data,
                        batch_size,
                        reference,
                        dense_layers,
                        config,
                        work,
                        args.cache_dir,
                        measured,
                    )
                except Exception as exc:  # one failing row must not lose the whole run
                    failed(variant.label, ratio, exc)
                    continue
                if prior is not None:
                    row["rescored"] = True
                    before, after = prior["scores"][task.score], row["scores"][task.score]
                    if abs(before - after) > 1e-9:
                        task.notes.append(
                            f"{variant.label} at {ratio:g} rescored: {task.score} {before:.4f} "
                            f"in the resumed run, {after:.4f} now"
                        )
                curves_here = row.pop("curves", None)
                if (
                    curves_here
                    and variant.steps == 1
                    and variant.calib_samples is None
                    and (variant.levels or task.levels) == task.levels
                ):
                    curves.setdefault(variant.metric, curves_here)
                rows[(variant.label, ratio)] = row
                print(fmt_row(task, row), flush=True)
                if save is not None:
                    save(record())
            if not refit or (variant.refit_label, ratio) in done:
                if refit:
                    rows[(variant.refit_label, ratio)] = done[(variant.refit_label, ratio)]
                    resumed[0] += 1
                continue
            assert task.refit_solver is not None
            refit_row(variant, ratio, model, task.refit_solver, variant.refit_label)

    def refit_row(
        variant: Variant,
        ratio: float,
        model: onnx.ModelProto | None,
        solver: str,
        label: str,
        refit_data: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        try:
            if model is None:  # the plain row was resumed: the same masks again
                model = build_ours(
                    task, variant, ratio, dense, dense_layers, batch_size, work, args.cache_dir
                )[0]
            row = run_reconstruct(
                task,
                variant,
                ratio,
                model,
                dense,
                data if refit_data is None else refit_data,
                batch_size,
                reference,
                dense_layers,
                config,
                solver,
                refits,
                label,
            )
        except Exception as exc:  # one failing row must not lose the whole run
            failed(label, ratio, exc)
            return
        plain = rows.get((variant.label, ratio))
        if plain is not None and plain["layer_ratios"] != row["layer_ratios"]:
            task.notes.append(
                f"{label} at {ratio:g}: the re-pruned masks differ from the plain row's "
                "(per-layer ratios)"
            )
        rows[(label, ratio)] = row
        print(fmt_row(task, row), flush=True)
        if save is not None:
            save(record())

    variants = sorted(task.variants, key=priority)
    for variant in variants:
        if variant.family != "onnxsim":
            process(variant)
    # The same masks refit with another solver (--minilm-refit-compare) or on other data
    # (--digits-refit-data, --minilm-refit-data), for a few methods.
    for compare in task.compares if task.refit_solver is not None else []:
        compare_data = None
        tag = compare.solver
        if compare.data is not None:
            compare_data = load_calibration(dense, CalibrationSpec(data=compare.data))[0]
            first = next(iter(compare_data.values()))
            shape = "x".join(map(str, first.shape[:2] if first.ndim == 2 else first.shape[:1]))
            tag = f"{shape} calib"
        for variant in variants:
            if variant.label not in compare.labels:
                continue
            label = f"{variant.refit_label} ({tag})"
            for ratio in compare.ratios or variant.ratios or tuple(args.ratios):
                if ratio not in args.ratios:
                    continue
                if (label, ratio) in done:
                    rows[(label, ratio)] = done[(label, ratio)]
                    resumed[0] += 1
                else:
                    refit_row(variant, ratio, None, compare.solver, label, compare_data)
    for variant in variants:
        if variant.family == "onnxsim":
            process(variant)
    # Resumed rows this run did not ask for (other ratios or compare settings) are kept.
    for key, row in done.items():
        if key not in rows and not (args.only_diagnostics and row["family"] != "diagnostic"):
            rows[key] = row
            resumed[0] += 1
    # Score every allocation of our methods with the rd objective of each metric.
    for row in rows.values():
        if row["family"] != "onnxsim" and not row.get("reconstruct") and curves:
            sums = {m: curve_sum(c, row["layer_ratios"]) for m, c in curves.items()}
            row["curve_sum"] = {**row.get("curve_sum", {}), **sums}
    if skipped:
        task.notes.append(
            "onnxsim is not importable in this environment: skipped " + ", ".join(skipped)
        )
    return record()


def build_ours(
    task: Task,
    variant: Variant,
    ratio: float,
    dense: onnx.ModelProto,
    dense_layers: DenseLayers,
    batch_size: int,
    work: Path,
    cache_dir: Path,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The model our ``variant`` prunes to ``ratio`` (plain masks), and the row's fields."""
    calib_path = task.calib
    if variant.calib_samples is not None:
        calib_path = calib_subset(task.calib, variant.calib_samples, work)
    levels = variant.levels or task.levels
    settings = PruneSettings(
        ratio=ratio,
        method=variant.method,
        metric=variant.metric,
        levels=levels,
        provider="cpu",
        steps=variant.steps,
    )
    model_path = task.model
    if variant.output is not None:
        model_path = work / f"{task.model.stem}.{variant.output}.onnx"
        if not model_path.exists():
            onnx.save(with_output(dense, PRE_NORM[variant.output]), str(model_path))
    result = prune(
        model_path,
        settings,
        CalibrationSpec(data=calib_path, batch_size=batch_size),
        write=False,
        cache_dir=cache_dir,
    )
    assert result.model is not None
    model = result.model
    predicted = result.predicted_distortion
    if variant.cap:
        assert result.curves is not None
        model, predicted = capped_allocation(dense, dense_layers, result.curves, ratio, levels)
    if variant.output is not None:  # the same weights in the unmodified model
        model = replace_weights(
            dense, {layer.name: read_weight(model, layer.name) for layer in dense_layers.layers}
        )
    fields: dict[str, Any] = {
        "metric": variant.metric,
        "steps": variant.steps,
        "levels": levels,
        "calib_samples": result.samples,
        "predicted": predicted,
        # the capped model is not the one prune() verified: measured by measure_model
        "measured": None if variant.cap else result.measured_distortion,
        "timings": result.timings,
    }
    if variant.method == "rd":
        fields["curves"] = result.curves
    return model, fields


def run_variant(
    task: Task,
    variant: Variant,
    ratio: float,
    dense: onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    batch_size: int,
    reference: Reference,
    dense_layers: DenseLayers,
    config: SessionConfig,
    work: Path,
    cache_dir: Path,
    measured: dict[str, tuple[str, dict[str, Any]]],
) -> tuple[dict[str, Any], onnx.ModelProto]:
    """The row of ``variant`` at ``ratio``, and the pruned model it measured."""
    row: dict[str, Any] = {
        "label": variant.label,
        "family": variant.family,
        "method": variant.method,
        "ratio": ratio,
    }
    t = time.perf_counter()
    if variant.ours:
        model, fields = build_ours(
            task, variant, ratio, dense, dense_layers, batch_size, work, cache_dir
        )
        row.update(fields)
    else:
        batches = [
            {k: v[s : s + batch_size] for k, v in data.items()}
            for s in range(0, len(next(iter(data.values()))), batch_size)
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = run_onnxsim(variant.method, dense, ratio, batches)
    row["prune_s"] = time.perf_counter() - t
    # A model whose prunable weights equal an earlier row's (onnxsim's global magnitude is our
    # global allocation) is not run again: its measurement is copied.
    key = weights_digest(dense_layers.weights(model))
    if key in measured:
        row.update(measured[key][1], same_as=measured[key][0], eval_s=0.0)
    else:
        measured[key] = (
            f"{variant.label} @ {ratio:g}",
            measure_model(model, task, reference, dense_layers, config),
        )
        row.update(measured[key][1])
    if row.get("method") == "rd" and row.get("measured") is None:
        row["measured"] = row["distortion"].get(row["metric"])
    return row, model


def run_reconstruct(
    task: Task,
    variant: Variant,
    ratio: float,
    masked: onnx.ModelProto,
    dense: onnx.ModelProto,
    data: Mapping[str, np.ndarray],
    batch_size: int,
    reference: Reference,
    dense_layers: DenseLayers,
    config: SessionConfig,
    solver: str,
    refits: dict[str, dict[str, Any]],
    label: str,
) -> dict[str, Any]:
    """``variant``'s masks at ``ratio`` with the kept weights refit (what ``--reconstruct`` does).

    The same call as the pipeline's: :func:`rdprune_onnx.reconstruct.reconstruct` on the
    dense model, the masked weights and the task's calibration data, with ONNX Runtime's
    default threads. Masks already refit by an earlier row (same masked weights) are not
    refit again: that row's measurement is copied.
    """
    pruned = dense_layers.weights(masked)
    digest = weights_digest(pruned)
    samples = len(next(iter(data.values())))
    row: dict[str, Any] = {
        "label": label,
        "family": variant.family,
        "method": variant.method,
        "ratio": ratio,
        "reconstruct": True,
        "base": variant.label,
        "metric": variant.metric,
        "steps": variant.steps,
        "solver": solver,
        "compare": label != variant.refit_label,  # another solver or data, the same masks
        "mask_digest": digest,
        "refit_calib_samples": samples,
        "prune_s": 0.0,
    }
    earlier = refits.get(f"{digest} {solver} {samples}")
    if earlier is not None:
        keep = ("achieved_ratio", "layer_ratios", "distortion", "scores", "refit", "refit_summary")
        row.update({k: earlier[k] for k in keep if k in earlier})
        row.update(
            same_as=f"{earlier['label']} @ {earlier['ratio']:g}", reconstruct_s=0.0, eval_s=0.0
        )
        return row
    warned = _Collect()
    logger = logging.getLogger("rdprune_onnx.reconstruct")
    logger.addHandler(warned)
    t = time.perf_counter()
    try:
        refit = reconstruct(
            dense,
            pruned,
            dense_layers.layers,
            data,
            batch_size=batch_size,
            config=SessionConfig(provider="cpu"),
            solver=solver,
        )
    finally:
        logger.removeHandler(warned)
    row["reconstruct_s"] = time.perf_counter() - t
    row["refit_warnings"] = warned.messages
    model = replace_weights(dense, {**pruned, **refit.all_weights()})
    layers: dict[str, dict[str, Any]] = {
        r.name: {
            "method": r.method,
            "error_before": None if math.isnan(r.error_before) else r.error_before,
            "error_after": None if math.isnan(r.error_after) else r.error_after,
            "seconds": r.seconds,
            "reason": r.reason,
        }
        for r in refit.layers
    }
    solvers: dict[str, int] = {}
    for info in layers.values():
        solvers[info["method"]] = solvers.get(info["method"], 0) + 1
    row["refit"] = layers
    row["refit_summary"] = {
        "solvers": solvers,
        "kept_mask": sum(1 for i in layers.values() if i["reason"] and "kept mask" in i["reason"]),
        "error_before": sum(i["error_before"] or 0.0 for i in layers.values()),
        "error_after": sum(i["error_after"] or 0.0 for i in layers.values()),
    }
    row.update(measure_model(model, task, reference, dense_layers, config))
    refits[f"{digest} {solver} {samples}"] = row
    return row


class _Collect(logging.Handler):
    """The warnings the refit logs (fewer calibration rows than a layer has inputs)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def capped_allocation(
    dense: onnx.ModelProto,
    dense_layers: DenseLayers,
    curves: Mapping[str, Curve],
    ratio: float,
    levels: int,
) -> tuple[onnx.ModelProto, float]:
    """rd's allocation on ``curves`` with each layer at most at the last grid level below 1."""
    cap = 1.0 - 1.0 / (levels - 1)
    problem = AllocationProblem(
        layers=[LayerSpec(layer.name, layer.shape, max_ratio=cap) for layer in dense_layers.layers],
        target_ratio=ratio,
        curves=curves,
        options={"allow_layer_removal": False},
    )
    allocation = get_allocator("rd").allocate(problem)
    weights = {
        layer.name: apply_mask(read_weight(dense, layer.name), int(allocation.counts[layer.name]))
        for layer in dense_layers.layers
    }
    predicted = float(sum(allocation.predicted.values())) if allocation.predicted else float("nan")
    return replace_weights(dense, weights), predicted


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(weights[name]).tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------ reporting


def fmt_scores(task: Task, scores: Mapping[str, float]) -> str:
    keys = (task.score, *task.extra_scores)
    return "  ".join(f"{k} {scores[k]:.4f}" for k in keys if k in scores)


def fmt_row(task: Task, row: Mapping[str, Any]) -> str:
    extra = f"  (same model as {row['same_as']})" if "same_as" in row else ""
    if row.get("predicted") is not None and row["method"] == "rd":
        extra += f"  predicted {row['predicted']:.4g} measured {row['measured']:.4g}"
    if row.get("reconstruct"):
        extra += f"  refit {row['reconstruct_s']:.1f}s ({row['solver']})"
    return (
        f"{row['label']:<34} {row['ratio']:.2f}  sparsity {row['achieved_ratio']:.4f}  "
        f"{fmt_scores(task, row['scores'])}{extra}  ({row['prune_s']:.1f}s + {row['eval_s']:.1f}s)"
    )


def main_rows(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the main table: no diagnostics, no reconstruction."""
    return [r for r in task["rows"] if r["family"] != "diagnostic" and not r.get("reconstruct")]


def refit_rows(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the reconstruction table: each refit method after its plain row, then
    the same masks refit with a second solver, then onnxsim's SparseGPT and Wanda."""
    rows = task["rows"]
    refit = [r for r in rows if r.get("reconstruct")]
    bases = {r["base"] for r in refit}
    out = []
    for label in labels_in_order(main_rows(task)):
        if label in bases:
            out += [r for r in rows if r["label"] == label and not r.get("reconstruct")]
            out += [r for r in refit if r["base"] == label and not r.get("compare")]
    out += [r for r in refit if r.get("compare")]
    for label in RECONSTRUCT_PEERS:
        out += [r for r in rows if r["label"] == label]
    return out


def refit_cell(task: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The task figure; MiniLM: recall@1 / mean cosine to the dense embeddings."""
    text = f"{row['scores'][task['score']]:.3f}"
    if "cosine" in task["extra_scores"]:
        cosine = row["scores"].get("cosine")
        text += " / " + ("–" if cosine is None else f"{cosine:.3f}")
    return text


def ratio_table(
    head: str, labels: Sequence[str], ratios: Sequence[float], cell: Callable[[str, float], str]
) -> str:
    """Markdown: one row per label, one column per ratio, cells from ``cell``."""
    lines = [
        f"| {head} | " + " | ".join(f"{r:g}" for r in ratios) + " |",
        "| --- |" + " ---: |" * len(ratios),
    ]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell(label, r) for r in ratios) + " |")
    return "\n".join(lines)


def refit_table(task: Mapping[str, Any], ratios: Sequence[float]) -> str:
    """Markdown: with and without reconstruction, one column per ratio (best in bold)."""
    rows = refit_rows(task)
    key = task["score"]
    found = {(r["label"], r["ratio"]): r for r in rows}
    best = {
        ratio: max((r["scores"][key] for r in rows if r["ratio"] == ratio), default=None)
        for ratio in ratios
    }

    def cell(label: str, ratio: float) -> str:
        row = found.get((label, ratio))
        if row is None:
            return ""
        text = refit_cell(task, row)
        if best[ratio] is not None and row["scores"][key] >= best[ratio] - 1e-12:
            text = f"**{text}**"
        return text

    return ratio_table("method", labels_in_order(rows), ratios, cell)


def refit_time_table(task: Mapping[str, Any], ratios: Sequence[float]) -> str:
    """Markdown: seconds of each refit (the whole model), and the solvers it used."""
    rows = [r for r in task["rows"] if r.get("reconstruct")]
    found = {(r["label"], r["ratio"]): r for r in rows}

    def cell(label: str, ratio: float) -> str:
        row = found.get((label, ratio))
        if row is None:
            return ""
        if "same_as" in row:
            return f"= {row['same_as'].rsplit(' @ ', 1)[0]}"
        solvers = row.get("refit_summary", {}).get("solvers", {})
        used = "+".join(f"{n} {m}" for m, n in sorted(solvers.items()))
        return f"{row['reconstruct_s']:.1f} ({used})"

    return ratio_table("refit", labels_in_order(rows), ratios, cell)


def capped_rows(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for r in task["rows"] if r["family"] == "diagnostic" and "capped" in r["label"]]


def labels_in_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in rows))


def score_table(
    task: Mapping[str, Any], ratios: Sequence[float], rows: list[dict[str, Any]]
) -> str:
    """Markdown: one row per method, one column per ratio; the best of each column in bold."""
    key = task["score"]
    extra = "mrr" if "mrr" in task["extra_scores"] else None
    cell: dict[tuple[str, float], dict[str, Any]] = {(r["label"], r["ratio"]): r for r in rows}
    best = {
        ratio: max((r["scores"][key] for r in rows if r["ratio"] == ratio), default=None)
        for ratio in ratios
    }
    head = "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |"
    lines = [head, "| --- |" + " ---: |" * len(ratios)]
    for label in labels_in_order(rows):
        cells = []
        for ratio in ratios:
            row = cell.get((label, ratio))
            if row is None:
                cells.append("")
                continue
            value = row["scores"][key]
            text = f"{value:.3f}"
            if extra is not None:
                text += f" / {row['scores'][extra]:.3f}"
            if best[ratio] is not None and value >= best[ratio] - 1e-12:
                text = f"**{text}**"
            off = row["achieved_ratio"] - ratio
            if abs(off) > 0.002:
                text += f" (sparsity {row['achieved_ratio']:.3f})"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rd_vs_best(task: Mapping[str, Any], ratios: Sequence[float]) -> list[dict[str, Any]]:
    """Per ratio: the best rd line, the best other line, and the margin (rd minus other)."""
    key = task["score"]
    rows = main_rows(task)
    out = []
    for ratio in ratios:
        at = [r for r in rows if r["ratio"] == ratio]
        rd = [r for r in at if r["family"] == "rd"]
        other = [r for r in at if r["family"] != "rd"]
        if not rd or not other:
            continue
        best_rd = max(rd, key=lambda r: r["scores"][key])
        best_other = max(other, key=lambda r: r["scores"][key])
        oneshot = [r for r in rd if r.get("steps", 1) == 1]
        best_oneshot = max(oneshot, key=lambda r: r["scores"][key]) if oneshot else None
        out.append(
            {
                "ratio": ratio,
                "best_rd": best_rd["label"],
                "best_rd_score": best_rd["scores"][key],
                "best_one_shot_rd": best_oneshot["label"] if best_oneshot else None,
                "best_one_shot_rd_score": best_oneshot["scores"][key] if best_oneshot else None,
                "best_other": best_other["label"],
                "best_other_score": best_other["scores"][key],
                "margin": best_rd["scores"][key] - best_other["scores"][key],
                "rd_is_best": best_rd["scores"][key] >= best_other["scores"][key],
            }
        )
    return out


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties broken by position; None when undefined)."""
    if len(a) < 3:
        return None
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64))).astype(np.float64)
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64))).astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_analysis(task: Mapping[str, Any], ratios: Sequence[float]) -> list[dict[str, Any]]:
    """Does the rd objective order allocations the way the joint distortion and the task do?

    Over the distinct models our methods built at one ratio (rd with every metric and setting,
    and the baselines: all the same magnitude masks), Spearman correlations between the sum of
    single-layer distortions (the rd objective, from the one-shot curves of each metric), the
    measured joint distortion and the task figure (negated, so that + means "lower distortion,
    better task figure").
    """
    key = task["score"]
    out = []
    for ratio in ratios:
        at = [
            r
            for r in task["rows"]
            if r["family"] != "onnxsim"
            and r["ratio"] == ratio
            and "same_as" not in r
            and not r.get("reconstruct")
        ]
        if not at:
            continue
        for metric in task["metrics"]:
            have = [r for r in at if metric in r.get("curve_sum", {})]
            if len(have) < 3:
                continue
            summed = [r["curve_sum"][metric] for r in have]
            joint = [r["distortion"][metric] for r in have]
            score = [-r["scores"][key] for r in have]
            out.append(
                {
                    "ratio": ratio,
                    "metric": metric,
                    "models": len(have),
                    "sum_vs_measured": _spearman(summed, joint),
                    "measured_vs_task": _spearman(joint, score),
                    "sum_vs_task": _spearman(summed, score),
                }
            )
    return out


def write_markdown(record: Mapping[str, Any], path: Path) -> None:
    ratios = record["config"]["ratios"]
    out = [
        "# Benchmark: allocation methods and onnxsim's pruning passes",
        "",
        f"Written by `scripts/benchmark_methods.py` ({record['config']['date']}); command:",
        "",
        f"    {record['config']['command']}",
        "",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v is not None)
        + f". {record['host']['cpus']} CPU cores (shared; load average "
        + f"{record['host']['load_start']:.1f} at the start). Total "
        + f"{record['timings']['total_s'] / 60:.1f} min.",
        "",
        "All rows are one-shot post-training pruning (no fine-tuning). rdprune-onnx's methods "
        "share the same per-layer magnitude masks and exact-count rounding and differ only in the "
        "per-layer ratios; onnxsim's passes choose their own masks (Wanda: |w|·‖x‖; SparseGPT "
        "also rewrites the kept weights). A cell is the task figure at that sparsity (fraction "
        "of the prunable weights zeroed, counted over the same layers for every row); the best "
        "of each column is in bold; a row that missed the target by more than 0.002 shows the "
        "sparsity it reached.",
        "",
        "![metric vs ratio](benchmark_methods.png)",
        "",
    ]
    for task in record["tasks"]:
        rows = main_rows(task)
        dense = task["dense"]["scores"]
        score = task["score"]
        head = f"## {task['title']}: {task['score_label']}"
        if "mrr" in task["extra_scores"]:
            head += " / MRR"
        out += [head, ""]
        dense_text = f"{dense[score]:.3f}"
        if "mrr" in task["extra_scores"]:
            dense_text += f" / {dense['mrr']:.3f}"
        out += [
            f"Dense model: {dense_text}. Calibration: `{task['calibration']}` "
            f"({task['calibration_samples']} samples); rd grid: {task['levels']} levels.",
            "",
            score_table(task, ratios, rows),
            "",
        ]
        comparison = rd_vs_best(task, ratios)
        if comparison:
            out += [
                "rd against the best other row (margin = best rd minus best other):",
                "",
                "| ratio | best rd | score | best other | score | margin |",
                "| ---: | --- | ---: | --- | ---: | ---: |",
            ]
            for c in comparison:
                out.append(
                    f"| {c['ratio']:g} | {c['best_rd']} | {c['best_rd_score']:.3f} | "
                    f"{c['best_other']} | {c['best_other_score']:.3f} | {c['margin']:+.3f} |"
                )
            out.append("")
        rd_rows = [r for r in rows if r["method"] == "rd"]
        if rd_rows:
            out += [
                "rd: predicted distortion (sum of the chosen curve points) vs measured (the "
                "pruned model on the calibration data), in the row's own metric:",
                "",
                "| row | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                "| --- |" + " ---: |" * len(ratios),
            ]
            for label in labels_in_order(rd_rows):
                cells = []
                for ratio in ratios:
                    row = next(
                        (r for r in rd_rows if r["label"] == label and r["ratio"] == ratio), None
                    )
                    if row is None or row["predicted"] is None:
                        cells.append("")
                    else:
                        cells.append(
                            f"{row['predicted']:.3g} / {row['measured']:.3g} "
                            f"(×{row['predicted'] / max(row['measured'], 1e-300):.2f})"
                        )
                out.append(f"| {label} | " + " | ".join(cells) + " |")
            out.append("")
        sims = [r for r in rows if r["family"] == "onnxsim"]
        off = [r for r in sims if abs(r["achieved_ratio"] - r["ratio"]) > 0.002]
        if sims:
            if off:
                out.append("onnxsim rows whose sparsity over the prunable layers is off target:")
                out.append("")
                for r in off:
                    out.append(
                        f"- {r['label']} at {r['ratio']:g}: {r['achieved_ratio']:.4f} reached"
                    )
            else:
                out.append(
                    "Every onnxsim row reached its target sparsity (within 0.002) over the same "
                    "prunable layers as ours."
                )
            out.append("")
        ranks = record.get("rank_analysis", {}).get(task["name"], [])
        if ranks:
            out += [
                "Does the rd objective order allocations like the joint distortion and the task "
                "figure? Spearman correlations over the distinct models our methods built at "
                "each ratio (rd in every setting and the baselines; + means agreement):",
                "",
                "| ratio | metric | models | Σ curves vs measured | measured vs task | "
                "Σ curves vs task |",
                "| ---: | --- | ---: | ---: | ---: | ---: |",
            ]

            def rho(x: float | None) -> str:
                return "" if x is None else f"{x:+.2f}"

            for a in ranks:
                out.append(
                    f"| {a['ratio']:g} | {a['metric']} | {a['models']} | "
                    f"{rho(a['sum_vs_measured'])} | {rho(a['measured_vs_task'])} | "
                    f"{rho(a['sum_vs_task'])} |"
                )
            out.append("")
        same: dict[tuple[str, str], list[float]] = {}
        for r in rows:
            if "same_as" in r:
                other = r["same_as"].rsplit(" @ ", 1)[0]
                if other != r["label"]:
                    same.setdefault((r["label"], other), []).append(r["ratio"])
        if same:
            out += ["Rows that built exactly the same pruned weights as another row:", ""]
            for (label, other), at in same.items():
                out.append(f"- {label} = {other} at {', '.join(f'{x:g}' for x in at)}")
            out.append("")
        if any(r.get("reconstruct") for r in task["rows"]):
            solver = task.get("refit_solver")
            out += [
                f"### With reconstruction ({task['name']})",
                "",
                "`+ reconstruct`: the row above it (the same masks) with the kept weights and "
                "biases refit after masking, as `--reconstruct` does "
                f"(`rdprune_onnx.reconstruct.reconstruct`, solver `{solver}`, on the same "
                f"{task['calibration_samples']} calibration samples); a `(S)` suffix: the same "
                "masks refit with solver S. onnxsim's SparseGPT (its own masks and update) and "
                "Wanda rows as peers."
                + (
                    " Cells: recall@1 / mean cosine of the 600 held-out embeddings to the "
                    "dense model's ('–': not measured)."
                    if "cosine" in task["extra_scores"]
                    else ""
                ),
                "",
                refit_table(task, ratios),
                "",
                "Refit time per run in seconds (whole model, solvers used per layer; '= X': the "
                "same masks as row X, not refit again):",
                "",
                refit_time_table(task, ratios),
                "",
            ]
        diag = [r for r in task["rows"] if r["family"] == "diagnostic"]
        if diag:
            out += [
                f"### Diagnostics ({task['name']}): rd with another grid, less calibration data, "
                "more steps, another output or capped layer ratios",
                "",
                "`capped`: the same curves, re-allocated with every layer at most at the last grid "
                "level below 1 (no 'all but one weight' option); `on pre-norm`: curves measured "
                "on the sentence vector before the L2 normalisation. See docs/findings.md.",
                "",
                score_table(task, ratios, diag),
                "",
            ]
        for note in task["notes"]:
            out += [f"Note: {note}.", ""]
        for error in task.get("errors", []):
            out += [f"Failed: {error['label']} at {error['ratio']:g}: {error['error']}", ""]
    out += [
        "## Timings",
        "",
        "Curves come from the cache when an earlier run measured them with the same model, data "
        "and settings; 'curves' is what this run measured.",
        "",
        "| model | seconds | curves (s) | pruning (s) | refit (s) | scoring (s) | rows |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task in record["tasks"]:
        rows = task["rows"]
        curves_s = sum(r.get("timings", {}).get("curves", 0.0) for r in rows)
        prune_s = sum(r["prune_s"] for r in rows)
        refit_s = sum(r.get("reconstruct_s", 0.0) for r in rows)
        eval_s = sum(r["eval_s"] for r in rows)
        out.append(
            f"| {task['name']} | {task['seconds']:.0f} | {curves_s:.0f} | {prune_s:.0f} | "
            f"{refit_s:.0f} | {eval_s:.0f} | {len(rows)} |"
        )
    out += [
        "",
        "Rows taken from earlier runs (`--resume`) count in the sums but not in 'seconds'.",
        "",
    ]
    out.append("")
    path.write_text("\n".join(out))


# The refit on other calibration data drawn in the reconstruction panel (dotted), per task.
PLOT_REFIT_DATA = {"minilm": "128x128 calib"}


def plot_refit(ax: Any, task: Mapping[str, Any], colours: Mapping[str, Any]) -> None:
    """Task figure vs ratio with the default (``auto``) refit (dashed) over the plain row of
    the same masks (solid, faint), onnxsim's SparseGPT and Wanda (dash-dot) and, where
    :data:`PLOT_REFIT_DATA` names one, the refit on more calibration data (dotted). Rows with
    a forced solver are in the tables only."""
    key = task["score"]
    data_tag = PLOT_REFIT_DATA.get(task["name"])

    def shown(r: Mapping[str, Any]) -> bool:
        if not r.get("reconstruct"):
            return True
        if r.get("solver") != "auto":
            return False
        if r.get("refit_calib_samples", task["calibration_samples"]) == task["calibration_samples"]:
            return True
        return data_tag is not None and r["label"].endswith(f"({data_tag})")

    rows = [r for r in refit_rows(task) if shown(r)]
    for label in labels_in_order(rows):
        pts = sorted((r["ratio"], r["scores"][key]) for r in rows if r["label"] == label)
        first = next(r for r in rows if r["label"] == label)
        base = first.get("base", label)
        colour = colours.get(base, "black")
        other_data = (
            first.get("refit_calib_samples", task["calibration_samples"])
            != task["calibration_samples"]
        )
        if first.get("reconstruct") and other_data:
            style = {"linestyle": ":", "linewidth": 2.2, "marker": "D", "markersize": 4}
        elif first.get("reconstruct"):
            style = {"linestyle": "--", "linewidth": 2.0, "marker": "o", "markersize": 5}
        elif first["family"] == "onnxsim":
            style = {"linestyle": "-.", "linewidth": 1.4, "marker": "^", "markersize": 5}
        else:
            style = {"linestyle": "-", "linewidth": 1.0, "marker": ".", "alpha": 0.35}
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            color=colour,
            label=label if first.get("reconstruct") or first["family"] == "onnxsim" else None,
            **style,
        )
    ax.axhline(task["dense"]["scores"][key], color="grey", linestyle=":", label="dense")
    ax.set_title(
        f"{task['name']}: --reconstruct, auto (dashed) vs the same masks plain (faint)"
        + (f"\ndotted: refit on {data_tag}" if data_tag else ""),
        fontsize=10,
    )
    ax.set_xlabel("sparsity (fraction of prunable weights zeroed)")
    ax.set_ylabel(task["score_label"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3)


def plot(record: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = record["tasks"]
    # One colour per line label, the same in every panel (20 distinct colours).
    palette = plt.get_cmap("tab20").colors
    colours: dict[str, Any] = {}
    for task in tasks:
        for label in labels_in_order(main_rows(task)):
            colours.setdefault(label, palette[(2 * len(colours)) % 20 + (len(colours) // 10) % 2])
    for task in tasks:
        for i, label in enumerate(labels_in_order(capped_rows(task))):
            colours.setdefault(label, ("black", "dimgrey")[i % 2])
    refit = any(r.get("reconstruct") for t in tasks for r in t["rows"])
    fig, axes = plt.subplots(
        3 if refit else 2,
        len(tasks),
        figsize=(7.5 * len(tasks), 19 if refit else 12),
        squeeze=False,
        gridspec_kw={"height_ratios": [1.5, 1.5, 1] if refit else [1.5, 1]},
    )
    for col, task in enumerate(tasks):
        ax = axes[0][col]
        rows = main_rows(task)
        key = task["score"]
        lines = rows + capped_rows(task)  # the allocator diagnosis of docs/findings.md
        for label in labels_in_order(lines):
            pts = sorted(
                (r["ratio"], r["scores"][key], r["family"]) for r in lines if r["label"] == label
            )
            family = pts[0][2]
            style = {
                "diagnostic": {"linestyle": ":", "linewidth": 2.0, "marker": "D", "markersize": 4},
                "rd": {"linestyle": "-", "linewidth": 2.2, "marker": "o"},
                "baseline": {"linestyle": "-", "linewidth": 1.2, "marker": "s", "markersize": 4},
                "onnxsim": {"linestyle": "--", "linewidth": 1.2, "marker": "^", "markersize": 4},
            }[family]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                label=label,
                color=colours[label],
                **style,
            )
        ax.axhline(task["dense"]["scores"][key], color="grey", linestyle=":", label="dense")
        ax.set_title(task["title"], fontsize=10)
        ax.set_xlabel("sparsity (fraction of prunable weights zeroed)")
        ax.set_ylabel(task["score_label"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3)
        if refit:
            plot_refit(axes[1][col], task, colours)
        ax2 = axes[-1][col]
        rd_rows = [r for r in rows if r["method"] == "rd" and r["predicted"]]
        for label in labels_in_order(rd_rows):
            pts = sorted(
                (r["ratio"], r["predicted"], r["measured"]) for r in rd_rows if r["label"] == label
            )
            color = colours[label]
            x = [p[0] for p in pts]
            ax2.plot(x, [p[1] for p in pts], color=color, linestyle="--", marker="x")
            ax2.plot(x, [p[2] for p in pts], color=color, linestyle="-", marker="o", label=label)
        ax2.set_yscale("log")
        ax2.set_title(
            "rd: predicted (dashed, sum of curves) vs measured (solid) distortion", fontsize=10
        )
        ax2.set_xlabel("sparsity")
        ax2.set_ylabel("distortion on the calibration data (row's metric)")
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: digits,minilm")
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="comma-separated")
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="default docs/ (quick: a temp dir)"
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--quick", action="store_true", help="smoke run: few methods and ratios")
    parser.add_argument("--digits-levels", type=int, default=101)
    parser.add_argument("--minilm-levels", type=int, default=21)
    parser.add_argument("--minilm-metrics", default="mse", help="rd metrics on MiniLM (mse,worst)")
    parser.add_argument("--minilm-steps", type=int, default=1, help="iterative rd on MiniLM (>1)")
    parser.add_argument("--steps-metric", default="kl", help="metric of iterative rd on digits")
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
    args = parser.parse_args(argv)
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
        args.out_dir = Path(tempfile.mkdtemp(prefix="rdbench-")) if args.quick else ROOT / "docs"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_only is not None:
        record = merge_records([json.loads(p.read_text()) for p in args.report_only])
        add_analysis(record)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        json_path = args.out_dir / "benchmark_methods.json"
        json_path.write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
        report(record, args.out_dir)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    done = resumed_rows(args.resume or [])
    results: list[dict[str, Any]] = []
    partial = args.out_dir / "benchmark_methods.partial.json"

    def save(current: dict[str, Any]) -> None:
        """Every finished row so far (resumable with --resume PARTIAL), written atomically."""
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tasks": [*results, current]}, default=_json_default) + "\n")
        tmp.replace(partial)

    with tempfile.TemporaryDirectory(prefix="rdbench-") as work:
        for task in make_tasks(args, Path(work)):
            results.append(run_task(task, args, Path(work), done.get(task.name), save))
            partial.write_text(json.dumps({"tasks": results}, default=_json_default) + "\n")
    total = time.perf_counter() - start
    record = {
        "config": {
            "command": " ".join(["python", *[a for a in sys.argv]]),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "ratios": args.ratios,
            "models": args.models,
            "quick": args.quick,
            "diagnose": args.diagnose,
            "digits_levels": args.digits_levels,
            "minilm_levels": args.minilm_levels,
            "minilm_metrics": args.minilm_metrics,
            "minilm_steps": args.minilm_steps,
            "steps_metric": args.steps_metric,
            "pairs": args.pairs,
            "minilm_sparsegpt_ratios": args.minilm_sparsegpt_ratios,
            "threads": args.threads,
            "cache_dir": str(args.cache_dir),
            "reconstruct_models": args.reconstruct_models,
            "refit_solver": args.refit_solver,
            "minilm_refit_solver": args.minilm_refit_solver,
            "minilm_refit_compare": args.minilm_refit_compare,
            "minilm_refit_compare_rows": args.minilm_refit_compare_rows,
            "minilm_refit_compare_ratios": args.minilm_refit_compare_ratios,
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
        },
        "versions": versions()
        | {"python": platform.python_version(), "onnxsim": onnxsim_version()},
        "host": {
            "cpus": os.cpu_count(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "platform": platform.platform(),
        },
        "timings": {"total_s": total} | {t["name"]: t["seconds"] for t in results},
        "tasks": results,
    }
    if args.resume:  # the runs whose rows were kept: their configuration and timings
        record["resumed_from"] = []
        for path in args.resume:
            if path.is_file() and isinstance(old := json.loads(path.read_text()), dict):
                kept = {k: old[k] for k in ("config", "timings", "host", "versions") if k in old}
                kept["resumed_from"] = old.get("resumed_from", [])
                record["resumed_from"].append({"path": _shown(path.resolve()), **kept})
    add_analysis(record)
    json_path = args.out_dir / "benchmark_methods.json"
    json_path.write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
    (args.out_dir / "benchmark_methods.partial.json").unlink(missing_ok=True)
    report(record, args.out_dir)


def resumed_rows(paths: Sequence[Path]) -> dict[str, dict[tuple[str, float], dict[str, Any]]]:
    """Per model, the rows of earlier records by (label, ratio); later files win."""
    out: dict[str, dict[tuple[str, float], dict[str, Any]]] = {}
    for path in paths:
        if not path.is_file():
            print(f"--resume: {path} not found, skipped", flush=True)
            continue
        loaded = json.loads(path.read_text())
        tasks = loaded["tasks"] if isinstance(loaded, dict) else loaded  # old partial: a list
        for task in tasks:
            into = out.setdefault(task["name"], {})
            for row in task["rows"]:
                into[(row["label"], row["ratio"])] = row
    return out


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The first record, with the rows, notes and errors of the same model in the others."""
    merged = records[0]
    by_name = {t["name"]: t for t in merged["tasks"]}
    for other in records[1:]:
        for task in other["tasks"]:
            if task["name"] not in by_name:
                merged["tasks"].append(task)
                by_name[task["name"]] = task
                continue
            into = by_name[task["name"]]
            new = {(r["label"], r["ratio"]) for r in task["rows"]}
            into["rows"] = [r for r in into["rows"] if (r["label"], r["ratio"]) not in new] + task[
                "rows"
            ]
            into["notes"] += [n for n in task["notes"] if n not in into["notes"]]
            into["errors"] = into.get("errors", []) + task.get("errors", [])
            into["seconds"] += task["seconds"]
        merged.setdefault("merged_runs", []).append(
            {"config": other["config"], "timings": other["timings"], "host": other["host"]}
        )
        merged["timings"]["total_s"] += other["timings"]["total_s"]
    return merged


def add_analysis(record: dict[str, Any]) -> None:
    """The figures derived from the rows (recomputed by --report-only)."""
    ratios = record["config"]["ratios"]
    record["rd_vs_best"] = {t["name"]: rd_vs_best(t, ratios) for t in record["tasks"]}
    record["rank_analysis"] = {t["name"]: rank_analysis(t, ratios) for t in record["tasks"]}


def report(record: Mapping[str, Any], out_dir: Path) -> None:
    """Write the Markdown table and the plot from a record, and print the table."""
    write_markdown(record, out_dir / "benchmark.md")
    plot(record, out_dir / "benchmark_methods.png")
    print()
    print((out_dir / "benchmark.md").read_text())
    print(f"wrote benchmark_methods.json, benchmark.md and benchmark_methods.png in {out_dir}")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()
