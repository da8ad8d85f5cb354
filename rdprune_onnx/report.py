"""Writing reports: JSON, through :mod:`rdprune_onnx.files`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rdprune_onnx import files
from rdprune_onnx.errors import UserError


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, set | frozenset):  # sorted: equal sets give the same bytes
        return sorted(obj, key=lambda v: (type(v).__name__, str(v)))
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_default, allow_nan=True)


def write_json(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    protect: Sequence[files.Identity] = (),
    label: str = "report",
) -> Path:
    """Write ``obj`` as JSON to ``path`` through :func:`rdprune_onnx.files.write_text`
    (staged, published in one step, never over an input or a non-regular file)."""
    out = Path(path)
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"{label} folder {str(folder)!r} does not exist", "create it first")
    return files.write_text(out, to_json(obj) + "\n", force=force, label=label, protect=protect)
