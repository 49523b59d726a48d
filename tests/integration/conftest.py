from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import llama_server_or_skip


@pytest.fixture(autouse=True)
def llama_server() -> str:
    """Every integration test runs the real llama-server."""
    return llama_server_or_skip()


@pytest.fixture
def tiny_models(tmp_path: Path, tiny_model: Path) -> Callable[..., dict[str, dict[str, Any]]]:
    """``tiny_models("a", "b", a={"pinned": True})`` → config ``models:`` with one tiny GGUF copy each."""

    def make(*names: str, **settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
        folder = tmp_path / "models"
        folder.mkdir(exist_ok=True)
        models: dict[str, dict[str, Any]] = {}
        for name in names:
            target = folder / f"{name.replace(':', '-')}.gguf"
            shutil.copy(tiny_model, target)
            models[name] = {"path": str(target), **settings.get(name, {})}
        return models

    return make
