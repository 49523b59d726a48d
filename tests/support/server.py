"""Run the real application for integration tests: in-process (Hypercorn) or as a `serve` subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import pytest
import yaml
from quart import Quart

from common.errors import BackendStartFailed
from controller.auth.admin import Administration
from controller.config import Config, validate_config
from controller.lifecycle.supervisor import Supervisor
from controller.runtime.process import free_port
from controller.services import services_of
from controller.settings import find_llama_server
from controller.store import make_store
from llamacontroller.app import create_app
from llamacontroller.server import bind, uvicorn_server

T = TypeVar("T")
TESTER_PASSWORD = "tester-password"  # of the admin `provision_token` adds
STRICT_ENV = "LLAMACONTROLLER_TESTS_STRICT"  # set by .ci/run: a missing dependency fails instead of skipping


def run_sync(work: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even where an event loop already runs in this
    thread (Playwright's sync API keeps one): in a thread of its own."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, work).result()


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` when ``condition`` is false — or fail, in CI, where nothing may be skipped."""
    if condition:
        return
    if os.environ.get(STRICT_ENV):
        pytest.fail(f"{reason} (CI must provide it: {STRICT_ENV} is set)")
    pytest.skip(reason)


def llama_server_or_skip() -> str:
    try:
        return find_llama_server(None)
    except BackendStartFailed as exc:
        require(False, f"no llama-server: {exc.message}")
        raise


def real_config(tmp_path: Path, models: dict[str, dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """Raw config dict (YAML-able) with data and models dirs under ``tmp_path``."""
    raw: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "models_dir": str(tmp_path / "discovered"),
        "defaults": {"max_concurrent": 2, "startup_timeout": 60},
        "edge": {"enabled": False},  # tests/integration/test_edge.py runs Caddy, on ports of its own
        "models": models,
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


async def provision_token(config: Config, scopes: tuple[str, ...] = ("admin",), user: str = "tester") -> str:
    """Create (once) an admin user and a new API token in the config's store; return the token."""
    store, _ = make_store(config)
    await store.open()
    try:
        service = Administration(store)
        if await store.get_user(user) is None:
            await service.add_user(user, TESTER_PASSWORD, "admin", "tests")
        token, _ = await service.create_token(user, "tests", list(scopes), [], None, None, "tests")
        return token
    finally:
        await store.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def backend_headers(data_dir: Path | str, model: str) -> dict[str, str]:
    """What opens a process-runtime backend to a test or bench that asks llama-server directly: its own key,
    from the key file the controller wrote (``model`` is the catalog key, e.g. ``tiny:latest``)."""
    return bearer((Path(data_dir) / "run" / f"{model}.key").read_text().strip())


@dataclass
class RunningApp:
    url: str
    app: Quart
    client: httpx.AsyncClient  # authenticated as an admin
    token: str

    @property
    def supervisor(self) -> Supervisor:
        supervisor: Supervisor = services_of(self.app).supervisor
        return supervisor


@asynccontextmanager
async def running_app(config: Config | dict[str, Any], **app_options: Any) -> AsyncIterator[RunningApp]:
    """The whole app on a real socket, served by uvicorn (as `serve` does) in this event loop;
    ``app_options`` go to create_app (a FakeRuntime, say)."""
    if isinstance(config, dict):
        config = validate_config(config)
    token = await provision_token(config)
    app = create_app(config, **app_options)
    sock = bind(config.server.listen)
    server = uvicorn_server(app, config)
    server.config.loop = "none"  # the test's event loop
    task = asyncio.create_task(server.serve(sockets=[sock]))
    url = f"http://{config.server.listen}"
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(token)) as client:
        deadline = time.monotonic() + 20
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError("the app did not become ready")
            await asyncio.sleep(0.02)
        try:
            yield RunningApp(url, app, client, token)
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 30)
            sock.close()


def backend_processes(model_file: Path) -> list[psutil.Process]:
    """llama-server processes serving ``model_file`` (a path unique to one test)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if str(model_file) in cmdline and any("llama-server" in part for part in cmdline[:1]):
            found.append(proc)
    return found


def edge_section() -> dict[str, Any]:
    """An enabled edge (a supervised Caddy) on free loopback ports."""
    return {"enabled": True, "listen": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}"}


@dataclass
class ServeProcess:
    process: subprocess.Popen[str]
    url: str
    log_path: Path
    token: str
    http: httpx.Client  # authenticated as an admin
    config_path: Path
    config: dict[str, Any]

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)

    @property
    def https_url(self) -> str:
        return f"https://{self.config['edge']['listen']}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ca_file(self) -> Path:
        """The edge's local CA, written by `llamacontroller edge ca --output` (the README's way)."""
        target = self.config_path.with_name(f"{self.config_path.stem}-ca.pem")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "llamacontroller",
                "edge",
                "ca",
                "--config",
                str(self.config_path),
                "--output",
                str(target),
            ],
            check=True,
            capture_output=True,
        )
        return target


def answers(url: str, process: subprocess.Popen[Any], seconds: float) -> bool:
    """Poll ``url`` until it answers 200 (True); False once ``process`` has exited or the time is up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def edge_serves(url: str, process: subprocess.Popen[Any], seconds: float) -> bool:
    """Poll ``/readyz`` until it says the edge serves (``"edge": {"state": "ok"}``): the controller is ready
    before its edge is (readiness is its own), and a test of the HTTPS side waits for both."""
    deadline = time.monotonic() + seconds
    while True:
        if httpx.get(f"{url}/readyz", timeout=5).json().get("edge", {}).get("state") == "ok":
            return True
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@contextmanager
def serve_subprocess(config: dict[str, Any], tmp_path: Path, name: str = "serve") -> Iterator[ServeProcess]:
    """`llamacontroller serve --config ...` as a real process; stopped with SIGTERM (or already killed)."""
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    token = run_sync(provision_token(validate_config(config)))
    log_path = tmp_path / f"{name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llamacontroller", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://{config['server']['listen']}"
    http = httpx.Client(base_url=url, headers=bearer(token), timeout=120)
    served = ServeProcess(process, url, log_path, token, http, config_path, config)
    try:
        if not answers(f"{url}/readyz", process, 60):
            raise RuntimeError(f"serve did not become ready:\n{served.output()}")
        if config.get("edge", {}).get("enabled", True) and not edge_serves(url, process, 60):
            raise RuntimeError(f"the edge did not come up:\n{served.output()}")
        yield served
    finally:
        served.http.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def serve_processes(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``start(config, name)`` runs `serve` (serve_subprocess); every one started is stopped on exit, last first."""
    with ExitStack() as stack:

        def start(config: dict[str, Any], name: str = "serve") -> ServeProcess:
            return stack.enter_context(serve_subprocess(config, tmp_path, name))

        yield start


@dataclass
class RunningGateway:
    url: str
    process: Any  # llamacontroller.gateway.GatewayProcess
    client: httpx.AsyncClient  # authenticated as the controller's admin
    server: Any
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 30)


@asynccontextmanager
async def running_gateway(controller: RunningApp, config: Config) -> AsyncIterator[RunningGateway]:
    """A gateway process's app (``llamacontroller gateway``) on a socket of its own, in this event loop, following
    ``controller``: what `serve` runs as its workers."""
    from controller.auth.secrets import internal_secret
    from llamacontroller.gateway import GatewayProcess

    listen = f"127.0.0.1:{free_port()}"
    process = GatewayProcess(config, controller.url, internal_secret(config.secrets_dir))
    sock = bind(listen)
    sockets = [sock]
    if config.gateway.metrics_listen:
        sockets.append(bind(config.gateway.metrics_listen))
    server = uvicorn_server(process, config, process.control.end_streams)
    server.config.loop = "none"
    task = asyncio.create_task(server.serve(sockets=sockets))
    async with httpx.AsyncClient(base_url=f"http://{listen}", timeout=60, headers=bearer(controller.token)) as client:
        deadline = time.monotonic() + 20
        while not (server.started and process.directory.synced.is_set()):
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            await asyncio.sleep(0.02)
        running = RunningGateway(f"http://{listen}", process, client, server, task)
        try:
            yield running
        finally:
            if not task.done():
                await running.stop()
            for each in sockets:
                each.close()
