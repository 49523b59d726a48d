"""`serve` with gateway workers, the real llama-server: the controller or a gateway killed mid-traffic.

The measurements of docs/operations.md ("What survives what"): steady traffic to two loaded models while the
controller is killed with SIGKILL — no request fails, the controller is back and ready within 10 s, and it adopts
the same backends; a gateway worker killed — only its own requests fail; a deliberate stop leaves nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from controller.runtime.process import free_port
from tests.support.server import ServeProcess, backend_processes, bearer, real_config, serve_subprocess

Models = Callable[..., dict[str, dict[str, Any]]]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def controller_pid(served: ServeProcess) -> int:
    data_dir = Path(served.config["server"]["data_dir"])
    return int((data_dir / "run" / "controller.pid").read_text())


def gateway_pids(served: ServeProcess) -> list[int]:
    children = psutil.Process(served.process.pid).children()
    return [child.pid for child in children if "gateway" in child.cmdline()]


class Traffic:
    """Requests one after another from ``threads`` threads, to each model in turn, until stopped."""

    def __init__(self, url: str, token: str, models: list[str], threads: int = 2) -> None:
        self.url, self.token, self.models = url, token, models
        self.outcomes: list[tuple[float, int | str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, headers=bearer(self.token), timeout=60) as client:
            n = offset
            while not self._stop.is_set():
                body = {"model": self.models[n % len(self.models)], **CHAT}
                try:
                    outcome: int | str = client.post("/v1/chat/completions", json=body).status_code
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.outcomes.append((time.monotonic(), outcome))
                n += 1

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def failures(self) -> list[int | str]:
        return [outcome for _, outcome in self.outcomes if outcome != 200]


def ready_within(served: ServeProcess, seconds: float) -> float | None:
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        try:
            if httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - began
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return None


def test_a_controller_killed_mid_traffic_drops_nothing(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a", "b")
    config = real_config(tmp_path, models, gateway={"workers": 2}, scheduling={"max_loaded_models": 2})
    with serve_subprocess(config, tmp_path) as served:
        for name in ("a", "b"):
            assert served.http.post("/v1/chat/completions", json={"model": name, **CHAT}).status_code == 200
        backends = {name: [p.pid for p in backend_processes(Path(models[name]["path"]))] for name in ("a", "b")}
        first = controller_pid(served)
        with Traffic(served.url, served.token, ["a", "b"]) as traffic:
            time.sleep(2)
            os.kill(first, signal.SIGKILL)
            time.sleep(0.3)  # the supervisor sees the death and starts another
            back_after = ready_within(served, 10)
            time.sleep(3)  # traffic through the new controller's directory too
        assert back_after is not None, "the controller was not ready again within 10 s"
        assert controller_pid(served) != first
        assert len(traffic.outcomes) > 20 and traffic.failures() == []
        after = {name: [p.pid for p in backend_processes(Path(models[name]["path"]))] for name in ("a", "b")}
        assert after == backends, "the new controller adopted the same backends: none stopped, none added"
        adopted = served.http.get("/control/v1/models/a").json()
        assert adopted["state"] == "ready" and adopted["adopted"] is True
        assert "exited with code -9; starting it again" in served.output()


def test_a_gateway_killed_ends_only_its_own_requests(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    config = real_config(tmp_path, models, gateway={"workers": 2})
    with serve_subprocess(config, tmp_path) as served:
        assert served.http.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
        workers = gateway_pids(served)
        assert len(workers) == 2
        with Traffic(served.url, served.token, ["a"], threads=3) as traffic:
            time.sleep(1)
            os.kill(workers[0], signal.SIGKILL)
            killed_at = time.monotonic()
            time.sleep(3)
        # A request on the killed worker's connection may fail; once it is gone, the other serves every one.
        late = [outcome for at, outcome in traffic.outcomes if at > killed_at + 0.5]
        assert late and all(outcome == 200 for outcome in late), late
        assert len(traffic.failures()) <= 3  # at most the requests in flight on it (one per thread)
        deadline = time.monotonic() + 10
        while len(gateway_pids(served)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        restarted = gateway_pids(served)
        assert len(restarted) == 2 and workers[0] not in restarted


def test_a_deliberate_stop_leaves_nothing_behind(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    config = real_config(tmp_path, models, gateway={"workers": 2})
    with serve_subprocess(config, tmp_path) as served:
        assert served.http.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
        children = [child.pid for child in psutil.Process(served.process.pid).children(recursive=True)]
        assert backend_processes(Path(models["a"]["path"]))
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(60) == 0
    assert backend_processes(Path(models["a"]["path"])) == []
    assert not [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_a_gateway_apart_serves_while_its_controller_is_away(tmp_path: Path, tiny_models: Models) -> None:
    """`llamacontroller gateway` beside a one-process controller (gateway.workers 0): the controller is killed,
    the gateway serves the loaded model on; a request that needs a load waits for it, then gets 503 with
    Retry-After; the next controller adopts the backend and the gateway follows it."""
    models = tiny_models("a", "b")
    settings = {"workers": 0, "load_wait": "1s"}
    config = real_config(tmp_path, models, gateway=settings, scheduling={"max_loaded_models": 2})
    gateway_listen = f"127.0.0.1:{free_port()}"
    with serve_subprocess(config, tmp_path, "first") as first:
        assert first.http.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
        log = (tmp_path / "gateway.log").open("w")
        command = ["gateway", "--config", str(first.config_path), "--listen", gateway_listen, "--controller", first.url]
        gateway = subprocess.Popen(
            [sys.executable, "-m", "llamacontroller", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            apart = httpx.Client(base_url=f"http://{gateway_listen}", headers=bearer(first.token), timeout=60)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if apart.get("/api/ps").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
                time.sleep(0.1)
            backend = [p.pid for p in backend_processes(Path(models["a"]["path"]))]
            first.process.send_signal(signal.SIGKILL)
            first.process.wait()
            for _ in range(5):
                assert apart.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
            away = apart.post("/v1/chat/completions", json={"model": "b", **CHAT})
            assert away.status_code == 503 and away.headers["retry-after"] == "5", away.text
            assert "controller is not answering" in away.json()["error"]["message"]
            with serve_subprocess(config, tmp_path, "second"):
                assert apart.post("/v1/chat/completions", json={"model": "b", **CHAT}).status_code == 200
                assert [p.pid for p in backend_processes(Path(models["a"]["path"]))] == backend
            apart.close()
        finally:
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(30) in (0, -signal.SIGTERM)  # uvicorn ends by raising the signal again
            log.close()
