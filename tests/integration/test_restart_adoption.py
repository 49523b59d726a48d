"""A restarted controller adopts or removes what it left: never two processes for one model, none orphaned."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from tests.support.server import ServeProcess, backend_processes, real_config, serve_subprocess

Models = Callable[..., dict[str, dict[str, Any]]]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def status(served: ServeProcess, name: str) -> dict[str, Any]:
    body: dict[str, Any] = served.http.get(f"/control/v1/models/{name}", timeout=10).json()
    return body


def chat(served: ServeProcess, name: str) -> int:
    return served.http.post("/v1/chat/completions", json={"model": name, **CHAT}, timeout=60).status_code


def test_restart_adopts_backends_kept_on_exit(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    model_file = Path(models["a"]["path"])
    config = real_config(tmp_path, models, runtime={"keep_backends_on_exit": True})
    with serve_subprocess(config, tmp_path, "first") as first:
        assert chat(first, "a") == 200
        pid = int(status(first, "a")["handle"])
    assert [p.pid for p in backend_processes(model_file)] == [pid], "the backend outlived its controller"

    with serve_subprocess(config, tmp_path, "second") as second:
        adopted = status(second, "a")
        assert adopted["state"] == "ready" and adopted["adopted"] is True and int(adopted["handle"]) == pid
        assert chat(second, "a") == 200
        assert [p.pid for p in backend_processes(model_file)] == [pid]
        assert second.http.post("/control/v1/models/a/unload", timeout=30).json()["state"] == "stopped"
        assert backend_processes(model_file) == []


def test_killed_controller_leaves_nothing_behind_after_the_next_run(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    model_file = Path(models["a"]["path"])
    config = real_config(tmp_path, models)
    with serve_subprocess(config, tmp_path, "first") as first:
        assert chat(first, "a") == 200
        pid = int(status(first, "a")["handle"])
        first.process.send_signal(signal.SIGKILL)  # no chance to clean up
        first.process.wait()
    assert psutil.pid_exists(pid)

    with serve_subprocess(config, tmp_path, "second") as second:
        assert status(second, "a")["state"] == "ready", "the left-over backend is adopted, not duplicated"
        assert chat(second, "a") == 200
        assert [p.pid for p in backend_processes(model_file)] == [pid]
    assert backend_processes(model_file) == [], "a clean stop stops what was adopted too"


def test_changed_config_removes_the_stale_backend(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    model_file = Path(models["a"]["path"])
    config = real_config(tmp_path, models, runtime={"keep_backends_on_exit": True})
    with serve_subprocess(config, tmp_path, "first") as first:
        assert chat(first, "a") == 200
        old_pid = int(status(first, "a")["handle"])

    models["a"]["ctx_size"] = 512  # another command line: the old backend must not be adopted
    with serve_subprocess(config, tmp_path, "second") as second:
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        assert status(second, "a")["state"] == "stopped"
        assert chat(second, "a") == 200
        live = backend_processes(model_file)
        assert len(live) == 1 and live[0].pid != old_pid
        assert "--ctx-size" in live[0].cmdline() and "1024" in live[0].cmdline()  # 512 x 2 slots
        assert "removing backend" in second.output()
    for proc in backend_processes(model_file):  # keep_backends_on_exit: stop what this test started
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_a_clients_keep_alive_forever_survives_a_killed_controller(tmp_path: Path, tiny_models: Models) -> None:
    """An Ollama client loads with keep_alive -1 (forever); the controller is killed; the next one adopts the
    backend and keeps it forever too (before, the adopted model expired after the default 5 minutes)."""
    models = tiny_models("a")
    config = real_config(tmp_path, models)
    with serve_subprocess(config, tmp_path, "first") as first:
        loaded = first.http.post("/api/generate", json={"model": "a", "keep_alive": -1}, timeout=60)
        assert loaded.status_code == 200
        assert status(first, "a")["expires_at"] is None
        pid = int(status(first, "a")["handle"])
        pid_file = tmp_path / "data" / "run" / "a:latest.json"
        deadline = time.monotonic() + 30
        while json.loads(pid_file.read_text())["labels"].get("keep_alive") != "inf":  # kept with the backend
            assert time.monotonic() < deadline, pid_file.read_text()
            time.sleep(0.05)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()

    with serve_subprocess(config, tmp_path, "second") as second:
        adopted = status(second, "a")
        assert adopted["adopted"] is True and int(adopted["handle"]) == pid
        assert adopted["state"] == "ready" and adopted["expires_at"] is None
        # A client that says otherwise is heard: the expiry comes back.
        assert second.http.post("/api/generate", json={"model": "a", "keep_alive": "1h"}, timeout=60).status_code == 200
        assert status(second, "a")["expires_at"] is not None
