"""The runner of scripts/benchmark_methods.py: every row of a task, pruned, measured (sparsity,
calibration distortions, task scores) and, for our methods, refit (``+ reconstruct`` rows)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from benchlib.data import calib_subset, calibration_batches
from benchlib.peers import run_onnxsim
from benchlib.records import onnxsim_version, shown

from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.allocate import AllocationProblem, Curve, LayerSpec, get_allocator
from rdprune_onnx.curves import Reference, run_reference
from rdprune_onnx.distortion import DistortionMeter
from rdprune_onnx.graph.cut import upstream
from rdprune_onnx.graph.layers import Layer, find_layers, read_weight
from rdprune_onnx.graph.load import load_model
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask
from rdprune_onnx.pipeline import load_calibration
from rdprune_onnx.reconstruct import reconstruct
from rdprune_onnx.runtime import Session, SessionConfig

from .report import fmt_row, fmt_scores
from .tasks import PRE_NORM, Compare, Task, Variant


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


def with_output(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """``model`` with ``tensor`` (float, rank 2) as its only output; nodes after it removed."""
    rank2 = onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, ["batch", None])
    return upstream(model, [tensor], output_types={tensor: rank2})


def curve_sum(curves: Mapping[str, Curve], ratios: Mapping[str, float]) -> float:
    """The rd objective of an allocation: the sum of single-layer distortions (interpolated)."""
    return float(
        sum(
            np.interp(ratios[name], curve.ratios, curve.distortion)
            for name, curve in curves.items()
        )
    )


Save = Callable[[dict[str, Any]], None]
RowKey = tuple[str, float]


def run_task(
    task: Task,
    args: argparse.Namespace,
    work: Path,
    done: Mapping[RowKey, dict[str, Any]] | None = None,
    save: Save | None = None,
) -> dict[str, Any]:
    """Every row of ``task``; rows found in ``done`` (resumed runs) are kept, not recomputed.

    A resumed row of our methods that lacks a score the scorer now gives (MiniLM's ``cosine``)
    is recomputed (``--rescore ours``; ``all`` also recomputes onnxsim rows). ``save`` gets the
    task's record after every row, so that an interrupted run can be resumed.
    """
    return TaskRunner(task, args, work, done, save).run()


class TaskRunner:
    """One task's run: the dense model and its reference outputs, the rows so far, and the
    caches that keep a model equal to an earlier row's from being measured or refit again."""

    def __init__(
        self,
        task: Task,
        args: argparse.Namespace,
        work: Path,
        done: Mapping[RowKey, dict[str, Any]] | None,
        save: Save | None,
    ) -> None:
        self.task, self.args, self.work, self.save = task, args, work, save
        self.done = dict(done or {})
        # One intra-op thread: on 2 shared cores it embedded the 600 MiniLM texts in 14-16 s,
        # against 19-22 s with 2 threads.
        self.config = SessionConfig(provider="cpu", intra_op_threads=args.threads)
        print(f"\n=== {task.name}: {task.title}", flush=True)
        self.t0 = time.perf_counter()
        self.dense = load_model(task.model)
        self.dense_layers = DenseLayers.of(self.dense)
        self.data, self.batch_size = load_calibration(self.dense, CalibrationSpec(data=task.calib))
        self.reference = run_reference(self.dense, self.data, self.batch_size, self.config)
        self.dense_row = self.measure(self.dense)
        self.dense_row["eval_s"] = 0.0
        print(f"dense: {fmt_scores(task, self.dense_row['scores'])}", flush=True)
        self.score_keys = set(self.dense_row["scores"])
        self.has_onnxsim = onnxsim_version() is not None
        self.skipped: list[str] = []
        self.rows: dict[RowKey, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.measured: dict[str, tuple[str, dict[str, Any]]] = {}  # digest -> (row, measurement)
        self.refits: dict[str, dict[str, Any]] = {}  # masked weights digest -> reconstructed row
        for row in self.done.values():
            if row.get("reconstruct") and "mask_digest" in row and "same_as" not in row:
                key = f"{row['mask_digest']} {row['solver']} {row.get('refit_calib_samples')}"
                self.refits.setdefault(key, row)
        self.curves: dict[str, dict[str, Curve]] = {}  # metric -> one-shot curves on the dense
        self.resumed = 0  # rows taken from --resume
        self.order = {v.label: i for i, v in enumerate(task.variants)}

    def run(self) -> dict[str, Any]:
        """Our methods first (uniform-plus last of them), then the compares, then onnxsim: an
        interrupted MiniLM run has the main rows and their reconstruction first."""
        variants = sorted(self.task.variants, key=self.priority)
        for variant in variants:
            if variant.family != "onnxsim":
                self.process(variant)
        # The same masks refit with another solver (--minilm-refit-compare) or on other data
        # (--digits-refit-data, --minilm-refit-data), for a few methods.
        for compare in self.task.compares if self.task.refit_solver is not None else []:
            self.run_compare(compare, variants)
        for variant in variants:
            if variant.family == "onnxsim":
                self.process(variant)
        # Resumed rows this run did not ask for (other ratios or compare settings) are kept.
        for key, row in self.done.items():
            if key not in self.rows and not (
                self.args.only_diagnostics and row["family"] != "diagnostic"
            ):
                self.rows[key] = row
                self.resumed += 1
        # Score every allocation of our methods with the rd objective of each metric.
        for row in self.rows.values():
            if row["family"] != "onnxsim" and not row.get("reconstruct") and self.curves:
                sums = {m: curve_sum(c, row["layer_ratios"]) for m, c in self.curves.items()}
                row["curve_sum"] = {**row.get("curve_sum", {}), **sums}
        if self.skipped:
            self.task.notes.append(
                "onnxsim is not importable in this environment: skipped " + ", ".join(self.skipped)
            )
        return self.record()

    def record(self) -> dict[str, Any]:
        """The task's record: its configuration, the dense row and every row so far."""
        task = self.task

        def key(row: Mapping[str, Any]) -> tuple[int, bool, float]:
            base = row.get("base", row["label"])
            return (
                self.order.get(base, len(self.order)),
                bool(row.get("reconstruct")),
                row["ratio"],
            )

        return {
            "name": task.name,
            "title": task.title,
            "model": shown(task.model),
            "calibration": shown(task.calib),
            "calibration_samples": len(next(iter(self.data.values()))),
            "batch_size": self.batch_size,
            "levels": task.levels,
            "metrics": list(task.metrics),
            "score": task.score,
            "score_label": task.score_label,
            "extra_scores": list(task.extra_scores),
            "refit_solver": task.refit_solver,
            "layers": {layer.name: layer.size for layer in self.dense_layers.layers},
            "dense": self.dense_row,
            "rows": sorted(self.rows.values(), key=key),
            "resumed_rows": self.resumed,
            "notes": task.notes,
            "errors": self.errors,
            "seconds": time.perf_counter() - self.t0,
        }

    def priority(self, v: Variant) -> tuple[int, int]:
        rank = 2 if v.family == "onnxsim" else 1 if v.method == "uniform-plus" else 0
        return (rank, self.order[v.label])

    def complete(self, row: Mapping[str, Any]) -> bool:
        """Whether a resumed row is kept as it is (see ``--rescore``)."""
        if self.score_keys <= set(row["scores"]) or self.args.rescore == "none":
            return True
        return self.args.rescore == "ours" and row["family"] == "onnxsim"

    def failed(self, label: str, ratio: float, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        self.errors.append({"label": label, "ratio": ratio, "error": message})
        print(f"{label:<34} {ratio:.2f}  FAILED: {message}", flush=True)

    def add(self, key: RowKey, row: dict[str, Any]) -> None:
        """A computed row: kept, printed and saved (for ``--resume``)."""
        self.rows[key] = row
        print(fmt_row(self.task, row), flush=True)
        if self.save is not None:
            self.save(self.record())

    def process(self, variant: Variant) -> None:
        """``variant``'s rows at every ratio of the run, and their ``+ reconstruct`` rows."""
        args, task = self.args, self.task
        if args.only_diagnostics and variant.family != "diagnostic":
            return
        if variant.family == "onnxsim" and not self.has_onnxsim:
            if variant.label not in self.skipped:
                self.skipped.append(variant.label)
            return
        refit = task.refit_solver is not None and variant.family in ("rd", "baseline")
        for ratio in variant.ratios or tuple(args.ratios):
            if ratio not in args.ratios:
                continue
            model: onnx.ModelProto | None = None
            prior = self.done.get((variant.label, ratio))
            if prior is not None and self.complete(prior):
                self.rows[(variant.label, ratio)] = prior
                self.resumed += 1
            else:
                try:
                    row, model = self.run_variant(variant, ratio)
                except Exception as exc:  # one failing row must not lose the whole run
                    self.failed(variant.label, ratio, exc)
                    continue
                self.add_plain(variant, ratio, row, prior)
            if not refit or (variant.refit_label, ratio) in self.done:
                if refit:
                    key = (variant.refit_label, ratio)
                    self.rows[key] = self.done[key]
                    self.resumed += 1
                continue
            assert task.refit_solver is not None
            self.refit_row(variant, ratio, model, task.refit_solver, variant.refit_label)

    def add_plain(
        self,
        variant: Variant,
        ratio: float,
        row: dict[str, Any],
        prior: Mapping[str, Any] | None,
    ) -> None:
        """A computed plain row: a rescore noted, rd's dense one-shot curves kept."""
        task = self.task
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
            self.curves.setdefault(variant.metric, curves_here)
        self.add((variant.label, ratio), row)

    def run_compare(self, compare: Compare, variants: list[Variant]) -> None:
        """The rows ``compare`` names, their masks refit with its solver or data."""
        compare_data = None
        tag = compare.solver
        if compare.data is not None:
            compare_data = load_calibration(self.dense, CalibrationSpec(data=compare.data))[0]
            first = next(iter(compare_data.values()))
            shape = "x".join(map(str, first.shape[:2] if first.ndim == 2 else first.shape[:1]))
            tag = f"{shape} calib"
        for variant in variants:
            if variant.label not in compare.labels:
                continue
            label = f"{variant.refit_label} ({tag})"
            for ratio in compare.ratios or variant.ratios or tuple(self.args.ratios):
                if ratio not in self.args.ratios:
                    continue
                if (label, ratio) in self.done:
                    self.rows[(label, ratio)] = self.done[(label, ratio)]
                    self.resumed += 1
                else:
                    self.refit_row(variant, ratio, None, compare.solver, label, compare_data)

    def refit_row(
        self,
        variant: Variant,
        ratio: float,
        model: onnx.ModelProto | None,
        solver: str,
        label: str,
        refit_data: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """The ``+ reconstruct`` row of ``variant`` at ``ratio`` (``model``: its plain masks;
        None: the plain row was resumed, so the same masks are built again)."""
        try:
            if model is None:
                model = self.build_ours(variant, ratio)[0]
            data = self.data if refit_data is None else refit_data
            row = self.run_reconstruct(variant, ratio, model, data, solver, label)
        except Exception as exc:  # one failing row must not lose the whole run
            self.failed(label, ratio, exc)
            return
        plain = self.rows.get((variant.label, ratio))
        if plain is not None and plain["layer_ratios"] != row["layer_ratios"]:
            self.task.notes.append(
                f"{label} at {ratio:g}: the re-pruned masks differ from the plain row's "
                "(per-layer ratios)"
            )
        self.add((label, ratio), row)

    def measure(self, model: onnx.ModelProto) -> dict[str, Any]:
        return measure_model(model, self.task, self.reference, self.dense_layers, self.config)

    def build_ours(self, variant: Variant, ratio: float) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """The model our ``variant`` prunes to ``ratio`` (plain masks), and the row's fields."""
        task, dense, dense_layers = self.task, self.dense, self.dense_layers
        calib_path = task.calib
        if variant.calib_samples is not None:
            calib_path = calib_subset(task.calib, variant.calib_samples, self.work)
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
            model_path = self.work / f"{task.model.stem}.{variant.output}.onnx"
            if not model_path.exists():
                onnx.save(with_output(dense, PRE_NORM[variant.output]), str(model_path))
        result = prune(
            model_path,
            settings,
            CalibrationSpec(data=calib_path, batch_size=self.batch_size),
            write=False,
            cache_dir=self.args.cache_dir,
        )
        assert result.model is not None
        model = result.model
        predicted = result.predicted_distortion
        if variant.cap:
            assert result.curves is not None
            model, predicted = capped_allocation(dense, dense_layers, result.curves, ratio, levels)
        if variant.output is not None:  # the same weights in the unmodified model
            weights = {layer.name: read_weight(model, layer.name) for layer in dense_layers.layers}
            model = replace_weights(dense, weights)
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

    def run_variant(self, variant: Variant, ratio: float) -> tuple[dict[str, Any], onnx.ModelProto]:
        """The row of ``variant`` at ``ratio``, and the pruned model it measured."""
        row: dict[str, Any] = {
            "label": variant.label,
            "family": variant.family,
            "method": variant.method,
            "ratio": ratio,
        }
        t = time.perf_counter()
        if variant.ours:
            model, fields = self.build_ours(variant, ratio)
            row.update(fields)
        else:
            batches = calibration_batches(self.data, self.batch_size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = run_onnxsim(variant.method, self.dense, ratio, batches)
        row["prune_s"] = time.perf_counter() - t
        # A model whose prunable weights equal an earlier row's (onnxsim's global magnitude is
        # our global allocation) is not run again: its measurement is copied.
        key = weights_digest(self.dense_layers.weights(model))
        if key in self.measured:
            row.update(self.measured[key][1], same_as=self.measured[key][0], eval_s=0.0)
        else:
            self.measured[key] = (f"{variant.label} @ {ratio:g}", self.measure(model))
            row.update(self.measured[key][1])
        if row.get("method") == "rd" and row.get("measured") is None:
            row["measured"] = row["distortion"].get(row["metric"])
        return row, model

    def run_reconstruct(
        self,
        variant: Variant,
        ratio: float,
        masked: onnx.ModelProto,
        data: Mapping[str, np.ndarray],
        solver: str,
        label: str,
    ) -> dict[str, Any]:
        """``variant``'s masks at ``ratio`` with the kept weights refit (what ``--reconstruct``
        does).

        The same call as the pipeline's: :func:`rdprune_onnx.reconstruct.reconstruct` on the
        dense model, the masked weights and the task's calibration data, with ONNX Runtime's
        default threads. Masks already refit by an earlier row (same masked weights) are not
        refit again: that row's measurement is copied.
        """
        pruned = self.dense_layers.weights(masked)
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
        earlier = self.refits.get(f"{digest} {solver} {samples}")
        if earlier is not None:
            keep = ("achieved_ratio", "layer_ratios", "distortion", "scores", "refit")
            row.update({k: earlier[k] for k in (*keep, "refit_summary") if k in earlier})
            row.update(
                same_as=f"{earlier['label']} @ {earlier['ratio']:g}", reconstruct_s=0.0, eval_s=0.0
            )
            return row
        t = time.perf_counter()
        refit, logged = self.refit(pruned, data, solver)
        row["reconstruct_s"] = time.perf_counter() - t
        row["refit_warnings"] = logged
        row.update(refit_fields(refit.layers))
        row.update(self.measure(replace_weights(self.dense, {**pruned, **refit.all_weights()})))
        self.refits[f"{digest} {solver} {samples}"] = row
        return row

    def refit(
        self, pruned: Mapping[str, np.ndarray], data: Mapping[str, np.ndarray], solver: str
    ) -> tuple[Any, list[str]]:
        """:func:`rdprune_onnx.reconstruct.reconstruct` on the masked weights, and the warnings
        it logged (fewer calibration rows than a layer has inputs)."""
        warned = _Collect()
        logger = logging.getLogger("rdprune_onnx.reconstruct")
        logger.addHandler(warned)
        try:
            refit = reconstruct(
                self.dense,
                pruned,
                self.dense_layers.layers,
                data,
                batch_size=self.batch_size,
                config=SessionConfig(provider="cpu"),
                solver=solver,
            )
        finally:
            logger.removeHandler(warned)
        return refit, warned.messages


def refit_fields(refit_layers: Any) -> dict[str, Any]:
    """Per layer, the refit's solver, errors before and after, seconds and reason; and their
    summary (solvers used, layers whose mask was kept, summed errors)."""
    layers: dict[str, dict[str, Any]] = {
        r.name: {
            "method": r.method,
            "error_before": None if math.isnan(r.error_before) else r.error_before,
            "error_after": None if math.isnan(r.error_after) else r.error_after,
            "seconds": r.seconds,
            "reason": r.reason,
        }
        for r in refit_layers
    }
    solvers: dict[str, int] = {}
    for info in layers.values():
        solvers[info["method"]] = solvers.get(info["method"], 0) + 1
    return {
        "refit": layers,
        "refit_summary": {
            "solvers": solvers,
            "kept_mask": sum(
                1 for i in layers.values() if i["reason"] and "kept mask" in i["reason"]
            ),
            "error_before": sum(i["error_before"] or 0.0 for i in layers.values()),
            "error_after": sum(i["error_after"] or 0.0 for i in layers.values()),
        },
    }


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
