"""SparseGPT mask selection and the refit's calibration inputs, measured on digits.

For each allocation (``uniform`` and ``rd`` on plain magnitude curves) and ratio, the
per-layer counts come from :func:`rdprune_onnx.prune` (no refit); the magnitude masks at
those counts are then refit with :func:`rdprune_onnx.reconstruct.reconstruct` in four
ways: ``select`` off/on x ``inputs`` sequential/dense, and scored by test accuracy (one
image = 1/450 = 0.22 points) and output MSE on the test set.

    .venv/bin/python scripts/bench_select_inputs.py --ratios 0.8,0.9,0.95 \\
        --json results/select_inputs.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from benchlib.records import write_text

from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.graph.layers import find_layers, read_weight
from rdprune_onnx.graph.surgery import replace_weights
from rdprune_onnx.masks import apply_mask
from rdprune_onnx.reconstruct import reconstruct
from rdprune_onnx.runtime import Session

ROOT = Path(__file__).resolve().parent.parent


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = Session(model)
    name = model.graph.input[0].name
    return np.asarray(session.run({name: x})[0], dtype=np.float64)


def run_case(
    args: argparse.Namespace,
    model: onnx.ModelProto,
    layers: list[Any],
    calib: dict[str, np.ndarray],
    x_test: np.ndarray,
    labels: np.ndarray,
    dense_out: np.ndarray,
    method: str,
    ratio: float,
) -> list[dict[str, Any]]:
    """``method``'s masks at ``ratio``: as they are, and refit (plain or selecting solver) on
    sequential or dense inputs; test accuracy and output MSE of each."""
    result = prune(
        args.model,
        PruneSettings(ratio=ratio, method=method),
        CalibrationSpec(data=args.calib),
        write=False,
        cache_dir=args.cache,
    )
    counts = {layer.name: layer.pruned for layer in result.layers}
    masked = {name: apply_mask(read_weight(model, name), count) for name, count in counts.items()}
    variants: dict[str, dict[str, np.ndarray]] = {"mask only": masked}
    seconds: dict[str, float] = {"mask only": 0.0}
    for select in (False, True):
        for inputs in ("sequential", "dense"):
            label = f"{'select' if select else 'refit'} {inputs}"
            t = time.perf_counter()
            rec = reconstruct(model, masked, layers, calib, select=select, inputs=inputs)
            seconds[label] = time.perf_counter() - t
            variants[label] = rec.all_weights()
    rows = []
    for label, weights in variants.items():
        out = _outputs(replace_weights(model, weights), x_test)
        acc = float(np.mean(out.argmax(1) == labels))
        mse = float(np.mean((out - dense_out) ** 2))
        rows.append(
            {
                "method": method,
                "ratio": ratio,
                "variant": label,
                "accuracy": acc,
                "test_mse": mse,
                "seconds": seconds[label],
                "ratios": {n: round(c / read_weight(model, n).size, 4) for n, c in counts.items()},
            }
        )
        print(
            f"{method:8s} {ratio:4.2f} {label:18s} acc={acc:.4f} mse={mse:.4g} "
            f"({seconds[label]:.1f} s)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/digits_cnn.onnx"))
    parser.add_argument("--calib", default=str(ROOT / "models/digits_calib.npz"))
    parser.add_argument("--test", default=str(ROOT / "models/digits_test.npz"))
    parser.add_argument("--ratios", default="0.8,0.9,0.95")
    parser.add_argument("--methods", default="uniform,rd")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = onnx.load(args.model)
    calib = dict(np.load(args.calib))
    test = dict(np.load(args.test))
    labels = test.pop("label")
    x_test = next(iter(test.values()))
    dense_out = _outputs(model, x_test)
    dense_acc = float(np.mean(dense_out.argmax(1) == labels))
    print(f"dense accuracy {dense_acc:.4f} ({len(labels)} test images)")
    layers = find_layers(model).layers
    args.cache = tempfile.mkdtemp(prefix="bench-select-")
    rows: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            rows += run_case(args, model, layers, calib, x_test, labels, dense_out, method, ratio)
    if args.json:
        write_text(
            Path(args.json), json.dumps({"dense_accuracy": dense_acc, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
