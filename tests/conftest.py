from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tinymodel import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (random-weights) llama GGUF, ~0.5 MB, written once per test session."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
