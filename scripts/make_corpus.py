"""Write the model corpus: small PyTorch exports that tests/test_corpus.py prunes.

Every file is a real exporter's output (TorchScript and dynamo exporters, opsets 11 to 21,
dynamic axes, float16, several outputs with an integer one, an LSTM, a QDQ-quantized model made
by onnxruntime's static quantizer), each well under 200 KB, so they are checked in. Besides the
``.onnx`` files the script writes ``corpus.json`` (per file: exporter, opset, what it covers, the
calibration settings the test uses and the skipped weights it expects) and ``README.md``.

Run it with the torch virtualenv (``onnxscript`` is needed for the dynamo exporter)::

    .venv-torch/bin/pip install onnxscript
    .venv-torch/bin/python scripts/make_corpus.py          # --out models/corpus

Weights come from ``torch.manual_seed(0)``; some weights are set to exactly zero before export
so that the tests see layers that are already partly sparse.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "models" / "corpus"
SIZE_LIMIT = 200_000  # bytes per file


class TinyCNN(nn.Module):
    """Conv, grouped Conv, depthwise Conv, MaxPool, ConvTranspose, Linear (Gemm transB)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        with torch.no_grad():  # a layer that is already partly sparse
            self.fc.weight[:, ::7] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.relu(self.grouped(h))
        h = torch.relu(self.depthwise(h))
        h = torch.relu(self.up(self.pool(h)))
        return self.fc(torch.flatten(h, 1))


class TwoHeads(nn.Module):
    """TinyCNN's logits plus their argmax (int64) and softmax: three outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyCNN()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return logits, torch.argmax(logits, dim=1), torch.softmax(logits, dim=1)


class TokenAttention(nn.Module):
    """Embedding of int64 token ids, one attention block, an MLP, mean pooling, a head."""

    def __init__(self, vocab: int = 32, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 4)
        self.scale = hidden**-0.5

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        scores = self.q(h) @ self.k(h).transpose(1, 2) * self.scale
        h = self.norm(h + self.o(torch.softmax(scores, dim=-1) @ self.v(h)))
        h = h + self.mlp(h)
        return self.head(h.mean(dim=1))


class TinyLSTM(nn.Module):
    """An LSTM (its weights feed the LSTM op: not prunable) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@dataclass
class Entry:
    """One corpus file and what the tests need to know about it."""

    file: str
    exporter: str
    opset: int
    covers: str
    dtype: str = "float32"
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    input_ranges: dict[str, list[float]] = field(default_factory=dict)
    # Substrings of the reasons find_layers must give for weights it does not prune.
    skipped: list[str] = field(default_factory=list)
    # Weights that must not be listed as prunable layers (for example the LSTM's).
    not_layers: list[str] = field(default_factory=list)
    size: int = 0


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return factory().eval()


def _torchscript(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    opset: int,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
        )
    return onnx.load_from_string(buffer.getvalue())


def _dynamo(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    opset: int,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
) -> onnx.ModelProto:
    shapes = {
        name: {axis: torch.export.Dim(label) for axis, label in axes.items()}
        for name, axes in dynamic.items()
        if name in inputs
    }
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=shapes,
            verbose=False,
        )
        assert program is not None
        # Round-trip through a file so that all weights end up inside the one model file.
        path = Path(tmp) / "m.onnx"
        program.save(str(path), external_data=False)
        return onnx.load_model(str(path))


def _qdq(model: onnx.ModelProto, x: np.ndarray, keep_float: list[str]) -> onnx.ModelProto:
    """Static QDQ quantization by onnxruntime, leaving the nodes ``keep_float`` in float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items: Iterator[dict[str, np.ndarray]] = iter(
                [{"x": x[i : i + 1]} for i in range(len(x))]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save_model(model, str(source))
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep_float,
        )
        return onnx.load_model(str(target))


Save = Callable[[onnx.ModelProto, Entry], None]


def build(out: Path) -> list[Entry]:
    """Export every corpus model into ``out``, checked and size-limited; their entries."""
    entries: list[Entry] = []

    def save(model: onnx.ModelProto, entry: Entry) -> None:
        onnx.checker.check_model(model, full_check=True)
        path = out / entry.file
        onnx.save_model(model, str(path))
        entry.size = path.stat().st_size
        if entry.size > SIZE_LIMIT:
            raise SystemExit(f"{entry.file} is {entry.size} bytes, over {SIZE_LIMIT}")
        entries.append(entry)
        print(f"{entry.file:40s} {entry.size:>8d} bytes")

    image = torch.randn(2, 3, 8, 8)
    cnn = build_cnns(save, image)
    build_heads(save, image)
    build_attention(save)
    build_lstm(save)
    build_qdq(save, cnn, image)
    return entries


def build_cnns(save: Save, image: torch.Tensor) -> nn.Module:
    """The CNN from every exporter and opset, and in float16; the float CNN."""
    batch_axis = {"x": {0: "batch"}, "logits": {0: "batch"}}
    cnn = _seeded(TinyCNN)
    covers = "Conv, grouped Conv, depthwise Conv, ConvTranspose, Gemm transB; dynamic batch"
    for opset in (11, 13, 17, 21):
        save(
            _torchscript(cnn, (image,), opset, ["x"], ["logits"], batch_axis),
            Entry(f"cnn_torchscript_op{opset}.onnx", "torchscript", opset, covers),
        )
    for opset in (18, 21):
        save(
            _dynamo(cnn, (image,), opset, ["x"], ["logits"], batch_axis),
            Entry(f"cnn_dynamo_op{opset}.onnx", "dynamo", opset, covers),
        )
    half = _seeded(TinyCNN).half()
    save(
        _torchscript(half, (image.half(),), 17, ["x"], ["logits"], batch_axis),
        Entry(
            "cnn_fp16_torchscript_op17.onnx",
            "torchscript",
            17,
            "float16 weights, inputs and outputs",
            dtype="float16",
        ),
    )
    return cnn


def build_heads(save: Save, image: torch.Tensor) -> None:
    """Three outputs of three kinds."""
    heads = _seeded(TwoHeads)
    save(
        _torchscript(
            heads,
            (image,),
            17,
            ["x"],
            ["logits", "label", "probs"],
            {
                "x": {0: "batch"},
                "logits": {0: "batch"},
                "label": {0: "batch"},
                "probs": {0: "batch"},
            },
        ),
        Entry(
            "heads_torchscript_op17.onnx",
            "torchscript",
            17,
            "three outputs: float logits, int64 argmax, softmax",
        ),
    )


def build_attention(save: Save) -> None:
    """Token attention from both exporters."""
    attention = _seeded(TokenAttention)
    ids = torch.randint(0, 32, (2, 5))
    token_axes = {"ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    for opset, export, name in (
        (14, _torchscript, "torchscript"),
        (18, _dynamo, "dynamo"),
        (21, _dynamo, "dynamo"),
    ):
        save(
            export(attention, (ids,), opset, ["ids"], ["logits"], token_axes),
            Entry(
                f"attention_{name}_op{opset}.onnx",
                name,
                opset,
                "int64 token ids (Embedding = Gather, not a layer), Q/K/V/O and MLP Linear "
                "on 3-d activations (MatMul), activation x activation MatMul; dynamic batch "
                "and sequence",
                input_shapes={"ids": [1, 6]},
                input_ranges={"ids": [0, 32]},
                skipped=["activation x activation"],
            ),
        )


def build_lstm(save: Save) -> None:
    """An LSTM whose weights feed the LSTM op (not prunable) and a Linear head."""
    lstm = _seeded(TinyLSTM)
    sequence = torch.randn(2, 5, 4)
    lstm_model = _torchscript(
        lstm, (sequence,), 14, ["x"], ["logits"], {"x": {0: "batch"}, "logits": {0: "batch"}}
    )
    lstm_weights = [
        node.input[i]
        for node in lstm_model.graph.node
        if node.op_type == "LSTM"
        for i in (1, 2, 3)
        if i < len(node.input) and node.input[i]
    ]
    save(
        lstm_model,
        Entry(
            "lstm_torchscript_op14.onnx",
            "torchscript",
            14,
            "LSTM (weights W, R, B feed the LSTM op: not prunable) and a Linear head",
            not_layers=lstm_weights,
        ),
    )


def build_qdq(save: Save, cnn: nn.Module, image: torch.Tensor) -> None:
    """The CNN quantized (QDQ) by onnxruntime, the Gemm left in float."""
    batch_axis = {"x": {0: "batch"}, "logits": {0: "batch"}}
    float_cnn = _torchscript(cnn, (image,), 13, ["x"], ["logits"], batch_axis)
    gemm = next(node.name for node in float_cnn.graph.node if node.op_type == "Gemm")
    calibration = torch.randn(8, 3, 8, 8).numpy()
    save(
        _qdq(float_cnn, calibration, keep_float=[gemm]),
        Entry(
            "cnn_qdq_op13.onnx",
            "torchscript + onnxruntime quantize_static (QDQ)",
            13,
            "QDQ-quantized Conv and ConvTranspose weights (skipped: int8 behind "
            "DequantizeLinear); the Gemm is left in float",
            skipped=["quantized weight"],
        ),
    )


def write_readme(out: Path, entries: list[Entry]) -> None:
    rows = "\n".join(
        f"| `{e.file}` | {e.exporter} | {e.opset} | {e.dtype} | {e.covers} | {e.size:,} |"
        for e in entries
    )
    text = f"""# Model corpus

Small real exports that `tests/test_corpus.py` prunes (methods rd and global, ratio 0.5,
11 levels, 8 synthetic samples), writes, reloads and runs in onnxruntime, checking that only
the prunable weights changed, only to zero, that every other byte of the model is the same,
and that exactly ceil(0.5 x prunable weights) are zero. Hand-built graphs (Constant-node
weights, If and Loop bodies, a shared initializer, Gemm with alpha/beta, transA/transB and
broadcast biases, MatMul and Gemm with the constant on the left, Conv1d/Conv3d, float64,
opset 11 and 21 variants, ...) live in `tests/graphs.py` and `tests/graphs_corpus.py`.

Regenerate (torch {torch.__version__}, onnx {onnx.__version__}; weights from
`torch.manual_seed(0)`; about 30 s on 2 cores):

    .venv-torch/bin/pip install onnxscript       # the dynamo exporter needs it
    .venv-torch/bin/python scripts/make_corpus.py

`corpus.json` holds, per file, the calibration settings the test uses (input shapes for
dynamic axes, value ranges for integer inputs), the skip reasons it expects and the weights
that must not be prunable layers.

| file | exporter | opset | dtype | covers | bytes |
| ---- | -------- | ----: | ----- | ------ | ----: |
{rows}

Notes:

- Every export has a dynamic batch axis; the attention models also a dynamic sequence axis
  (the test fills it with `--input-shape ids:1x6`).
- `TinyCNN.fc` has every 7th input column set to zero before export, so the Gemm starts
  14.5% sparse: the test allows for weights that were zero before.
- The dynamo exporter writes the Linear weights of 3-d activations as pre-transposed
  initializers (`val_N`) feeding MatMul; their names can differ between a first run after
  installing and later runs (the graphs are the same).
- `lstm_torchscript_op14.onnx`: the LSTM's W, R and B are inputs of the LSTM node; they are
  not prunable layers (and `inspect` does not list them at all).
- `cnn_qdq_op13.onnx`: onnxruntime's `quantize_static` (QDQ format, int8, per tensor) on
  `cnn_torchscript_op13.onnx` with the Gemm left in float, so the model still has a
  prunable layer; the four quantized weights are listed as skipped.
- `heads_torchscript_op17.onnx` has an int64 output below every layer: `--method rd` fails on
  it (see the xfail in `tests/test_corpus.py`); `global` works.
"""
    (out / "README.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder [{OUT}]")
    args = parser.parse_args()
    logging.getLogger("torch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.onnx"):
        old.unlink()
    entries = build(args.out)
    manifest: dict[str, Any] = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "models": {e.file: {k: v for k, v in vars(e).items() if k != "file"} for e in entries},
    }
    (args.out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_readme(args.out, entries)


if __name__ == "__main__":
    main()
