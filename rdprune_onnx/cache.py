"""Saved rate-distortion curves: a resumable cache, and the file ``curves`` writes.

A curve file records what the curves belong to (a fingerprint of the model, one of the
calibration data, and the measurement settings) and the curves measured so far. It is
rewritten atomically after every layer, so a run that is killed resumes from the layers it
finished; a file whose fingerprints do not match is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping
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
                name: {
                    "ratios": c.ratios.tolist(),
                    "distortion": c.distortion.tolist(),
                    "checksum": curve_checksum(self.key, name, c),
                }
                for name, c in self.curves.items()
            },
        } | ({"grid": self.grid} if self.grid is not None else {})

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CurveFile:
        if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
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


def curve_checksum(key: str, name: str, curve: Curve) -> str:
    """SHA-256 of one curve's content and the cache key it was measured under."""
    text = json.dumps([key, name, curve.ratios.tolist(), curve.distortion.tolist()], allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def curve_problem(curve: Curve) -> str | None:
    """Why a curve cannot be used (NaN, negative distortion, bad grid), or None."""
    ratios, distortion = curve.ratios, curve.distortion
    if ratios.ndim != 1 or distortion.shape != ratios.shape or len(ratios) < 2:
        return f"{len(distortion.reshape(-1))} distortions for {len(ratios.reshape(-1))} ratios"
    if not (np.all(np.isfinite(ratios)) and np.all(np.isfinite(distortion))):
        return "NaN or Inf values"
    if np.any(distortion < 0):
        return "negative distortion"
    if np.any(np.diff(ratios) <= 0) or ratios[0] < 0 or ratios[-1] > 1:
        return "ratios not increasing within [0, 1]"
    return None


def read_curve_file(path: str | os.PathLike[str]) -> CurveFile:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"curves file {str(p)!r} does not exist", "run `rdprune-onnx curves`")
    try:
        saved = CurveFile.from_dict(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(
            f"{str(p)!r} is not a curves file ({exc})", "write one with `rdprune-onnx curves`"
        ) from None
    for name, curve in saved.curves.items():
        problem = curve_problem(curve)
        if problem is not None:
            raise UserError(
                f"{str(p)!r}: the curve of {name!r} is unusable ({problem})",
                "measure the curves again with `rdprune-onnx curves`",
            )
    return saved


def default_cache_dir() -> Path:
    env = os.environ.get("RDPRUNE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rdprune-onnx"


def _lock(path: Path, fcntl: Any) -> int:
    """Open and lock ``path`` (exclusive; waits for another holder), retrying when the
    holder removed the file meanwhile; returns the locked descriptor."""
    warned = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not warned:
                    log.warning("another run is measuring the same curves (%s); waiting", path)
                    warned = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass  # removed by the run that held it: lock the new one
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


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
            raw = json.loads(path.read_text())
            cached = CurveFile.from_dict(raw)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            log.warning("ignoring unreadable curve cache %s (re-measuring): %s", path, exc)
            return {}
        if not cached.matches(entry):
            return {}
        good: dict[str, Curve] = {}
        bad: list[str] = []
        for name, curve in cached.curves.items():
            if entry.layers.get(name) != cached.layers.get(name):
                continue
            stored = (
                raw["curves"][name].get("checksum")
                if isinstance(raw["curves"][name], dict)
                else None
            )
            problem = curve_problem(curve)
            if problem is None and stored != curve_checksum(entry.key, name, curve):
                problem = "checksum mismatch" if stored else "no checksum"
            if problem is not None:
                bad.append(f"{name} ({problem})")
                continue
            good[name] = curve
        if bad:
            log.warning(
                "curve cache %s: %d entr%s failed the check and will be re-measured: %s",
                path,
                len(bad),
                "y" if len(bad) == 1 else "ies",
                ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""),
            )
        log.info("resuming from %d cached curves in %s", len(good), path)
        return good

    @contextlib.contextmanager
    def locked(self, entry: CurveFile) -> Iterator[None]:
        """Hold this entry's lock file (``<key>.lock``, ``fcntl.flock``) while measuring:
        a second run on the same model, data and settings waits, then resumes from the
        curves the first one stored instead of measuring them again. Other entries are
        not blocked. Without ``fcntl`` (or on a folder that refuses locks) it does nothing."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        path = self.folder / f"{entry.key}.lock"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = _lock(path, fcntl)
        except OSError as exc:
            log.warning("curve cache %s: no lock file (%s)", self.folder, exc)
            yield
            return
        try:
            yield
        finally:
            # Removed while still held: a run waiting on it finds it gone and retries.
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)

    def store(self, entry: CurveFile) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            entry.save(self.path(entry))
        except (OSError, UserError) as exc:
            log.warning("could not write the curve cache %s: %s", self.path(entry), exc)
