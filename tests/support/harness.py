"""Build a Supervisor over the FakeRuntime (unit/HTTP tests) with real tiny GGUF files in a temp dir."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from quart import Quart

from controller.catalog.entries import Catalog
from controller.config import Config, validate_config
from controller.events import Event
from controller.lifecycle.supervisor import Supervisor
from controller.runtime.fake import FakeRuntime
from controller.runtime.logs import LogBook
from controller.runtime.process import free_port
from llamacontroller.app import create_app


def fake_config(tmp_path: Path, tiny_model: Path, models: dict[str, dict[str, Any]], **sections: Any) -> Config:
    """A config whose models are copies of the tiny GGUF named after each model."""
    models_dir = tmp_path / "models"
    models_dir.mkdir(exist_ok=True)
    resolved: dict[str, dict[str, Any]] = {}
    for name, settings in models.items():
        target = models_dir / f"{name.replace(':', '-')}.gguf"
        if not target.exists():
            shutil.copy(tiny_model, target)
        resolved[name] = {"path": str(target), **settings}
    raw: dict[str, Any] = {
        # A port of its own: tests that serve the app on a socket (running_app) may run beside other such runs.
        "server": {"data_dir": str(tmp_path / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "models_dir": str(tmp_path / "empty-models-dir"),
        "models": resolved,
        # These tests are about the lifecycle and the gateway; tests/http/test_security.py is about auth.
        "auth": {"enabled": False},
        "edge": {"enabled": False},
        **sections,
    }
    return validate_config(raw)


def fake_supervisor(config: Config, runtime: FakeRuntime | None = None) -> tuple[Supervisor, FakeRuntime]:
    runtime = runtime or FakeRuntime()
    events: list[Event] = []
    supervisor = Supervisor(config, runtime, Catalog(config), LogBook(), runtime.probe, events.append)
    supervisor.events = events  # type: ignore[attr-defined]
    return supervisor, runtime


def fake_app(config: Config, runtime: FakeRuntime) -> Quart:
    """The whole app over ``runtime`` (its own probe; a llama-server path that is never run)."""
    return create_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server")
