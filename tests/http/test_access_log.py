"""The access log: one line for every request (refusals, the gateway, the control plane), naming the model the
request asked for even when it failed, with every value a client chose escaped onto one line."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from quart import Quart
from quart.typing import TestClientProtocol as Client

from common.asgi import Message, Receive, Scope, Send
from common.peers import TrustedProxies
from controller.auth.admin import Administration
from controller.observability import configure_logging
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from proxy.access import AccessLog
from proxy.measure import GatewayMetrics
from tests.support.harness import fake_app, fake_config


@dataclass
class World:
    app: Quart
    client: Client
    token: str  # inference, model "a" only
    caplog: pytest.LogCaptureFixture

    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.caplog.records if r.name == "llamacontroller.access"]

    def line(self, start: str) -> str:
        found = [line for line in self.lines() if line.startswith(start)]
        assert len(found) == 1, f"one line starting {start!r} in {self.lines()}"
        return found[0]


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[World]:
    caplog.set_level(logging.INFO, logger="llamacontroller.access")
    config = fake_config(tmp_path, tiny_model, {"a": {}, "b": {}}, auth={"enabled": True})
    app = fake_app(config, FakeRuntime())  # its backends refuse connections: a generation fails with 502
    async with app.test_app():
        service: Administration = services_of(app).admin
        await service.add_user("alice", "alice-password", "user", "tests")
        token, _ = await service.create_token("alice", "t", ["inference"], ["a"], None, None, "tests")
        yield World(app, app.test_client(use_cookies=False), token, caplog)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_access_log_refusals_of_the_auth_layer_are_logged(world: World) -> None:
    assert (await world.client.get("/api/tags")).status_code == 401
    assert (await world.client.get("/v1/models", headers=bearer("lc_bad_key"))).status_code == 401
    assert (await world.client.get("/control/v1/users", headers=bearer(world.token))).status_code == 403
    assert " status=401 " in world.line("GET /api/tags ")
    assert " status=401 " in world.line("GET /v1/models ")
    assert " status=403 " in world.line("GET /control/v1/users ")


async def test_access_log_refusals_carry_the_request_id(world: World) -> None:
    response = await world.client.get("/api/tags", headers={"X-Request-Id": "probe-1"})
    assert response.status_code == 401 and response.headers["X-Request-Id"] == "probe-1"
    assert world.line("GET /api/tags ").endswith(" id=probe-1 client=-")


async def test_access_log_control_plane_requests_are_logged(world: World) -> None:
    assert (await world.client.get("/ui/login")).status_code == 200
    assert " status=200 " in world.line("GET /ui/login ")


async def test_access_log_passing_health_probes_are_debug_lines(world: World) -> None:
    """kubelet asks every few seconds: tens of thousands of lines a day that say nothing."""
    assert (await world.client.get("/healthz")).status_code == 200
    assert not [line for line in world.lines() if line.startswith("GET /healthz ")]
    world.caplog.set_level(logging.DEBUG, logger="llamacontroller.access")
    assert (await world.client.get("/readyz")).status_code == 200
    assert " status=200 " in world.line("GET /readyz ")


async def test_access_log_a_probe_failing_as_before_is_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    """A standby answers /readyz 503 for as long as another controller leads: its first failing answer is news,
    the next ones alike are not; a change is news again."""
    answers = iter([503, 503, 503, 200, 503])

    async def probed(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": next(answers), "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    logged = AccessLog(probed, GatewayMetrics(CollectorRegistry()), TrustedProxies([]))
    caplog.set_level(logging.INFO, logger="llamacontroller.access")
    for _ in range(5):
        scope = {"type": "http", "method": "GET", "path": "/readyz", "headers": [], "client": ("10.0.0.1", 1)}
        await logged(scope, _nothing_received, _dropped)
    statuses = [record.getMessage().split(" status=")[1].split()[0] for record in caplog.records]
    assert statuses == ["503", "503"]  # the first failure, and the first after it passed again


async def _nothing_received() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _dropped(message: Message) -> None:
    return None


async def test_access_log_names_the_model_of_a_failed_request(world: World) -> None:
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    answer = await world.client.post("/api/chat", json=chat, headers=bearer(world.token))
    assert answer.status_code >= 500
    assert f" model=a status={answer.status_code} " in world.line("POST /api/chat ")
    forbidden = await world.client.post(
        "/v1/chat/completions", json={**chat, "model": "b"}, headers=bearer(world.token)
    )
    assert forbidden.status_code == 403
    assert " model=b status=403 " in world.line("POST /v1/chat/completions ")
    invalid = await world.client.post(
        "/api/chat", json={**chat, "model": "nope", "options": 7}, headers=bearer(world.token)
    )
    assert invalid.status_code == 400
    assert " model=nope status=400 " in world.lines()[-1]


async def test_access_log_values_from_the_client_cannot_forge_a_line(world: World) -> None:
    forged = "\n2026-01-01 00:00:00,000 INFO llamacontroller.access: POST /auth/login status=200"
    await world.client.get("/api/x" + forged.replace(" ", "%20"), headers=bearer(world.token))
    chat = {"model": "a\r\nforged\x1b[31m\u2028", "messages": []}
    await world.client.post("/api/chat", json=chat, headers=bearer(world.token))
    for line in world.lines():
        assert line.isprintable(), repr(line)
    assert "/api/x\\n2026-01-01" in world.lines()[0]
    assert "model=a\\r\\nforged\\x1b[31m\\u2028 " in world.lines()[1]


async def test_access_log_values_from_the_client_cannot_add_fields(world: World) -> None:
    """Spaces in a path or a model name once made fields of their own: a second status=, a client= of choice."""
    fields = " status=200 1.0ms id=0 client=203.0.113.9"
    await world.client.get("/api/tags" + fields.replace(" ", "%20"))
    await world.client.post("/api/chat", json={"model": "a" + fields, "messages": []}, headers=bearer(world.token))
    for line in world.lines():
        assert line.count(" status=") == 1 and line.count(" client=") == 1, line
    assert "/api/tags\\x20status=200" in world.lines()[0]


def test_access_log_every_log_message_is_one_line() -> None:
    """The serve log's formatter: whatever a message was built from, it stays on its line."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("tests").warning("name %s", "x\nFORGED INFO line\x1b[2J")
        assert stream.getvalue().count("\n") == 1 and "name x\\nFORGED INFO line\\x1b[2J" in stream.getvalue()
        try:
            raise ValueError("bad model 'a\nFORGED INFO line'")
        except ValueError:
            logging.getLogger("tests").exception("failed")
        lines = stream.getvalue().splitlines()
        assert not [line for line in lines if line.startswith("FORGED")]
        assert lines[2:] and all(line.startswith("  | ") for line in lines[2:]), lines
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
