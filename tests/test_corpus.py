"""The model corpus: real exports (models/corpus/, see scripts/make_corpus.py) and hand-built
graphs, each pruned with rd and global at ratio 0.5, written, reloaded and run in
onnxruntime. Only the prunable weights may change, only to zero, and the ratio is met to the
weight; every other byte of the model stays the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from rdprune_onnx import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.calibration import model_inputs, synthesize
from rdprune_onnx.graph.layers import find_layers
from rdprune_onnx.inspect import inspect_model
from tests import graphs, graphs_corpus
from tests.graphs_corpus import constant_tensors, without_values

CORPUS = Path(__file__).resolve().parent.parent / "models" / "corpus"
MANIFEST: dict[str, dict[str, object]] = json.loads((CORPUS / "corpus.json").read_text())["models"]
RATIO = 0.5
# curves.py cuts the graph below a layer and looks every output of the cut up among the
# reference's float outputs; an integer output downstream of the layer is not there.


@dataclass
class Case:
    """A model to prune and what the test needs to know about it."""

    load: Callable[[], onnx.ModelProto]
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()  # substrings of the expected skip reasons
    not_layers: tuple[str, ...] = ()  # weights that must not be prunable layers
    path: Path | None = None  # a corpus file, pruned in place (the output goes to tmp)


def _corpus_case(name: str, entry: dict[str, object]) -> Case:
    path = CORPUS / name
    shapes = entry.get("input_shapes") or {}
    ranges = entry.get("input_ranges") or {}
    assert isinstance(shapes, dict) and isinstance(ranges, dict)
    skipped = entry.get("skipped") or []
    not_layers = entry.get("not_layers") or []
    assert isinstance(skipped, list) and isinstance(not_layers, list)
    return Case(
        load=lambda: onnx.load_model(str(path)),
        input_shapes={k: tuple(v) for k, v in shapes.items()},
        input_ranges={k: (float(v[0]), float(v[1])) for k, v in ranges.items()},
        skipped=tuple(skipped),
        not_layers=tuple(not_layers),
        path=path,
    )


CASES: dict[str, Case] = {name: _corpus_case(name, e) for name, e in sorted(MANIFEST.items())}
CASES |= {
    # tests/graphs.py
    "graphs.cnn": Case(graphs.cnn),
    "graphs.cnn_fp16": Case(lambda: graphs.cnn(dtype=np.float16)),
    "graphs.mlp_forms": Case(
        graphs.mlp_forms,
        input_ranges={"cond": (1.0, 2.0)},  # take the If branch that holds a weight
        skipped=("activation x activation", "quantized weight (behind DequantizeLinear)"),
    ),
    "graphs.loop_model": Case(graphs.loop_model),
    "graphs.conv_transpose": Case(graphs.conv_transpose),
    "graphs.residual": Case(graphs.residual),
    "graphs.attention": Case(
        graphs.attention, input_shapes={"x": (1, 3, 8)}, skipped=("activation x activation",)
    ),
    # tests/graphs_corpus.py
    "cnn_opset11": Case(lambda: graphs_corpus.cnn_at_opset(11)),
    "cnn_opset21": Case(lambda: graphs_corpus.cnn_at_opset(21)),
    "cnn_constant_nodes": Case(lambda: graphs_corpus.as_constant_nodes(graphs.cnn())),
    "depthwise_opset11": Case(lambda: graphs_corpus.depthwise_cnn(opset=11)),
    "depthwise_opset21": Case(lambda: graphs_corpus.depthwise_cnn(opset=21)),
    "gemm_variants": Case(graphs_corpus.gemm_variants),
    "conv_1d_3d": Case(graphs_corpus.conv_1d_3d),
    "float64_mlp": Case(graphs_corpus.float64_mlp),
    "multi_output": Case(graphs_corpus.multi_output),
    "loop_shared": Case(graphs_corpus.loop_shared),
}


def _calibration(case: Case, samples: int = 8) -> CalibrationSpec:
    return CalibrationSpec(
        synthetic=samples,
        input_shapes=case.input_shapes,
        input_ranges=case.input_ranges,
        batch_size=8,
        seed=0,
    )


def _run(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def _params() -> list[object]:
    params: list[object] = []
    for name in CASES:
        for method in ("rd", "global"):
            params.append(pytest.param(name, method, id=f"{name}-{method}"))
    return params


@pytest.mark.parametrize(("name", "method"), _params())
def test_prune_corpus_model(tmp_path: Path, name: str, method: str) -> None:
    case = CASES[name]
    model = case.load()
    path = case.path
    if path is None:
        path = tmp_path / "model.onnx"
        onnx.save_model(model, str(path))
    out = tmp_path / "pruned.onnx"
    result = prune(
        path,
        PruneSettings(ratio=RATIO, method=method, levels=11),
        _calibration(case),
        output=out,
        cache_dir=None,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pruned.onnx"] + ([] if case.path else ["model.onnx"])
    )
    written = onnx.load_model(str(out))
    onnx.checker.check_model(written)

    layers = {layer.name for layer in find_layers(model).layers}
    assert {r.name for r in result.layers} == layers
    before, after = constant_tensors(model), constant_tensors(written)
    assert set(before) == set(after)
    for tensor, value in before.items():
        if tensor in layers:
            assert after[tensor].dtype == value.dtype and after[tensor].shape == value.shape
            changed = value != after[tensor]
            assert np.all(after[tensor][changed] == 0), f"{tensor} changed to a nonzero"
            assert np.count_nonzero(after[tensor] == 0) >= np.count_nonzero(value == 0)
        else:
            np.testing.assert_array_equal(after[tensor], value, err_msg=tensor)
    # Nothing else differs: nodes, attributes, inputs, outputs, opsets, metadata.
    assert without_values(written, layers) == without_values(model, layers)

    # The ratio is met to the weight (more only when the model was sparser already).
    total = sum(before[tensor].size for tensor in layers)
    zeros_before = sum(int(np.count_nonzero(before[tensor] == 0)) for tensor in layers)
    zeros = sum(int(np.count_nonzero(after[tensor] == 0)) for tensor in layers)
    assert zeros == max(math.ceil(RATIO * total), zeros_before)
    assert result.achieved_ratio == pytest.approx(zeros / total)

    # The written file runs in onnxruntime and gives outputs of the same names and types.
    feeds = synthesize(
        model_inputs(model),
        3,
        shapes=case.input_shapes,
        ranges=case.input_ranges,
        seed=1,
    )
    dense, pruned = _run(model.SerializeToString(), feeds), _run(out.read_bytes(), feeds)
    assert list(pruned) == list(dense)
    for output, value in pruned.items():
        assert value.dtype == dense[output].dtype and value.shape == dense[output].shape
        if value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), output
    assert result.measured_distortion is not None and result.measured_distortion >= 0


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.skipped or c.not_layers])
def test_skipped_weights_are_reported(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    model = case.load()
    scan = find_layers(model)
    reasons = [s.reason for s in scan.skipped]
    for needle in case.skipped:
        assert any(needle in reason for reason in reasons), (needle, reasons)
    layer_names = {layer.name for layer in scan.layers}
    assert not layer_names & set(case.not_layers)
    # `inspect` shows the same skipped rows, each with its reason.
    path = case.path or tmp_path / "model.onnx"
    if case.path is None:
        onnx.save_model(model, str(path))
    rows = inspect_model(path).rows()
    skipped_rows = [row for row in rows if not row["prunable"]]
    assert len(skipped_rows) == len(scan.skipped)
    assert all(row["reason"] for row in skipped_rows)


def test_recurrent_weights_are_listed_as_skipped() -> None:
    case = CASES["lstm_torchscript_op14.onnx"]
    assert case.not_layers
    scan = find_layers(case.load())
    tensors = {s.tensor for s in scan.skipped}
    assert set(case.not_layers) <= tensors


def test_corpus_files_match_the_manifest() -> None:
    files = sorted(p.name for p in CORPUS.glob("*.onnx"))
    assert files == sorted(MANIFEST)
    opsets = set()
    exporters = set()
    for name, entry in MANIFEST.items():
        path = CORPUS / name
        assert path.stat().st_size < 200_000, name
        model = onnx.load_model(str(path))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset == entry["opset"], name
        opsets.add(opset)
        exporters.add(str(entry["exporter"]).split()[0])
    assert {11, 21} <= opsets
    assert {"torchscript", "dynamo"} <= exporters
