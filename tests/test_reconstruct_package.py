"""The layering of rdprune_onnx/reconstruct/: solvers in pure numpy, each module importing
only the modules below it, and the package's public names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import rdprune_onnx.reconstruct as package
from rdprune_onnx.errors import UserError

ORDER = ["solvers", "layout", "statistics", "refit", "sequential", "refit_curves"]
FOLDER = Path(package.__file__).parent


def _imports(module: str) -> set[str]:
    tree = ast.parse((FOLDER / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_solvers_are_pure_numpy() -> None:
    allowed = {"__future__", "numpy", "threadpoolctl", "rdprune_onnx.errors"}
    foreign = {
        name
        for name in _imports("solvers")
        if name.split(".")[0] not in sys.stdlib_module_names and name not in allowed
    }
    assert foreign == set()


@pytest.mark.parametrize("module", ORDER)
def test_modules_import_only_the_ones_below(module: str) -> None:
    below = {f"rdprune_onnx.reconstruct.{m}" for m in ORDER[: ORDER.index(module)]}
    inside = {n for n in _imports(module) if n.startswith("rdprune_onnx.reconstruct")}
    assert inside <= below, inside - below
    assert "rdprune_onnx.pipeline" not in _imports(module)


def test_package_exports_what_callers_use() -> None:
    for name in package.__all__:
        assert getattr(package, name) is not None
    assert package.reconstruct.__module__ == "rdprune_onnx.reconstruct.sequential"
    assert package.RefitCandidates.__module__ == "rdprune_onnx.reconstruct.refit_curves"


def test_check_solver_refuses_the_user_mistakes() -> None:
    package.check_solver("exact", 0.0)
    with pytest.raises(UserError, match="unknown solver"):
        package.check_solver("lstsq", 0.01)
    with pytest.raises(UserError, match="damping must be >= 0"):
        package.check_solver("auto", -1e-3)
