from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own curve cache folder, never the user's."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("RDPRUNE_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private temporary folder for the sessions' staging folders (rdprune_onnx.runtime
    stages large models in the temporary folder)."""
    folder = tmp_path / "staging"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
