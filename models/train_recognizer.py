"""Train a small CTC text-line recognizer on lines rendered from stdlib docstrings; export it.

A benchmark model shaped like deployed OCR recognizers: a CNN of depthwise-separable blocks
(depthwise 3x3 Conv + pointwise 1x1 Conv) with BatchNormalization LEFT UNFOLDED in the
export, a sequence head (a Linear projection and one self-attention block with a feed-forward
layer, all MatMul), and a classifier over printable ASCII + the CTC blank, ending in Softmax.

Everything runs offline on the CPU. Text: ``inspect.getdoc`` of a fixed list of stdlib modules
and their public members, filtered to printable ASCII and packed into lines of at most
``MAX_CHARS`` characters that fit the image width. Training lines come from some modules,
test lines from others (never the same docstring). Lines are rendered with PIL (DejaVu Sans
from Debian's fonts-dejavu when present, else PIL's default font) at a random offset and
ink level. Deterministic for a given ``--seed`` on a given machine (one CPU thread,
deterministic torch algorithms, seeded generators; the font rasteriser is FreeType's).

Outputs (in ``--out``, default: the folder holding this script):

* ``recognizer.onnx``      - opset 17, input ``image`` float32 (N,1,32,128), ink 1 on 0,
  output ``probs`` (N,32,96): per time step, a Softmax over the classes (0 = blank,
  1..95 = chr(32)..chr(126)).
* ``recognizer_calib.npz`` - key ``image``: 128 training lines.
* ``recognizer_test.npz``  - ``input`` (held-out lines), ``label`` (int32, padded with 0),
  ``label_length`` (int32). Scored by ``scripts/recognizer_cer.py``.
* ``recognizer.json``      - seed, sizes, dense CER (onnxruntime), versions, layers.

Run it with the torch virtualenv: ``.venv-torch/bin/python models/train_recognizer.py``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HEIGHT, WIDTH = 32, 128
STEPS = WIDTH // 4  # time steps of the output
MAX_CHARS = 20
CHARSET = "".join(chr(c) for c in range(32, 127))  # class i + 1; class 0 is the blank
N_CALIB = 128
N_TEST = 400
OPSET = 17
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
FONT_SIZE = 13
# Docstrings of these modules (and of their public classes and functions) make the text.
TRAIN_MODULES = (
    "argparse", "collections", "json", "os", "pathlib", "re", "string", "textwrap",
    "itertools", "functools", "subprocess", "shutil", "logging", "datetime", "decimal",
    "fractions", "random", "statistics", "heapq", "bisect", "csv", "configparser",
    "tempfile", "glob", "fnmatch", "zipfile", "tarfile", "gzip", "hashlib", "base64",
    "struct", "codecs", "unicodedata", "difflib", "pprint", "enum", "dataclasses",
    "typing", "contextlib", "abc", "copy", "pickle", "shelve", "sqlite3", "threading",
    "queue", "sched", "socket", "ssl", "select", "selectors", "signal", "asyncio",
    "email", "html", "xml.dom.minidom", "urllib.parse", "http.client", "ftplib",
    "smtplib", "uuid", "ipaddress", "calendar", "locale", "gettext", "io", "time",
)  # fmt: skip
TEST_MODULES = ("inspect", "ast", "dis", "tokenize", "pdb", "doctest", "unittest", "timeit")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="output folder"
    )
    parser.add_argument("--train-lines", type=int, default=16000, help="training lines")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default: 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate")
    return parser.parse_args()


def docstrings(modules: tuple[str, ...]) -> list[str]:
    """Docstrings of each module and its public members, in a fixed order, deduplicated."""
    seen: set[str] = set()
    texts: list[str] = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        objects: list[Any] = [module]
        for name in sorted(dir(module)):
            if name.startswith("_"):
                continue
            member = getattr(module, name, None)
            if inspect.isclass(member) or inspect.isfunction(member) or inspect.isbuiltin(member):
                objects.append(member)
                if inspect.isclass(member):
                    for sub in sorted(vars(member)):
                        if not sub.startswith("_") and callable(vars(member)[sub]):
                            objects.append(vars(member)[sub])
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    return texts


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

    import numpy as np
    import onnx
    import onnxruntime as ort
    import PIL
    import torch
    from PIL import Image, ImageDraw, ImageFont
    from torch import nn

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from recognizer_cer import cer_of, greedy_decode, labels_of

    t_start = time.perf_counter()
    seed: int = args.seed
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(seed)

    # ---------------------------------------------------------------- text
    font: Any
    if Path(FONT).is_file():
        font, font_name = ImageFont.truetype(FONT, FONT_SIZE), f"{Path(FONT).name} {FONT_SIZE}px"
    else:
        font, font_name = ImageFont.load_default(), "PIL default"

    def pack(texts: list[str]) -> list[str]:
        """Printable-ASCII words packed greedily into lines that fit the image."""
        lines: list[str] = []
        for text in texts:
            words = [w for w in "".join(c if c in CHARSET else " " for c in text).split()]
            line = ""
            for word in words:
                candidate = f"{line} {word}" if line else word
                fits = len(candidate) <= MAX_CHARS and font.getlength(candidate) <= WIDTH - 10
                if fits:
                    line = candidate
                    continue
                if len(line) >= 3:
                    lines.append(line)
                line = word if len(word) <= MAX_CHARS and font.getlength(word) <= WIDTH - 10 else ""
            if len(line) >= 3:
                lines.append(line)
        # CTC needs a step per character plus a blank between repeated characters.
        return [s for s in lines if len(s) + sum(a == b for a, b in itertools.pairwise(s)) <= STEPS]

    train_text = pack(docstrings(TRAIN_MODULES))
    test_text = pack(docstrings(TEST_MODULES))
    train_set = set(train_text)
    test_text = [s for s in dict.fromkeys(test_text) if s not in train_set]
    order = rng.permutation(len(train_text))[: args.train_lines]
    train_text = [train_text[i] for i in np.sort(order)]
    test_text = [test_text[i] for i in np.sort(rng.permutation(len(test_text))[:N_TEST])]
    print(f"{len(train_text)} training lines, {len(test_text)} test lines ({font_name})")

    def render(lines: list[str], jitter: bool) -> np.ndarray:
        out = np.zeros((len(lines), 1, HEIGHT, WIDTH), dtype=np.float32)
        for i, line in enumerate(lines):
            image = Image.new("L", (WIDTH, HEIGHT), 0)
            x = int(rng.integers(1, 8)) if jitter else 4
            y = int(rng.integers(6, 11)) if jitter else 8
            ink = int(rng.integers(150, 256)) if jitter else 255
            ImageDraw.Draw(image).text((x, y), line, fill=ink, font=font)
            out[i, 0] = np.asarray(image, dtype=np.float32) / 255.0
        return out

    def encode(lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
        label = np.zeros((len(lines), MAX_CHARS), dtype=np.int32)
        length = np.zeros(len(lines), dtype=np.int32)
        for i, line in enumerate(lines):
            label[i, : len(line)] = [CHARSET.index(c) + 1 for c in line]
            length[i] = len(line)
        return label, length

    t = time.perf_counter()
    x_train = render(train_text, jitter=True)
    y_train, n_train = encode(train_text)
    x_test = render(test_text, jitter=True)
    y_test, n_test = encode(test_text)
    print(f"rendered in {time.perf_counter() - t:.1f}s")

    # ---------------------------------------------------------------- model
    classes = len(CHARSET) + 1

    class Separable(nn.Module):
        """Depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU (MobileNet block)."""

        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
            self.bn_dw = nn.BatchNorm2d(cin)
            self.pw = nn.Conv2d(cin, cout, 1, bias=False)
            self.bn_pw = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.bn_pw(self.pw(self.relu(self.bn_dw(self.dw(x))))))

    class Recognizer(nn.Module):
        def __init__(self, width: int = 128, heads: int = 2) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 32, 3, stride=2, padding=1, bias=False)  # 16 x 64
            self.bn_stem = nn.BatchNorm2d(32)
            self.block1 = Separable(32, 64)  # then pool 2x2 -> 8 x 32
            self.block2 = Separable(64, 96)  # then pool 2x1 -> 4 x 32
            self.block3 = Separable(96, 128)  # then pool 2x1 -> 2 x 32
            self.block4 = Separable(128, 192)  # then max over height -> 1 x 32
            self.proj = nn.Linear(192, width)
            self.heads = heads
            self.qkv = nn.Linear(width, 3 * width)
            self.attn_out = nn.Linear(width, width)
            self.norm1 = nn.LayerNorm(width)
            self.ff1 = nn.Linear(width, 2 * width)
            self.ff2 = nn.Linear(2 * width, width)
            self.norm2 = nn.LayerNorm(width)
            self.classifier = nn.Linear(width, classes)
            self.relu = nn.ReLU()
            self.pool22 = nn.MaxPool2d(2)
            self.pool21 = nn.MaxPool2d((2, 1))

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.bn_stem(self.stem(x)))
            x = self.pool22(self.block1(x))
            x = self.pool21(self.block2(x))
            x = self.pool21(self.block3(x))
            x = self.block4(x).amax(dim=2)  # (N, C, T)
            h = self.proj(x.transpose(1, 2))  # (N, T, width)
            n, steps, width = h.shape
            q, k, v = self.qkv(h).reshape(n, steps, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(-1, -2)) / float(q.shape[-1]) ** 0.5
            mixed = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, steps, width)
            h = self.norm1(h + self.attn_out(mixed))
            h = self.norm2(h + self.ff2(self.relu(self.ff1(h))))
            return self.classifier(h)  # (N, T, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits(x).softmax(dim=-1)

    model = Recognizer()

    # ---------------------------------------------------------------- training
    gen = torch.Generator().manual_seed(seed)
    xt, yt, nt = (torch.from_numpy(a) for a in (x_train, y_train, n_train))
    steps_total = args.epochs * ((len(xt) + args.batch_size - 1) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=steps_total, pct_start=0.15
    )
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)

    def torch_cer(net: Recognizer, x: np.ndarray, y: np.ndarray, n: np.ndarray) -> float:
        net.eval()
        with torch.no_grad():
            scores = torch.cat(
                [net(torch.from_numpy(x[i : i + 256])) for i in range(0, len(x), 256)]
            )
        return cer_of(greedy_decode(scores.numpy()), labels_of(y, n))

    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), args.batch_size):
            idx = perm[start : start + args.batch_size]
            log_probs = model.logits(xt[idx]).log_softmax(-1).transpose(0, 1)  # (T, N, C)
            lengths = nt[idx].long()
            pairs = zip(idx, lengths, strict=True)
            targets = torch.cat([yt[i, : int(count)].long() for i, count in pairs])
            optimizer.zero_grad()
            loss = ctc(log_probs, targets, torch.full((len(idx),), STEPS), lengths)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        print(
            f"epoch {epoch + 1}  ctc {total / len(xt):.4f}  "
            f"test CER {torch_cer(model, x_test, y_test, n_test):.4f}  "
            f"({time.perf_counter() - t_train:.0f}s)",
            flush=True,
        )
    train_s = time.perf_counter() - t_train

    # ---------------------------------------------------------------- export, BN unfolded
    model.eval()
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "recognizer.onnx"
    sample = torch.from_numpy(x_test[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (sample,),
            str(onnx_path),
            input_names=["image"],
            output_names=["probs"],
            opset_version=OPSET,
            # The model is in eval mode; PRESERVE skips the exporter's eval peephole that
            # fuses Conv + BatchNormalization, so BatchNormalization nodes stay in the graph
            # (as in many deployed models) while constants (Linear weights) are folded.
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,
            dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}},
            dynamo=False,
        )
    onnx_model = onnx.load(str(onnx_path))
    onnx.checker.check_model(onnx_model, full_check=True)
    ops = [node.op_type for node in onnx_model.graph.node]
    assert ops.count("BatchNormalization") == 9, f"BatchNorm was folded: {sorted(set(ops))}"
    assert ops[-1] == "Softmax", f"the export should end in Softmax, ends in {ops[-1]}"

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    got = np.concatenate(
        [session.run(None, {"image": x_test[i : i + 64]})[0] for i in range(0, len(x_test), 64)]
    )
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test)).numpy()
    max_diff = float(np.abs(got - ref).max())
    assert max_diff < 1e-4, f"onnxruntime differs from torch by {max_diff}"
    ort_cer = cer_of(greedy_decode(got), labels_of(y_test, n_test))

    # ---------------------------------------------------------------- data files
    calib_idx = np.sort(rng.choice(len(x_train), size=N_CALIB, replace=False))
    np.savez_compressed(out_dir / "recognizer_calib.npz", image=x_train[calib_idx])
    np.savez_compressed(
        out_dir / "recognizer_test.npz", input=x_test, label=y_test, label_length=n_test
    )

    inits = {init.name: init for init in onnx_model.graph.initializer}
    layers: list[dict[str, Any]] = []
    for node in onnx_model.graph.node:
        weight = next((n for n in node.input if n in inits and len(inits[n].dims) >= 2), None)
        if node.op_type in ("Conv", "Gemm", "MatMul") and weight is not None:
            dims = [int(d) for d in inits[weight].dims]
            layers.append(
                {
                    "node": node.name,
                    "op_type": node.op_type,
                    "weight": weight,
                    "shape": dims,
                    "num_weights": int(np.prod(dims)),
                }
            )
    meta: dict[str, Any] = {
        "model": "recognizer.onnx",
        "description": "CTC text-line recognizer: depthwise-separable CNN with unfolded "
        "BatchNormalization, self-attention head, Softmax over 95 ASCII characters + blank",
        "seed": seed,
        "text": "inspect.getdoc of stdlib modules and their public members, printable ASCII, "
        f"packed into lines of <= {MAX_CHARS} characters",
        "train_modules": list(TRAIN_MODULES),
        "test_modules": list(TEST_MODULES),
        "font": font_name,
        "charset": "class 0 = CTC blank, class i = chr(31 + i) for i in 1..95",
        "split": {"train": len(x_train), "test": len(x_test), "calibration": N_CALIB},
        "test_characters": int(n_test.sum()),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "training_s": round(train_s, 1),
        "dense_cer_onnxruntime": ort_cer,
        "max_abs_diff_ort_vs_torch": max_diff,
        "opset": OPSET,
        "exporter": "torchscript, eval mode, no constant folding",
        "input": {"name": "image", "shape": ["batch", 1, HEIGHT, WIDTH], "dtype": "float32"},
        "output": {"name": "probs", "shape": ["batch", STEPS, classes], "dtype": "float32"},
        "batch_normalization_nodes": ops.count("BatchNormalization"),
        "python_version": sys.version.split()[0],
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "pillow_version": PIL.__version__,
        "layers": layers,
        "total_prunable_weights": sum(layer["num_weights"] for layer in layers),
    }
    (out_dir / "recognizer.json").write_text(json.dumps(meta, indent=2) + "\n")
    for layer in layers:
        print(
            f"  {layer['node']:<28} {layer['op_type']:<7} {layer['shape']!s:<18} "
            f"{layer['num_weights']:>6} weights"
        )
    print(f"total prunable weights: {meta['total_prunable_weights']}")
    print(f"max |ort - torch| = {max_diff:.2e}")
    print(f"test CER (onnxruntime): {ort_cer:.4f} on {int(n_test.sum())} characters")
    print(f"training {train_s:.1f}s, total {time.perf_counter() - t_start:.1f}s")


if __name__ == "__main__":
    main()
