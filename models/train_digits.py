"""Train a small CNN on scikit-learn's bundled digits data set and export it to ONNX.

Everything runs offline: the data set ships inside scikit-learn (1,797 8x8 grey images of the
digits 0-9). The script is deterministic for a given ``--seed``: one CPU thread, deterministic
torch algorithms, seeded numpy / torch generators.

Outputs (in ``--out``, default: the folder holding this script):

* ``digits_cnn.onnx``   - opset 17, input ``input`` float32 (N,1,8,8) in [0,1] with a dynamic
  batch axis, output ``logits`` (N,10) raw logits. BatchNorm is folded into the convolutions.
* ``digits_calib.npz``  - key ``input``: 256 images from the training split, float32 (256,1,8,8).
* ``digits_test.npz``   - keys ``input`` (all test images) and ``label`` (int64).
* ``digits_cnn.json``   - metadata: seed, split sizes, onnxruntime test accuracy, versions,
  weights per prunable layer.

Run it with the torch virtualenv: ``.venv-torch/bin/python models/train_digits.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any

N_CALIB = 256
OPSET = 17


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: the models/ folder)",
    )
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default: 60)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Single thread, set before torch spins up its pools.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    t_start = time.perf_counter()
    seed: int = args.seed
    random.seed(seed)  # numpy randomness goes through np.random.default_rng(seed) below
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)

    # ---------------------------------------------------------------- data
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N,1,8,8) in [0,1]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=seed, stratify=labels
    )
    x_train = np.ascontiguousarray(x_train, dtype=np.float32)
    x_test = np.ascontiguousarray(x_test, dtype=np.float32)
    y_train = np.ascontiguousarray(y_train, dtype=np.int64)
    y_test = np.ascontiguousarray(y_test, dtype=np.int64)
    print(f"train {len(x_train)} / test {len(x_test)} images")

    # ---------------------------------------------------------------- model
    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(32)
            self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
            self.bn3 = nn.BatchNorm2d(64)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(64 * 2 * 2, 128)
            self.drop = nn.Dropout(0.3)
            self.fc2 = nn.Linear(128, 10)
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.pool(self.relu(self.bn2(self.conv2(x))))
            x = self.pool(self.relu(self.bn3(self.conv3(x))))
            x = torch.flatten(x, 1)
            x = self.drop(self.relu(self.fc1(x)))
            return self.fc2(x)

    model = DigitsCNN()

    # ---------------------------------------------------------------- training
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        """Random shift by up to one pixel in each direction (zero fill)."""
        padded = nn.functional.pad(batch, (1, 1, 1, 1))
        n = batch.shape[0]
        dy = torch.randint(0, 3, (n,), generator=gen)
        dx = torch.randint(0, 3, (n,), generator=gen)
        out = torch.empty_like(batch)
        for i in range(n):
            oy, ox = int(dy[i]), int(dx[i])
            out[i] = padded[i, :, oy : oy + 8, ox : ox + 8]
        return out

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    loss_fn = nn.CrossEntropyLoss()

    def torch_accuracy(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
        net.eval()
        with torch.no_grad():
            pred = net(torch.from_numpy(x)).argmax(1).numpy()
        return float((pred == y).mean())

    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), args.batch_size):
            idx = perm[start : start + args.batch_size]
            xb = augment(xt[idx])
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        if (epoch + 1) % 10 == 0 or epoch == 0:
            acc = torch_accuracy(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  loss {total / len(xt):.4f}  test acc {acc:.4f}")
    train_s = time.perf_counter() - t_train

    # ---------------------------------------------------------------- fold BN, export
    model.eval()

    class FoldedCNN(nn.Module):
        """The eval-mode network with each BatchNorm folded into the conv before it."""

        def __init__(self, src: DigitsCNN) -> None:
            super().__init__()
            self.conv1 = fuse_conv_bn_eval(src.conv1, src.bn1)
            self.conv2 = fuse_conv_bn_eval(src.conv2, src.bn2)
            self.conv3 = fuse_conv_bn_eval(src.conv3, src.bn3)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = src.fc1
            self.fc2 = src.fc2
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.conv1(x))
            x = self.pool(self.relu(self.conv2(x)))
            x = self.pool(self.relu(self.conv3(x)))
            x = torch.flatten(x, 1)
            x = self.relu(self.fc1(x))
            return self.fc2(x)

    folded = FoldedCNN(model).eval()
    with torch.no_grad():
        ref_bn = model(torch.from_numpy(x_test)).numpy()
        ref = folded(torch.from_numpy(x_test)).numpy()
    fold_diff = float(np.abs(ref - ref_bn).max())
    assert fold_diff < 1e-4, f"BN folding changed the outputs by {fold_diff}"

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "digits_cnn.onnx"
    export_kwargs: dict[str, Any] = {
        "input_names": ["input"],
        "output_names": ["logits"],
        "opset_version": OPSET,
        "do_constant_folding": True,
        "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:  # the TorchScript exporter: plain node names, no external data
            torch.onnx.export(
                folded,
                (torch.from_numpy(x_test[:2]),),
                str(onnx_path),
                dynamo=False,
                **export_kwargs,
            )
            exporter = "torchscript"
        except TypeError:  # torch without the dynamo switch
            torch.onnx.export(
                folded, (torch.from_numpy(x_test[:2]),), str(onnx_path), **export_kwargs
            )
            exporter = "default"

    onnx_model = onnx.load(str(onnx_path))
    onnx.checker.check_model(onnx_model, full_check=True)
    ops = [node.op_type for node in onnx_model.graph.node]
    assert "BatchNormalization" not in ops, f"BatchNorm was not folded: {ops}"

    # ---------------------------------------------------------------- verify in onnxruntime
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x_test})[0]
    max_diff = float(np.abs(got - ref).max())
    assert max_diff < 1e-4, f"onnxruntime differs from torch by {max_diff}"
    got1 = sess.run(["logits"], {"input": x_test[:1]})[0]  # the batch axis really is dynamic
    assert got1.shape == (1, 10)
    ort_acc = float((got.argmax(1) == y_test).mean())
    torch_acc = float((ref.argmax(1) == y_test).mean())

    # ---------------------------------------------------------------- data files
    rng = np.random.default_rng(seed)
    calib_idx = np.sort(rng.choice(len(x_train), size=N_CALIB, replace=False))
    np.savez(out_dir / "digits_calib.npz", input=x_train[calib_idx])
    np.savez(out_dir / "digits_test.npz", input=x_test, label=y_test)

    # ---------------------------------------------------------------- metadata
    inits = {init.name: init for init in onnx_model.graph.initializer}
    layers: list[dict[str, Any]] = []
    for node in onnx_model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in inits:
            w = inits[node.input[1]]
            dims = [int(d) for d in w.dims]
            layers.append(
                {
                    "node": node.name,
                    "op_type": node.op_type,
                    "weight": w.name,
                    "shape": dims,
                    "num_weights": int(np.prod(dims)),
                }
            )
    meta: dict[str, Any] = {
        "model": "digits_cnn.onnx",
        "description": "small CNN on scikit-learn's digits (8x8, 10 classes), BN folded",
        "seed": seed,
        "dataset": "sklearn.datasets.load_digits",
        "preprocessing": "pixel / 16 -> float32 [0,1], shape (N,1,8,8)",
        "split": {
            "method": "train_test_split(test_size=0.25, stratify=labels, random_state=seed)",
            "train": len(x_train),
            "test": len(x_test),
            "calibration": N_CALIB,
        },
        "epochs": args.epochs,
        "test_accuracy_onnxruntime": ort_acc,
        "test_accuracy_torch": torch_acc,
        "max_abs_diff_ort_vs_torch": max_diff,
        "opset": OPSET,
        "exporter": exporter,
        "input": {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "layers": layers,
        "total_prunable_weights": sum(layer["num_weights"] for layer in layers),
    }
    (out_dir / "digits_cnn.json").write_text(json.dumps(meta, indent=2) + "\n")

    for layer in layers:
        print(
            f"  {layer['node']:<14} {layer['op_type']:<5} {layer['shape']!s:<18} "
            f"{layer['num_weights']:>6} weights"
        )
    print(f"total prunable weights: {meta['total_prunable_weights']}")
    print(f"max |ort - torch| = {max_diff:.2e}  (exporter: {exporter})")
    print(
        f"test accuracy (onnxruntime): {ort_acc:.4f}  ({round(ort_acc * len(y_test))}"
        f"/{len(y_test)})"
    )
    print(f"training {train_s:.1f}s, total {time.perf_counter() - t_start:.1f}s")
    print(f"wrote {onnx_path}, digits_calib.npz, digits_test.npz, digits_cnn.json in {out_dir}")


if __name__ == "__main__":
    main()
