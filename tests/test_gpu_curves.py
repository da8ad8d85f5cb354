"""The curve engine's CUDA route (IOBinding, dense tensors and candidates kept on the GPU).

Needs onnxruntime-gpu and a CUDA GPU; skipped cleanly everywhere else. The same route runs
on the CPU provider in tests/test_curves_engine.py (``_FORCE_BINDING``), so its logic is
covered without a GPU; these tests check the device side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rdprune_onnx import curves as curves_module
from rdprune_onnx.calibration import model_inputs, synthesize
from rdprune_onnx.curves import LayerCandidates, grid, measure_curves, run_reference
from rdprune_onnx.graph.cut import downstream
from rdprune_onnx.graph.layers import Layer, find_layers, read_weight
from rdprune_onnx.graph.types import infer_types
from rdprune_onnx.runtime import SessionConfig
from tests import graphs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs onnxruntime-gpu and a CUDA GPU",
    ),
]


def _data(model, n: int = 16):  # type: ignore[no-untyped-def]
    specs = model_inputs(model)
    shapes = {"x": (1, 5, 8)} if any(s.shape == ("N", "T", 8) for s in specs) else {}
    return synthesize(specs, n, seed=3, shapes=shapes)


def _same_on_both(model: onnx.ModelProto, **settings: Any) -> None:
    """measure_curves gives the same curves on the CUDA and the CPU provider."""
    layers = find_layers(model).layers
    data = _data(model)
    got = {}
    for provider in ("cpu", "cuda"):
        config = SessionConfig(provider=provider)
        reference = run_reference(model, data, 8, config)
        got[provider] = measure_curves(model, layers, reference, config=config, **settings)
    for name, curve in got["cpu"].items():
        np.testing.assert_allclose(
            got["cuda"][name].distortion, curve.distortion, rtol=2e-3, atol=1e-6
        )


@pytest.mark.parametrize("build", [graphs.cnn, graphs.residual, graphs.attention])
@pytest.mark.parametrize("engine", ["downstream", "full"])
def test_cuda_route_matches_cpu(build, engine: str) -> None:  # type: ignore[no-untyped-def]
    _same_on_both(build(), ratios=grid(6), engine=engine)


def test_dense_tensors_stay_on_the_gpu() -> None:
    model = graphs.residual()
    config = SessionConfig(provider="cuda")
    reference = run_reference(model, _data(model), 8, config)
    typed = infer_types(model)
    context = curves_module._Context(
        model,
        typed,
        reference,
        config,
        "auto",
        "mse",
        2**30,
        1,
        None,
        None,  # type: ignore[arg-type]
    )
    assert context.binding
    cut = downstream(typed, "wb", build=False)
    assert cut is not None
    store = context.crossing_values(cut.crossing, [0, 1])
    for values in store.values():
        for name, value in values.items():
            if name in context.inputs:
                assert isinstance(value, np.ndarray)  # moved once per layer by the measurer
            else:
                assert value.device_name().lower() == "cuda", name


def test_cuda_candidates_match_cpu() -> None:
    model = graphs.cnn()

    def factory(layer: Layer, weight: np.ndarray) -> LayerCandidates | None:
        if layer.name != "w1":
            return None
        bias = read_weight(model, "b1") + 0.5
        return LayerCandidates(
            ["w1", "b1"], lambda masked, ratio: {"w1": masked, "b1": bias * (1 + ratio)}
        )

    _same_on_both(model, ratios=grid(5), candidates=factory)
