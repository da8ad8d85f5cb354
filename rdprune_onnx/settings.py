"""What a prune is asked to do: the settings, the calibration data, the outputs and the
held-out evaluation. Plain typed objects, checked before any work; the command line builds
them from its options (its defaults are these fields' defaults, see ``cli/options.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

from rdprune_onnx.allocate import METHODS
from rdprune_onnx.compact import STORAGES
from rdprune_onnx.curves import grid
from rdprune_onnx.distortion import METRICS, OUTPUT_KINDS
from rdprune_onnx.errors import UserError
from rdprune_onnx.grid import check_grid
from rdprune_onnx.masks import MASK_INPUTS, MASKS, get_mask
from rdprune_onnx.reconstruct import INPUTS as REFIT_INPUTS
from rdprune_onnx.reconstruct import SOLVERS


@dataclass
class CalibrationSpec:
    """Where calibration inputs come from: an .npz file, or synthetic samples."""

    data: str | os.PathLike[str] | None = None
    synthetic: int | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    input_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    batch_size: int = 32
    seed: int = 0
    # Synthetic inputs fixed to one value (``--input-value sr=16000``).
    input_values: Mapping[str, float] = field(default_factory=dict)

    @property
    def given(self) -> bool:
        return self.data is not None or self.synthetic is not None


@dataclass
class LayerBounds:
    """Per-layer constraints: glob patterns on weight names -> ratio bounds."""

    min_ratio: float | None = None
    max_ratio: float | None = None


BUDGETS = ("params", "flops")


@dataclass
class PruneSettings:
    ratio: float
    method: str = "rd"
    metric: str = "mse"
    levels: int = 101
    provider: str = "auto"
    allow_layer_removal: bool = False
    exclude: Sequence[str] = ()
    steps: int = 1  # iterative rd: reach the target in this many re-measured steps
    budget: str = "params"  # what the ratio counts: weights, or multiply-accumulates
    min_layer_ratio: float | None = None
    max_layer_ratio: float | None = None
    overrides: Mapping[str, LayerBounds] = field(default_factory=dict)
    reconstruct: bool = False  # refit the kept weights of each layer after masking
    refit_solver: str = "auto"  # exact | sparsegpt | auto (by layer width)
    # rd curves measured with each layer pruned AND refit (rdprune_onnx.reconstruct.refit_curves);
    # implies ``reconstruct``: the allocation is then chosen for what will be applied.
    refit_curves: bool = False
    # Which weights go inside a layer (rdprune_onnx.masks): magnitude | wanda. Data-aware
    # masks also rank the weights of global and LAMP, and are the rd curves' masks.
    mask: str = "magnitude"
    # Where a data-aware mask's statistics come from in the final masking: the dense (or,
    # with --steps, the current step's) model, or each layer's inputs in the model pruned
    # so far (in graph order). Curves always use the measured model's own inputs.
    mask_inputs: str = "dense"
    # Where the refit's (and sparsegpt's) Hessians come from: each layer's inputs in the
    # model pruned and refit so far (sequential), or the dense model's (one pass).
    refit_inputs: str = "sequential"
    # What each output holds, for kl / prob-mse (rdprune_onnx.distortion): auto (from the
    # graph's last activation, else the data), logits, probs, log-probs, sigmoid, embedding.
    output_kind: str = "auto"
    # Layers whose whole curve is zero (they never reached the output on the calibration
    # data) are kept at the median ratio of the others unless this is set.
    prune_unused_layers: bool = False
    # Which curve points are measured: "adaptive" (those the allocation needs, refined in
    # rounds; ``levels`` is the finest resolution) or "full" (every level).
    grid: str = "adaptive"

    @property
    def data_aware_mask(self) -> bool:
        return get_mask(self.mask).needs_statistics

    @property
    def select_masks(self) -> bool:
        """The refit chooses the masks again (sparsegpt): refit is implied."""
        return self.mask in MASKS and get_mask(self.mask).rewrites_weights

    @property
    def curve_mask(self) -> str:
        """The mask the rd curves are measured with: a data-aware one, sparsegpt with
        refit-aware curves (each point selected and refit), else magnitude."""
        if self.mask in MASKS and (
            self.data_aware_mask or (self.select_masks and self.refit_curves)
        ):
            return self.mask
        return "magnitude"

    def __post_init__(self) -> None:
        if self.refit_curves or self.select_masks:
            self.reconstruct = True

    def check(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(
                f"--ratio must be strictly between 0 and 1, got {self.ratio}",
                "e.g. --ratio 0.8 zeroes 80% of the prunable weights",
            )
        for what, chosen, choices in (
            ("method", self.method, METHODS),
            ("metric", self.metric, METRICS),
            ("mask", self.mask, MASKS),
            ("mask inputs", self.mask_inputs, MASK_INPUTS),
            ("refit inputs", self.refit_inputs, REFIT_INPUTS),
            ("output kind", self.output_kind, OUTPUT_KINDS),
            ("budget", self.budget, BUDGETS),
        ):
            if chosen not in choices:
                raise UserError(f"unknown {what} {chosen!r}", f"choose one of {', '.join(choices)}")
        if self.select_masks and not self.reconstruct:
            raise UserError(
                "--mask sparsegpt rewrites the kept weights: it always refits",
                "keep reconstruct on, or use --mask magnitude / wanda",
            )
        grid(self.levels)
        check_grid(self.grid)
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}", "e.g. --steps 3")
        if self.steps > 1 and self.method != "rd":
            raise UserError(
                f"--steps applies to --method rd only (got {self.method})", "drop --steps"
            )
        if self.refit_solver not in SOLVERS:
            raise UserError(
                f"unknown refit solver {self.refit_solver!r}", f"choose one of {', '.join(SOLVERS)}"
            )
        if self.refit_curves and self.method != "rd":
            raise UserError(
                f"--refit-curves changes the rd curves; --method {self.method} uses none",
                "drop --refit-curves, or use --method rd",
            )
        if self.refit_curves and self.steps > 1:
            raise UserError(
                "--refit-curves with --steps > 1 is not supported",
                "use --steps 1 with --refit-curves, or plain curves with --steps",
            )
        for label, value in (
            ("--min-layer-ratio", self.min_layer_ratio),
            ("--max-layer-ratio", self.max_layer_ratio),
        ):
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"{label} must be in [0, 1], got {value}", "e.g. 0.95")

    def to_dict(self) -> dict[str, Any]:
        return vars(self) | {
            "exclude": list(self.exclude),
            "overrides": {k: vars(v) for k, v in self.overrides.items()},
        }


def read_overrides(path: str | os.PathLike[str]) -> dict[str, LayerBounds]:
    """Per-layer bounds from a JSON or YAML file: ``{PATTERN: {min_ratio, max_ratio}}``.

    Patterns are globs on weight names; a layer takes the last matching entry's bounds.
    A top-level ``layers`` key holding the same mapping is accepted too.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"overrides file {str(p)!r} does not exist", "check --overrides")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                raise UserError(
                    "reading YAML overrides needs PyYAML",
                    "pip install 'rdprune-onnx[yaml]', or use JSON",
                ) from None
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(
            f"cannot parse {str(p)!r}: {exc}", "write {PATTERN: {max_ratio: R}}"
        ) from None
    if isinstance(raw, dict) and isinstance(raw.get("layers"), dict):
        raw = raw["layers"]
    if not isinstance(raw, dict):
        raise UserError(f"{str(p)!r} must map layer patterns to bounds", "see the README")
    out: dict[str, LayerBounds] = {}
    for pattern, bounds in raw.items():
        if not isinstance(bounds, dict) or not set(bounds) <= {"min_ratio", "max_ratio"}:
            raise UserError(
                f"{str(p)!r}: entry {pattern!r} must hold min_ratio and/or max_ratio",
                'e.g. {"fc*": {"max_ratio": 0.5}}',
            )
        try:
            out[str(pattern)] = LayerBounds(
                min_ratio=None if bounds.get("min_ratio") is None else float(bounds["min_ratio"]),
                max_ratio=None if bounds.get("max_ratio") is None else float(bounds["max_ratio"]),
            )
        except (TypeError, ValueError):
            raise UserError(f"{str(p)!r}: bounds of {pattern!r} must be numbers", "") from None
    return out


@dataclass
class OutputSpec:
    """What a prune writes: the model (``path``, default ``MODEL.pruned.onnx``; nothing
    when ``write`` is False), its ``storage`` (dense, or compact: a file that shrinks with
    sparsity), a JSON ``report`` and a ``plot`` target (checked with the other outputs, drawn
    by the caller with :func:`rdprune_onnx.plot.plot_result`). ``force`` replaces existing
    regular files (never an input of the run)."""

    path: str | os.PathLike[str] | None = None
    write: bool = True
    report: str | os.PathLike[str] | None = None
    plot: str | os.PathLike[str] | None = None
    storage: str = "dense"
    force: bool = False

    def check(self) -> None:
        if self.storage not in STORAGES:
            raise UserError(
                f"unknown storage {self.storage!r}", f"choose one of {', '.join(STORAGES)}"
            )

    def target(self, model_path: str | os.PathLike[str]) -> Path:
        """Where the model goes (also when it is not written: other checks name it)."""
        return Path(self.path) if self.path is not None else default_output(model_path)

    def models(self, model_path: str | os.PathLike[str]) -> list[Path]:
        """The model files this run writes: the target, or none."""
        return [self.target(model_path)] if self.write else []


@dataclass
class EvalSpec:
    """Held-out data to compare the dense and the pruned model on: an .npz with one array per
    model input, and optionally the name of an array of class labels in it (accuracy)."""

    data: str | os.PathLike[str] | None = None
    labels: str | None = None


class OutputOptions(TypedDict, total=False):
    """The flat keyword arguments the entry points took before :class:`OutputSpec` (README
    and tests use them): each sets the field of the same name."""

    write: bool
    force: bool
    report: str | os.PathLike[str] | None
    plot: str | os.PathLike[str] | None
    storage: str


class EvalOptions(TypedDict, total=False):
    """The flat keyword arguments for :class:`EvalSpec`: ``eval_data`` sets ``data``."""

    eval_data: str | os.PathLike[str] | None
    labels: str | None


class SpecOptions(OutputOptions, EvalOptions, total=False):
    """Every flat keyword of :func:`resolve_specs`."""


def resolve_specs(
    output: OutputSpec | str | os.PathLike[str] | None,
    evaluation: EvalSpec | None,
    options: SpecOptions,
) -> tuple[OutputSpec, EvalSpec]:
    """The output and evaluation specs of a call: ``output`` (a spec, or the model's path)
    and ``evaluation``, with the flat keywords of :class:`SpecOptions` applied."""
    given = dict(options)
    unknown = set(given) - set(OutputOptions.__annotations__) - set(EvalOptions.__annotations__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    out = output if isinstance(output, OutputSpec) else OutputSpec(path=output)
    flat: dict[str, Any] = {k: v for k, v in given.items() if k in OutputOptions.__annotations__}
    if flat and isinstance(output, OutputSpec):
        raise TypeError(f"give {', '.join(flat)} inside output=OutputSpec(...), not beside it")
    eval_flat: EvalOptions = {k: v for k, v in given.items() if k in EvalOptions.__annotations__}  # type: ignore[assignment]
    return replace(out, **flat), resolve_eval(evaluation, eval_flat)


def resolve_eval(evaluation: EvalSpec | None, options: EvalOptions) -> EvalSpec:
    """``evaluation``, or the spec the flat ``eval_data`` / ``labels`` keywords describe."""
    if not options:
        return evaluation if evaluation is not None else EvalSpec()
    if evaluation is not None:
        raise TypeError("give eval_data and labels inside evaluation=EvalSpec(...)")
    return EvalSpec(data=options.get("eval_data"), labels=options.get("labels"))


def default_output(model_path: str | os.PathLike[str]) -> Path:
    p = Path(model_path)
    return p.with_name(p.stem + ".pruned.onnx")


def output_for_ratio(output: str | os.PathLike[str], ratio: float) -> Path:
    """The file name used for one ratio of several: ``out.onnx`` -> ``out.r0.7.onnx``."""
    p = Path(output)
    return p.with_name(f"{p.stem}.r{ratio:g}{p.suffix or '.onnx'}")


__all__ = [
    "BUDGETS",
    "CalibrationSpec",
    "EvalOptions",
    "EvalSpec",
    "LayerBounds",
    "OutputOptions",
    "OutputSpec",
    "PruneSettings",
    "SpecOptions",
    "default_output",
    "output_for_ratio",
    "read_overrides",
    "resolve_eval",
    "resolve_specs",
]
