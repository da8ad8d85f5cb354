"""The wheel holds every package of the library: pyproject's explicit package list must name
each folder with an __init__.py (an editable install hides a missing one; a normal install
would then fail to import it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject() -> None:
    text = (ROOT / "pyproject.toml").read_text()  # tomllib is 3.11+; the project runs on 3.10
    block = re.search(r"^packages = \[(.*?)\]", text, flags=re.S | re.M)
    assert block is not None, "pyproject.toml has no explicit packages list"
    listed = set(re.findall(r'"([\w.]+)"', block.group(1)))
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "rdprune_onnx").rglob("__init__.py")
    }
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"
