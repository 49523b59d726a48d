from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from controller.api.system import llama_server_facts
from controller.config import validate_config
from controller.runtime.process import free_port
from llamacontroller.cli import _banner, main

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def test_cli_config_check_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(CONFIG_DIR / "llamacontroller.example.yaml")]) == 0
    out = capsys.readouterr().out
    assert "OK (4 model(s) configured)" in out
    assert "warning: model file not found" in out  # the example points at files this machine lacks


def test_cli_config_check_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'models:\n  "gemma3:270m":\n    path: g.gguf\n    ctx_size: 0\nserver:\n  lisen: x\n'
        "defaults:\n  health_interval: 0\n"
    )
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "defaults.health_interval: must be more than 0 seconds" in err
    assert 'models."gemma3:270m".ctx_size: must be > 0' in err
    assert "server.lisen: unknown field; did you mean 'listen'?" in err


def test_cli_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_cli_serve_refuses_a_bad_listen_address(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--data-dir", str(tmp_path), "--listen", "nowhere"]) == 2
    assert "server.listen" in capsys.readouterr().err


def test_cli_serve_without_llama_server_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"llama_server:\n  binary: {tmp_path / 'no-such-binary'}\nmodels_dir: {tmp_path}\n")
    listen = f"127.0.0.1:{free_port()}"  # not the default port, which another server on this machine may hold
    assert main(["serve", "--config", str(config), "--data-dir", str(tmp_path), "--listen", listen]) == 2
    assert "is not an executable file" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_a_container_runtime_needs_no_local_llama_server(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The app image has no llama-server: with a container runtime the start-up banner names the image instead."""
    config = validate_config(
        {
            "llama_server": {"binary": str(tmp_path / "no-such-binary")},
            "edge": {"enabled": False},
            "runtime": {"kind": kind, "kubernetes": {"models": {"claim_name": "models"}}},
        }
    )
    _banner(config)
    assert f"runtime: {kind}, llama-server image llamacontroller/llama-server:local" in capsys.readouterr().out
    assert asyncio.run(llama_server_facts(config)) == {"image": "llamacontroller/llama-server:local"}


@pytest.mark.parametrize(
    "text",
    [b"models_dir: caf\xe9\n", b"a: " + b"[" * 20_000, b"defaults:\n  keep_alive: " + b"9" * 400 + b"\n"],
    ids=["latin-1", "deep", "huge-number"],
)
def test_cli_config_check_hostile_file_is_an_error_not_a_traceback(
    tmp_path: Path, text: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text)
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_cli_serve_names_an_env_override_that_is_not_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLAMACONTROLLER_SCHEDULING__MAX_LOADED_MODELS", "[")
    assert main(["serve", "--data-dir", str(tmp_path), "--models-dir", str(tmp_path)]) == 2
    assert "environment variable LLAMACONTROLLER_SCHEDULING__MAX_LOADED_MODELS is not valid YAML" in (
        capsys.readouterr().err
    )


def test_cli_serve_refuses_an_unknown_log_level_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLAMACONTROLLER_LOG_LEVEL", "[")
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--data-dir", str(tmp_path), "--models-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "'[' is not a log level (--log-level or LLAMACONTROLLER_LOG_LEVEL)" in capsys.readouterr().err


def test_cli_user_first_password_reads_the_kept_one_until_it_is_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a container's log must not hold it, `user first-password` reads it from the data dir; changing the
    admin's password deletes the file."""
    data = tmp_path / "data"
    assert main(["user", "first-password", "--data-dir", str(data)]) == 1
    assert "no first password is kept" in capsys.readouterr().err
    data.mkdir()
    (data / "initial-admin-password").write_text("first-secret-1\n")
    assert main(["user", "first-password", "--data-dir", str(data)]) == 0
    assert capsys.readouterr().out == "first-secret-1\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("first-secret-1\nnew-password-2\n"))
    assert main(["user", "add", "admin", "--admin", "--data-dir", str(data)]) == 0
    assert main(["user", "passwd", "admin", "--data-dir", str(data)]) == 0
    assert not (data / "initial-admin-password").exists()


def test_cli_gateway_refuses_a_controller_url_it_cannot_speak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    args = ["gateway", "--data-dir", str(tmp_path), "--listen", listen, "--controller", "https://controller.example"]
    assert main(args) == 2
    assert "gateway.controller" in capsys.readouterr().err
