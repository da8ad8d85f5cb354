"""Checks that need a CUDA GPU and onnxruntime-gpu; skipped cleanly everywhere else."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from rdprune_onnx.calibration import model_inputs, synthesize
from rdprune_onnx.curves import grid, measure_curves, run_reference
from rdprune_onnx.graph.layers import find_layers
from rdprune_onnx.runtime import SessionConfig, resolve_provider
from tests import graphs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs onnxruntime-gpu and a CUDA GPU",
    ),
]


def test_auto_takes_cuda() -> None:
    assert resolve_provider("auto") == "cuda"


def test_cuda_curves_match_cpu() -> None:
    model = graphs.cnn()
    layers = find_layers(model).layers
    data = synthesize(model_inputs(model), 16, seed=0)
    curves = {}
    for provider in ("cpu", "cuda"):
        config = SessionConfig(provider=provider)
        reference = run_reference(model, data, 8, config)
        curves[provider] = measure_curves(model, layers, reference, ratios=grid(6), config=config)
    for name, curve in curves["cpu"].items():
        np.testing.assert_allclose(
            curves["cuda"][name].distortion, curve.distortion, rtol=1e-3, atol=1e-6
        )
