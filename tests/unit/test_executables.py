"""Finding an executable (llama-server, Caddy) and what a child inherits of the environment, in one place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from common.errors import BackendStartFailed, EdgeError, LlamaControllerError
from controller.edge.child import find_caddy
from controller.settings import child_environment, find_executable, find_llama_server
from tests.support.server import require


def _tool(folder: Path, name: str = "tool", mode: int = 0o755) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def _find(configured: str | None, bundled: str | None = None) -> str:
    return find_executable(
        "tool",
        configured,
        setting="tools.binary",
        bundled=lambda: bundled,
        missing="tool was not found",
        error=EdgeError,
    )


def test_executables_a_configured_name_is_looked_up_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = _tool(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert _find("tool", bundled="/elsewhere/tool") == str(tool)


def test_executables_a_configured_path_is_taken_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = _tool(tmp_path / "bin")
    assert _find(str(tool)) == str(tool)
    monkeypatch.chdir(tmp_path)
    assert _find("./bin/tool") == "./bin/tool"  # never shortened to a bare name that PATH would resolve
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _find("~/bin/tool") == str(tool)


@pytest.mark.parametrize("kind", ["missing", "not executable", "a folder", "a name not on PATH"])
def test_executables_a_configured_one_that_is_not_an_executable_file_is_refused(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    configured = {
        "missing": str(tmp_path / "nothing"),
        "not executable": str(_tool(tmp_path / "plain", mode=0o644)),
        "a folder": str(tmp_path),
        "a name not on PATH": "tool",
    }[kind]
    with pytest.raises(EdgeError) as refused:
        _find(configured, bundled="/never/this")
    assert refused.value.message == f"tools.binary {configured!r} is not an executable file"


def test_executables_unconfigured_the_bundled_one_then_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert _find(None, bundled="/packaged/tool") == "/packaged/tool"
    with pytest.raises(EdgeError, match=r"^tool was not found$"):
        _find(None)
    tool = _tool(tmp_path / "bin")
    assert _find(None) == str(tool)
    assert _find("") == str(tool)  # an empty setting is no setting


@pytest.mark.parametrize(
    ("find", "setting", "error"),
    [(find_llama_server, "llama_server.binary", BackendStartFailed), (find_caddy, "edge.binary", EdgeError)],
)
def test_executables_each_binary_names_its_setting(
    find: Callable[[str | None], str], setting: str, error: type[LlamaControllerError], tmp_path: Path
) -> None:
    with pytest.raises(error) as refused:
        find(str(tmp_path / "absent"))
    assert refused.value.message == f"{setting} {str(tmp_path / 'absent')!r} is not an executable file"


def test_executables_find_caddy_finds_the_packaged_one() -> None:
    try:
        caddy = find_caddy(None)
    except EdgeError as exc:
        require(False, exc.message)
        raise
    assert Path(caddy).name == "caddy"


def test_executables_a_child_never_sees_the_controllers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACONTROLLER_AUTH__SECRET", "hidden")
    monkeypatch.setenv("LLAMACONTROLLER_CONFIG", "/etc/llamacontroller.yaml")
    monkeypatch.setenv("NOT_LLAMACONTROLLER_X", "kept")
    env = child_environment()
    assert not [key for key in env if key.startswith("LLAMACONTROLLER_")]
    assert env["NOT_LLAMACONTROLLER_X"] == "kept" and env["PATH"]
