"""Refit-aware allocation on digits: why one-layer refit-aware curves lose, and curves
re-measured on the pruned-and-refit model (docs/refit_select.md).

``why``: for plain, refit-aware and select refit-aware curves, the rd allocation's
predicted distortion (sum of curve points) against the measured one (calibration output
MSE) with the final refit on dense and on sequential inputs, and test accuracy.
``remeasure``: rd on plain curves + sequential refit, then two rounds of curves
re-measured on that pruned-and-refit model (:func:`rdprune_onnx.reconstruct.remeasure_curves`),
rd DP and refit again.

    .venv/bin/python scripts/bench_refit_allocation.py why
    .venv/bin/python scripts/bench_refit_allocation.py remeasure --levels 51 [--select]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import rdprune_onnx.curve_source as curve_source
from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.allocate import get_allocator
from rdprune_onnx.allocate.base import AllocationProblem, LayerSpec
from rdprune_onnx.curves import grid, measure_distortion, run_reference
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask
from rdprune_onnx.reconstruct import RefitCandidates, reconstruct, remeasure_curves
from rdprune_onnx.runtime import Session, SessionConfig

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "models/digits_cnn.onnx")
CALIB = str(ROOT / "models/digits_calib.npz")
TEST = str(ROOT / "models/digits_test.npz")


class Digits:
    def __init__(self) -> None:
        self.model = onnx.load(MODEL)
        self.calib = dict(np.load(CALIB))
        test = dict(np.load(TEST))
        self.labels = test.pop("label")
        self.x = test["input"]
        self.layers = find_layers(self.model).layers
        self.reference = run_reference(self.model, self.calib, 32, SessionConfig())

    def distortion(self, weights: dict[str, np.ndarray]) -> float:
        session = Session(replace_weights(self.model, weights))
        return measure_distortion(session, self.reference, "mse")

    def accuracy(self, weights: dict[str, np.ndarray]) -> float:
        out = Session(replace_weights(self.model, weights)).run({"input": self.x})[0]
        return float(np.mean(np.asarray(out).argmax(1) == self.labels))

    def refit(self, counts: dict[str, int], **kw: Any) -> dict[str, np.ndarray]:
        masked = {n: apply_mask(read_weight(self.model, n), int(c)) for n, c in counts.items()}
        return reconstruct(self.model, masked, self.layers, self.calib, **kw).all_weights()

    def ratios(self, counts: dict[str, int]) -> dict[str, float]:
        return {n: round(int(c) / read_weight(self.model, n).size, 3) for n, c in counts.items()}


def why(d: Digits, ratios: list[float]) -> list[dict[str, Any]]:
    original = curve_source.refit_candidates

    def select_candidates(
        model: onnx.ModelProto, data: Any, batch: int, settings: PruneSettings, config: Any
    ) -> RefitCandidates | None:
        if not settings.refit_curves:
            return None
        return RefitCandidates(model, data, batch_size=batch, config=config, select=True)

    rows = []
    caches = {kind: tempfile.mkdtemp() for kind in ("plain", "refit", "select")}
    try:
        for ratio in ratios:
            for kind, cache in caches.items():
                curve_source.refit_candidates = select_candidates if kind == "select" else original
                result = prune(
                    MODEL,
                    PruneSettings(ratio=ratio, refit_curves=kind != "plain"),
                    CalibrationSpec(data=CALIB),
                    write=False,
                    cache_dir=cache,
                )
                counts = {layer.name: layer.pruned for layer in result.layers}
                row: dict[str, Any] = {
                    "ratio": ratio,
                    "curves": kind,
                    "predicted": result.predicted_distortion,
                    "ratios": d.ratios(counts),
                }
                for select in (False, True):
                    for inputs in ("dense", "sequential"):
                        w = d.refit(counts, select=select, inputs=inputs)
                        key = f"{'select' if select else 'refit'}-{inputs}"
                        row[key] = {"distortion": d.distortion(w), "accuracy": d.accuracy(w)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        curve_source.refit_candidates = original
    return rows


def remeasure(d: Digits, ratios: list[float], levels: int, select: bool) -> list[dict]:
    specs = [LayerSpec(layer.name, layer.shape) for layer in d.layers]
    cache = tempfile.mkdtemp()
    rows = []
    for ratio in ratios:
        result = prune(
            MODEL,
            PruneSettings(ratio=ratio),
            CalibrationSpec(data=CALIB),
            write=False,
            cache_dir=cache,
        )
        counts = {layer.name: layer.pruned for layer in result.layers}
        base: dict[str, np.ndarray] = {}
        for step in range(3):
            if step:
                curves, _ = remeasure_curves(
                    d.model,
                    d.layers,
                    base,
                    d.calib,
                    d.reference,
                    ratios=grid(levels),
                    select=select,
                )
                problem = AllocationProblem(layers=specs, target_ratio=ratio, curves=curves)
                counts = dict(get_allocator("rd").allocate(problem).counts)
            base = d.refit(counts, select=select)
            row = {
                "ratio": ratio,
                "allocation": "plain curves" if not step else f"re-measured {step}",
                "select": select,
                "distortion": d.distortion(base),
                "accuracy": d.accuracy(base),
                "ratios": d.ratios(counts),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["why", "remeasure"])
    parser.add_argument("--ratios", default="0.8,0.9,0.95")
    parser.add_argument("--levels", type=int, default=51)
    parser.add_argument("--select", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    d = Digits()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = why(d, ratios) if args.mode == "why" else remeasure(d, ratios, args.levels, args.select)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
