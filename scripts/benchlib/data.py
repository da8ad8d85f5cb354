"""Calibration data for the benchmarks: fewer samples, unpadded token rows, batches."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

SEP_TOKEN = 102  # [SEP] of the BERT vocabulary (MiniLM's tokenizer)


def calib_subset(path: Path, n: int, folder: Path) -> Path:
    """The first ``n`` samples of a calibration file, written to ``folder`` (cached by name)."""
    out = folder / f"{path.stem}.first{n}.npz"
    if not out.exists():
        with np.load(path) as f:
            np.savez(out, **{k: np.asarray(f[k])[:n] for k in f.files})
    return out


def unpadded_calib(path: Path, length: int, folder: Path) -> Path:
    """The texts of a token calibration file with at least ``length`` tokens, cut to
    ``length`` (the last kept token replaced by [SEP]): every row a real token, no padding."""
    out = folder / f"{path.stem}.unpadded{length}.npz"
    if not out.exists():
        with np.load(path) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
        keep = arrays["attention_mask"].sum(axis=1) >= length
        cut = {k: np.ascontiguousarray(v[keep, :length]) for k, v in arrays.items()}
        cut["input_ids"][:, length - 1] = SEP_TOKEN
        np.savez(out, **cut)
    return out


def calibration_batches(
    data: Mapping[str, np.ndarray], batch_size: int
) -> list[dict[str, np.ndarray]]:
    """``data`` (name -> array, samples on axis 0) cut into feeds of ``batch_size`` samples."""
    n = len(next(iter(data.values())))
    return [{k: v[s : s + batch_size] for k, v in data.items()} for s in range(0, n, batch_size)]
