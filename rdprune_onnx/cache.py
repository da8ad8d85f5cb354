"""Saved rate-distortion curves: a resumable cache, and the file ``curves`` writes.

A curve file records what the curves belong to (a fingerprint of the model, one of the
calibration data, and the measurement settings) and the curves measured so far. It is
rewritten atomically after every layer, so a run that is killed resumes from the layers it
finished; a file whose fingerprints do not match is never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rdprune_onnx.allocate import Curve
from rdprune_onnx.errors import UserError
from rdprune_onnx.graph.external import ExternalWriter, copy_metadata, tensor_array
from rdprune_onnx.graph.load import iter_all_tensors
from rdprune_onnx.report import write_json

log = logging.getLogger(__name__)

FORMAT = "rdprune-onnx-curves/1"


class _Skeleton(ExternalWriter):
    """Copies a model without any tensor data (not even a reference to it)."""

    def tensor(self, src: onnx.TensorProto, dst: onnx.TensorProto, slot: str | None) -> None:
        copy_metadata(src, dst)


def model_fingerprint(model: onnx.ModelProto) -> str:
    """SHA-256 over the graph's structure and every tensor's values.

    Tensors are read one at a time (from disk when lazy) and the structure is hashed from a
    copy without tensor data, so the model is never copied whole; where a tensor's data is
    stored (inline, typed fields, external file) does not change the fingerprint.
    """
    digest = hashlib.sha256()
    for tensor in iter_all_tensors(model):
        content = tensor_array(tensor)
        digest.update(tensor.name.encode())
        digest.update(str(content.dtype).encode() + str(content.shape).encode())
        if content.dtype == object:  # strings: hash the values, not the object pointers
            for item in content.reshape(-1):
                value = item if isinstance(item, bytes) else str(item).encode()
                digest.update(len(value).to_bytes(8, "little") + value)
        else:
            digest.update(np.ascontiguousarray(content).tobytes())
        del content
    stripped = _Skeleton(io.BytesIO(), "").model(model)
    stripped.ClearField("producer_version")
    digest.update(stripped.graph.SerializeToString(deterministic=True))
    return digest.hexdigest()


def data_fingerprint(data: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(data):
        array = np.ascontiguousarray(data[name])
        digest.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class CurveFile:
    """Curves and the identity of what they were measured on."""

    model: str
    data: str
    settings: dict[str, Any]
    layers: dict[str, int]  # name -> number of weights
    curves: dict[str, Curve] = field(default_factory=dict)
    # How the points were scheduled (rdprune_onnx.grid.GridResult.summary). The curves
    # hold their measured points only; a level of the grid that a curve lacks was not
    # measured and is read by linear interpolation. None: not recorded (older files).
    grid: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        text = json.dumps([self.model, self.data, self.settings], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def matches(self, other: CurveFile) -> bool:
        return (self.model, self.data, self.settings) == (other.model, other.data, other.settings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_fingerprint": self.model,
            "data_fingerprint": self.data,
            "settings": self.settings,
            "layers": self.layers,
            "curves": {
                name: {"ratios": c.ratios.tolist(), "distortion": c.distortion.tolist()}
                for name, c in self.curves.items()
            },
        } | ({"grid": self.grid} if self.grid is not None else {})

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CurveFile:
        if raw.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        return cls(
            model=str(raw["model_fingerprint"]),
            data=str(raw["data_fingerprint"]),
            settings=dict(raw["settings"]),
            layers={str(k): int(v) for k, v in raw["layers"].items()},
            curves={
                name: Curve(
                    name,
                    np.asarray(c["ratios"], dtype=np.float64),
                    np.asarray(c["distortion"], dtype=np.float64),
                )
                for name, c in raw["curves"].items()
            },
            grid=dict(raw["grid"]) if isinstance(raw.get("grid"), dict) else None,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json(self.to_dict(), path, force=True)


def read_curve_file(path: str | os.PathLike[str]) -> CurveFile:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"curves file {str(p)!r} does not exist", "run `rdprune-onnx curves`")
    try:
        return CurveFile.from_dict(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{str(p)!r} is not a curves file ({exc})", "write one with `rdprune-onnx curves`"
        ) from None


def default_cache_dir() -> Path:
    env = os.environ.get("RDPRUNE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rdprune-onnx"


class CurveCache:
    """A folder of curve files, one per (model, data, settings) key."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def path(self, entry: CurveFile) -> Path:
        return self.folder / f"{entry.key}.json"

    def load(self, entry: CurveFile) -> dict[str, Curve]:
        """Curves already measured for exactly this model, data and settings."""
        path = self.path(entry)
        if not path.is_file():
            return {}
        try:
            cached = CurveFile.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            log.warning("ignoring unreadable curve cache %s: %s", path, exc)
            return {}
        if not cached.matches(entry):
            return {}
        log.info("resuming from %d cached curves in %s", len(cached.curves), path)
        return {
            name: curve
            for name, curve in cached.curves.items()
            if entry.layers.get(name) == cached.layers.get(name)
        }

    def store(self, entry: CurveFile) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            entry.save(self.path(entry))
        except (OSError, UserError) as exc:
            log.warning("could not write the curve cache %s: %s", self.path(entry), exc)
