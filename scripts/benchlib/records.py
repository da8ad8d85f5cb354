"""Result files: where they go, how they are written, resumed, and what machine made them."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from rdprune_onnx.runtime import versions

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"  # generated JSON, Markdown tables and plots (never docs/)

RowKey = tuple[str, float]


def json_default(value: Any) -> Any:
    """numpy scalars and arrays, and dataclasses, as JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file beside it, then a rename), so
    that an interrupted run never leaves half a record; the folder is created if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def dumps(record: Any, indent: int | None = 1, default: Any = json_default) -> str:
    """``record`` as the text every benchmark writes: JSON and a final newline."""
    return json.dumps(record, indent=indent, default=default) + "\n"


def write_json(
    path: Path, record: Any, indent: int | None = 1, default: Any = json_default
) -> None:
    """Write ``record`` as JSON, atomically (:func:`write_text`)."""
    write_text(path, dumps(record, indent, default))


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (as records show paths)."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def row_key(row: Mapping[str, Any]) -> RowKey:
    """A result row's identity: its label and its target ratio."""
    return (row["label"], row["ratio"])


def task_rows(record: Any) -> Iterable[tuple[str, list[dict[str, Any]]]]:
    """(task name, rows) of a record: ``{"tasks": [{"name", "rows"}]}``, ``{"tasks": {name:
    {"rows"}}}``, or an old partial record that is the task list itself."""
    tasks = record["tasks"] if isinstance(record, dict) else record
    if isinstance(tasks, dict):
        return [(name, task.get("rows", [])) for name, task in tasks.items()]
    return [(task["name"], task["rows"]) for task in tasks]


def resumed_rows(
    paths: Sequence[Path], say: Any = print
) -> dict[str, dict[RowKey, dict[str, Any]]]:
    """Per task, the rows of earlier records by (label, ratio); later files win. A missing
    file is reported through ``say`` and skipped (``--resume`` of a run that never wrote)."""
    out: dict[str, dict[RowKey, dict[str, Any]]] = {}
    for path in paths:
        if not path.is_file():
            say(f"--resume: {path} not found, skipped", flush=True)
            continue
        for name, rows in task_rows(json.loads(path.read_text())):
            into = out.setdefault(name, {})
            for row in rows:
                into[row_key(row)] = row
    return out


def onnxsim_version() -> str | None:
    """onnxsim's version, or None when it is not importable (its rows are then skipped)."""
    try:
        import onnxsim
    except ImportError:
        return None
    return str(getattr(onnxsim, "__version__", "unknown"))


def version_record(onnxsim: bool = False) -> dict[str, Any]:
    """The library's runtime versions and Python's (and onnxsim's when asked)."""
    out: dict[str, Any] = versions() | {"python": platform.python_version()}
    if onnxsim:
        out["onnxsim"] = onnxsim_version()
    return out


def load_average() -> float:
    """The 1-minute load average (timings on a shared machine are read beside it)."""
    return os.getloadavg()[0]


def machine() -> dict[str, Any]:
    """The machine: Python, CPU count, processor and platform."""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
    }


def host_record(load_start: float) -> dict[str, Any]:
    """CPU count, the load average at the start and now, and the platform."""
    return {
        "cpus": os.cpu_count(),
        "load_start": load_start,
        "load_end": load_average(),
        "platform": platform.platform(),
    }
