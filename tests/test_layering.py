"""The library's import layers (docs/architecture.md), read from the source: only runtime.py
imports onnxruntime; allocate/ and masks/ are pure numpy; graph/ imports nothing above it;
nothing imports the CLI; the flow's modules import downward only (job -> curve_source ->
stages -> pipeline -> probe -> search / sweep). Module-level imports count; an import inside
a function is a deliberate late dispatch (``prune(target=...)`` hands over to search)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rdprune_onnx"
FLOW = ["job", "curve_source", "stages", "pipeline", "probe", "search", "sweep"]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level: bool) -> set[str]:
    """Absolute module names imported by ``path`` (``from rdprune_onnx import x`` counts as
    ``rdprune_onnx.x``); ``top_level``: module-level statements only, TYPE_CHECKING excluded."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            if node.module == "rdprune_onnx":
                found |= {f"rdprune_onnx.{alias.name}" for alias in node.names}
    return found


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _third_party(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}


def test_only_runtime_imports_onnxruntime() -> None:
    users = {m for m, p in MODULES.items() if "onnxruntime" in _imports(p, top_level=False)}
    assert users == {"rdprune_onnx.runtime"}


@pytest.mark.parametrize("package", ["allocate", "masks"])
def test_allocators_and_masks_are_pure_numpy(package: str) -> None:
    for module, path in MODULES.items():
        if not module.startswith(f"rdprune_onnx.{package}"):
            continue
        allowed = {"numpy", "rdprune_onnx.errors"}
        foreign = {
            n
            for n in _third_party(_imports(path, top_level=False))
            if n.split(".")[0] != "numpy"
            and n not in allowed
            and not n.startswith(f"rdprune_onnx.{package}")
        }
        assert foreign == set(), f"{module} imports {sorted(foreign)}"


def test_graph_imports_nothing_above_it() -> None:
    allowed = {"rdprune_onnx", "rdprune_onnx.errors", "rdprune_onnx.files"}
    for module, path in MODULES.items():
        if not module.startswith("rdprune_onnx.graph"):
            continue
        ours = {n for n in _imports(path, top_level=False) if n.startswith("rdprune_onnx")}
        above = {n for n in ours if not n.startswith("rdprune_onnx.graph") and n not in allowed}
        assert above == set(), f"{module} imports {sorted(above)}"


def test_nothing_imports_the_cli() -> None:
    for module, path in MODULES.items():
        names = _imports(path, top_level=False)
        assert not {n for n in names if n.split(".")[0] in ("rdprune_onnx_cli", "click")}, module


@pytest.mark.parametrize("module", FLOW)
def test_the_flow_imports_downward(module: str) -> None:
    above = {f"rdprune_onnx.{m}" for m in FLOW[FLOW.index(module) + 1 :]}
    found = _imports(MODULES[f"rdprune_onnx.{module}"], top_level=True) & above
    assert found == set(), f"{module} imports {sorted(found)} at module level"
