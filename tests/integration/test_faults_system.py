"""Faults around a real `serve` and a real llama-server: the disk fills up, Redis goes away and comes back, a
model's file is deleted while it is loaded. Each time: a clear error in the caller's dialect, the controller
stays up, nothing is corrupted, and everything works again once the cause is gone."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from controller.runtime.process import free_port
from tests.support.redis_server import redis_server
from tests.support.server import ServeProcess, require, serve_subprocess

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": False, "options": {"num_predict": 2}}


@contextmanager
def small_disk(folder: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``folder``: a disk that really fills up (ENOSPC), unmounted afterwards."""
    require(os.geteuid() == 0 and shutil.which("mount") is not None, "a small tmpfs needs root and mount")
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)], capture_output=True, text=True
    )
    require(mounted.returncode == 0, f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def fill(folder: Path) -> Path:
    """Write until the disk is full; the file is the ballast to delete."""
    ballast = folder / "ballast"
    descriptor = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(descriptor, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return ballast


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "did not recover in time"
        time.sleep(0.1)


def serve_config(root: Path, data_dir: Path, models: dict[str, dict[str, Any]], **sections: Any) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data_dir), "listen": f"127.0.0.1:{free_port()}"},
        "edge": {"enabled": False},
        "models_dir": str(root / "none"),
        "defaults": {"ctx_size": 1024, "keep_alive": "10m"},
        "scheduling": {"max_loaded_models": 2},
        "models": models,
        **sections,
    }


def test_faults_disk_full(tmp_path: Path, tiny_models: Callable[..., dict[str, dict[str, Any]]]) -> None:
    with small_disk(tmp_path / "disk") as disk:
        config = serve_config(tmp_path, disk / "data", tiny_models("a", "b"))
        with serve_config_served(config, tmp_path) as served:
            assert served.http.post("/api/chat", json=CHAT).status_code == 200
            ballast = fill(disk)

            # A loaded model keeps answering (llama-server's own log lines are lost, not its answers).
            assert served.http.post("/api/chat", json=CHAT).status_code == 200
            refused = served.http.post("/control/v1/tokens", json={"name": "new"})
            assert refused.status_code == 503 and "disk is full" in refused.json()["error"], refused.text
            start = served.http.post("/control/v1/models/b/load")
            assert start.status_code == 502 and "No space left on device" in start.json()["error"], start.text
            assert httpx.get(f"{served.url}/healthz").status_code == 200
            assert served.http.get("/api/tags").status_code == 200  # reading the store still works

            ballast.unlink()
            assert served.http.post("/control/v1/tokens", json={"name": "new"}).status_code == 201
            assert served.http.post("/control/v1/models/b/load").status_code == 200
            assert served.http.post("/api/chat", json={**CHAT, "model": "b"}).status_code == 200
            with sqlite3.connect(disk / "data" / "llamacontroller.db") as db:
                assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_faults_redis_goes_away_and_comes_back(
    tmp_path: Path, tiny_models: Callable[..., dict[str, dict[str, Any]]]
) -> None:
    port = free_port()
    with redis_server(tmp_path / "redis", aof=True, port=port) as url:
        store = {"kind": "redis", "redis_url": url}
        config = serve_config(tmp_path, tmp_path / "data", tiny_models("a"), store=store, auth={"token_cache_ttl": 0.2})
        with serve_config_served(config, tmp_path) as served:
            assert served.http.post("/api/chat", json=CHAT).status_code == 200
            redis.Redis.from_url(url).shutdown(nosave=False)  # flushes its append-only file, then exits
            time.sleep(0.3)  # past the token cache: every request needs the store again

            down = served.http.get("/api/tags")
            assert down.status_code == 503 and "redis" in down.json()["error"], served.output()[-3000:]
            openai = served.http.get("/v1/models")
            assert openai.status_code == 503 and "redis" in openai.json()["error"]["message"]
            assert httpx.get(f"{served.url}/healthz").status_code == 200

            with redis_server(tmp_path / "redis", aof=True, port=port):
                eventually(lambda: served.http.get("/api/tags").status_code == 200)
                assert served.http.post("/api/chat", json=CHAT).status_code == 200  # the same token: nothing lost


def test_faults_model_file_deleted_while_loaded(
    tmp_path: Path, tiny_models: Callable[..., dict[str, dict[str, Any]]]
) -> None:
    models = tiny_models("a")
    model_file = Path(models["a"]["path"])
    kept = tmp_path / "kept.gguf"
    shutil.copy(model_file, kept)
    with serve_config_served(serve_config(tmp_path, tmp_path / "data", models), tmp_path) as served:
        assert served.http.post("/api/chat", json=CHAT).status_code == 200
        model_file.unlink()
        assert served.http.post("/api/chat", json=CHAT).status_code == 200  # mapped in memory: still served
        assert served.http.post("/control/v1/models/a/unload").status_code == 200

        # Whichever sees it first says so: the catalog's rescan (a 400 before any start) or llama-server (a 502).
        gone = served.http.post("/api/chat", json=CHAT)
        refused = gone.status_code == 400 and "file not found" in gone.json()["error"]
        failed = gone.status_code == 502 and "(No such file or directory)" in gone.json()["error"]
        assert refused or failed, gone.text
        openai = served.http.post("/v1/chat/completions", json={"model": "a", "messages": CHAT["messages"]})
        assert openai.status_code == gone.status_code and openai.json()["error"]["message"]
        assert httpx.get(f"{served.url}/healthz").status_code == 200

        shutil.copy(kept, model_file)
        eventually(lambda: served.http.post("/api/chat", json=CHAT).status_code == 200, seconds=20)
        assert served.http.get("/control/v1/models/a").json()["state"] == "ready"


@contextmanager
def serve_config_served(config: dict[str, Any], root: Path) -> Iterator[ServeProcess]:
    with serve_subprocess(config, root) as served:
        yield served
        assert served.process.poll() is None, "the controller stayed up"
