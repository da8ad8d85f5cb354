"""Writing reports: JSON, atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rdprune_onnx.errors import UserError


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, tuple | set):
        return list(obj)
    return str(obj)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_default, allow_nan=True)


def write_json(obj: Any, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    out = Path(path)
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"report folder {str(folder)!r} does not exist", "create it first")
    if out.exists() and not force:
        raise UserError(f"report {str(out)!r} already exists", "pass --force to replace it")
    text = to_json(obj) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".rdprune-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(
            f"could not write {str(out)!r}: {exc.strerror or exc}",
            "free disk space or choose another path",
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
