"""The level-triggered lifecycle on the process runtime with the real llama-server: a stop the runtime cannot
confirm is tried again until the backend is gone, and a backend killed while no controller ran is noticed by the
next controller's first pass. (The docker and kubernetes runtimes have the same tests in tests/docker, tests/kube.)"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from common.errors import BackendStopFailed
from controller.config import validate_config
from controller.lifecycle import model as managed_model
from controller.runtime import runtime_setup
from controller.runtime.base import Backend
from controller.runtime.logs import LogBook
from controller.runtime.process import ProcessRuntime
from controller.settings import find_llama_server
from tests.support.server import ServeProcess, backend_processes, real_config, running_app, serve_subprocess

Models = Callable[..., dict[str, dict[str, Any]]]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class StopFailsTwice(ProcessRuntime):
    """Fault injection: the first two stops fail as an engine timeout would, and the backend runs on."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.failed = 0

    async def stop(self, backend: Backend, timeout: float) -> None:
        if self.failed < 2:
            self.failed += 1
            raise BackendStopFailed(f"injected: stop {self.failed} of {backend.handle} failed")
        await super().stop(backend, timeout)


async def test_process_stop_that_fails_twice_ends_stopped_and_never_reads_stopped_before(
    tmp_path: Path, tiny_models: Models, monkeypatch: Any
) -> None:
    monkeypatch.setattr(managed_model, "STOP_RETRY_DELAYS", (0.3,))
    models = tiny_models("a")
    model_file = Path(models["a"]["path"])
    config = validate_config(real_config(tmp_path, models))
    runtime = StopFailsTwice(runtime_setup(config, LogBook(), binary=lambda: find_llama_server(None)))
    async with running_app(config, runtime=runtime) as running:
        client = running.client
        assert (await client.post("/control/v1/models/a/load")).json()["state"] == "ready"
        [process] = backend_processes(model_file)
        unloading = asyncio.create_task(client.post("/control/v1/models/a/unload"))
        seen: list[tuple[str, bool]] = []
        while not unloading.done():
            state = (await client.get("/control/v1/models/a")).json()
            seen.append((state["state"], process.is_running()))
            await asyncio.sleep(0.05)
        assert (await unloading).json()["state"] == "stopped"
        assert runtime.failed == 2
        assert ("stopping", True) in seen, "it reads stopping while the stop is tried again"
        assert ("stopped", True) not in seen, "never stopped while its backend runs"
        assert backend_processes(model_file) == []
        assert (await client.post("/v1/chat/completions", json={"model": "a", **CHAT})).status_code == 200
        assert len(backend_processes(model_file)) == 1, "the next load makes no duplicate"


def status(served: ServeProcess, name: str) -> dict[str, Any]:
    body: dict[str, Any] = served.http.get(f"/control/v1/models/{name}", timeout=10).json()
    return body


def test_process_backend_killed_while_no_controller_runs_is_noticed_by_the_first_pass(
    tmp_path: Path, tiny_models: Models
) -> None:
    models = tiny_models("a")
    model_file = Path(models["a"]["path"])
    config = real_config(tmp_path, models, runtime={"keep_backends_on_exit": True})
    with serve_subprocess(config, tmp_path, "first") as first:
        chat = first.http.post("/v1/chat/completions", json={"model": "a", **CHAT}, timeout=60)
        assert chat.status_code == 200
        pid = int(status(first, "a")["handle"])
    os.kill(pid, signal.SIGKILL)  # behind the controller's back, while none runs
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid_file = tmp_path / "data" / "run" / "a:latest.json"
    assert pid_file.exists()

    with serve_subprocess(config, tmp_path, "second") as second:
        found = status(second, "a")
        assert found["state"] == "stopped" and found["handle"] is None, "not adopted: it is gone"
        assert not pid_file.exists(), "its pid file went with it"
        chat = second.http.post("/v1/chat/completions", json={"model": "a", **CHAT}, timeout=60)
        assert chat.status_code == 200
        assert len(backend_processes(model_file)) == 1
        assert second.http.post("/control/v1/models/a/unload", timeout=30).json()["state"] == "stopped"
