"""Event streams ask about their caller again at every heartbeat: a stream opened with a token, a session or an
allow-list ends once that no longer holds (revoked, signed out, disabled, model taken away), on every stream of
the control plane: the control API's events and log follow, the dashboard's events and the log page's stream."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from quart import Quart
from quart.testing import connections
from quart.typing import TestClientProtocol as Client

import controller.api.sse
from controller.auth.admin import Administration
from controller.runtime.fake import FakeRuntime
from controller.runtime.logs import LogBook
from controller.services import services_of
from tests.support.harness import fake_app, fake_config

DEADLINE = 30.0  # how long a test waits for a condition; heartbeats come every 50 ms here


@dataclass
class World:
    app: Quart
    service: Administration
    token: str  # bob's, models:manage, 3 requests a minute
    token_id: str

    @property
    def logbook(self) -> LogBook:
        found: LogBook = services_of(self.app).supervisor.logbook
        return found


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.setattr(controller.api.sse, "HEARTBEAT_SECONDS", 0.05)
    config = fake_config(tmp_path, tiny_model, {"a": {}, "b": {}}, auth={"enabled": True, "token_cache_ttl": 0.1})
    app = fake_app(config, FakeRuntime())
    async with app.test_app():
        service: Administration = services_of(app).admin
        await service.add_user("root", "root-password", "admin", "tests")
        await service.add_user("bob", "bob-password", "user", "tests", ("a",))
        token, record = await service.create_token("bob", "watch", ["models:manage"], [], None, 3, "tests")
        yield World(app, service, token, record.id)


async def sign_in(client: Client, user: str, password: str) -> str:
    """Signs ``client`` in (its cookie jar keeps the session); returns the page's CSRF token."""
    answer = await client.post("/ui/login", form={"username": user, "password": password, "next": "/ui/"})
    assert answer.status_code == 303
    found = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', await (await client.get("/ui/")).get_data(True))
    assert found
    return found.group(1)


@asynccontextmanager
async def stream(client: Client, path: str, headers: dict[str, str] | None = None) -> AsyncIterator[Reader]:
    async with client.request(path, headers=headers or {}) as connection:
        await connection.send_complete()
        reader = Reader(connection)
        try:
            yield reader
        finally:
            if not reader.ended:
                await connection.disconnect()


class Reader:
    def __init__(self, connection: connections.TestHTTPConnection) -> None:
        self.connection = connection
        self.received = b""
        self.ended = False

    async def _until(self, done: Callable[[], bool]) -> None:
        async def read() -> None:
            while not done():
                chunk = await self.connection.receive()
                if chunk == b"":  # the answer's last message: the stream ended
                    self.ended = True
                    return
                self.received += chunk

        await asyncio.wait_for(read(), DEADLINE)

    async def heartbeats(self, count: int) -> None:
        """Reads until ``count`` more heartbeats came (each one asked about the caller and was let through)."""
        seen = self.received.count(b": ping")
        await self._until(lambda: self.received.count(b": ping") >= seen + count)
        assert not self.ended, "the stream ended while its caller was still allowed"

    async def end(self) -> None:
        """Reads until the server ends the stream (fails after DEADLINE if it never does)."""
        await self._until(lambda: self.ended)


def bearer(world: World) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.token}"}


async def test_stream_control_events_end_when_the_token_is_revoked(world: World) -> None:
    async with stream(world.app.test_client(), "/control/v1/events", bearer(world)) as events:
        await events.heartbeats(3)
        assert events.connection.status_code == 200
        await world.service.revoke_token(world.token_id, "tests")
        await events.end()


async def test_stream_control_log_follow_ends_when_the_owner_is_disabled(world: World) -> None:
    async with stream(world.app.test_client(), "/control/v1/models/a/logs?follow=1", bearer(world)) as logs:
        await logs.heartbeats(2)
        await world.service.set_disabled("bob", True, "tests")
        await logs.end()


async def test_stream_a_busy_stream_is_asked_about_too(world: World) -> None:
    """Lines every few milliseconds leave no idle heartbeat: the caller is asked about all the same."""

    async def chatter() -> None:
        for n in range(100_000):
            world.logbook.append("a:latest", f"line {n}")
            await asyncio.sleep(0.002)

    writer = asyncio.create_task(chatter())
    try:
        async with stream(world.app.test_client(), "/control/v1/models/a/logs?follow=1", bearer(world)) as logs:
            await logs.heartbeats(2)
            assert b'data: "line ' in logs.received
            await world.service.revoke_token(world.token_id, "tests")
            await logs.end()
    finally:
        writer.cancel()


async def test_stream_heartbeats_cost_no_requests_of_the_rate_limit(world: World) -> None:
    async with stream(world.app.test_client(), "/control/v1/events", bearer(world)) as events:
        await events.heartbeats(5)
    client = world.app.test_client()
    for _ in range(2):  # 3 a minute: the stream took one; its heartbeats took none
        assert (await client.get("/control/v1/models", headers=bearer(world))).status_code == 200


async def test_stream_dashboard_events_end_at_sign_out(world: World) -> None:
    client = world.app.test_client()
    csrf = await sign_in(client, "root", "root-password")
    async with stream(client, "/ui/events") as events:
        await events.heartbeats(2)
        assert events.connection.status_code == 200
        signed_out = await client.post("/ui/logout", form={"csrf_token": csrf})
        assert signed_out.status_code == 303
        await events.end()


async def test_stream_log_page_ends_when_the_model_is_taken_away(world: World) -> None:
    client = world.app.test_client()
    await sign_in(client, "root", "root-password")
    async with stream(client, "/ui/models/a/logs/stream") as logs:
        await logs.heartbeats(2)
        assert logs.connection.status_code == 200
        await world.service.set_models("root", ("b",), "tests")
        await logs.end()


async def test_stream_dashboard_events_end_when_the_password_is_reset(world: World) -> None:
    """A password reset ends the account's sessions, and with them its open pages."""
    client = world.app.test_client()
    await sign_in(client, "root", "root-password")
    async with stream(client, "/ui/events") as events:
        await events.heartbeats(2)
        await world.service.set_password("root", "another-password", "tests")
        await events.end()


async def test_stream_through_a_proxy_of_ones_own_is_asked_about_by_its_token(world: World) -> None:
    """Opened with the edge's signed identity header (usable once): each heartbeat asks about the token it was
    signed for, so the stream lives on until that token is revoked."""
    client = world.app.test_client()
    forwarded = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/control/v1/events", **bearer(world)}
    verified = await client.get("/auth/verify", headers=forwarded)
    assert verified.status_code == 200
    signed = {"X-LlamaController-Identity": verified.headers["X-LlamaController-Identity"]}
    async with stream(client, "/control/v1/events", signed) as events:
        await events.heartbeats(3)
        assert events.connection.status_code == 200
        await world.service.revoke_token(world.token_id, "tests")
        await events.end()
