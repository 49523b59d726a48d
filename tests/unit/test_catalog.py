from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.errors import InvalidModelFile, ModelNotFound
from controller.catalog.entries import Catalog
from controller.config import validate_config


def catalog_for(tmp_path: Path, models: dict[str, object] | None = None) -> Catalog:
    return Catalog(validate_config({"models_dir": str(tmp_path / "models"), "models": models or {}}))


async def test_catalog_discovers_gguf_files_with_ollama_names(tmp_path: Path, tiny_model: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    shutil.copy(tiny_model, models / "gemma-3-270m-q4_k_m.gguf")
    shutil.copy(tiny_model, models / "sub" / "Tiny.gguf")
    shutil.copy(tiny_model, models / "mmproj-model-f16.gguf")  # a projector, not a model
    (models / "notes.txt").write_text("ignored")
    catalog = catalog_for(tmp_path)
    entries = await catalog.refresh()
    assert [e.name for e in entries] == ["gemma-3-270m:q4_k_m", "tiny:latest"]
    assert all(e.source == "discovered" and e.metadata for e in entries)
    assert (await catalog.lookup("tiny")).name == "tiny:latest"


async def test_catalog_configured_name_wins_over_the_discovered_file(tmp_path: Path, tiny_model: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "gemma-3-270m-q4_k_m.gguf")
    catalog = catalog_for(tmp_path, {"gemma3:270m": {"path": str(models / "gemma-3-270m-q4_k_m.gguf")}})
    assert [e.name for e in await catalog.refresh()] == ["gemma3:270m"]


async def test_catalog_keeps_broken_files_with_a_reason(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "fake.gguf").write_bytes(b"<html>not a model</html>")
    catalog = catalog_for(tmp_path, {"missing": {"path": str(tmp_path / "nowhere.gguf")}})
    entries = {e.name: e for e in await catalog.refresh()}
    assert "not a GGUF file" in (entries["fake:latest"].error or "")
    assert "file not found" in (entries["missing"].error or "")
    with pytest.raises(InvalidModelFile, match="cannot be loaded"):
        entries["fake:latest"].require_loadable()


async def test_catalog_unknown_name_rescans_once_then_404(tmp_path: Path, tiny_model: Path) -> None:
    catalog = catalog_for(tmp_path)
    await catalog.refresh()
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_model, tmp_path / "models" / "late.gguf")
    catalog._last_scan = 0.0  # as if the last scan was long ago
    assert (await catalog.lookup("late")).name == "late:latest"
    with pytest.raises(ModelNotFound):
        await catalog.lookup("never")


async def test_catalog_digest_changes_when_the_file_changes(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "m.gguf"
    shutil.copy(tiny_model, target)
    catalog = catalog_for(tmp_path)
    first = (await catalog.refresh())[0].digest
    target.write_bytes(tiny_model.read_bytes() + b"\x00" * 32)
    second = (await catalog.refresh())[0].digest
    assert len(first) == 64 and first != second
