"""The web page's edges: every redirect the app makes is relative (behind the HTTPS edge the app sees plain http
and whatever Host a client sent, so an absolute Location built from them sent browsers to http://<any host>/,
a downgrade and an open redirect for a forged Host)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from controller.auth.service import AuthService
from controller.runtime.fake import FakeRuntime
from tests.support.harness import fake_app, fake_config

EVIL = {"Host": "evil.example:8443"}


@dataclass
class World:
    app: Quart
    client: Client


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path) -> AsyncIterator[World]:
    config = fake_config(tmp_path, tiny_model, {"a": {}}, auth={"enabled": True})
    app = fake_app(config, FakeRuntime())
    async with app.test_app():
        service: AuthService = app.extensions["llamacontroller.auth"]
        await service.add_user("root", "root-password", "admin", "tests")
        yield World(app, app.test_client())


async def location(
    world: World, path: str, method: str = "GET", headers: dict[str, str] = EVIL, **options: object
) -> tuple[int, str]:
    answer = await world.client.open(path, method=method, headers=headers, **options)  # type: ignore[arg-type]
    return answer.status_code, answer.headers.get("Location", "")


async def test_web_hardening_trailing_slash_is_relative(world: World) -> None:
    assert await location(world, "/ui") == (308, "/ui/")
    assert await location(world, "/ui?x=1") == (308, "/ui/?x=1")


async def test_web_hardening_of_the_pages_are_relative(world: World) -> None:
    assert await location(world, "/ui/") == (302, "/ui/login?next=/ui/")
    assert await location(world, "/", headers={**EVIL, "Accept": "text/html"}) == (302, "/ui/")
    form = {"username": "root", "password": "root-password", "next": "/ui/tokens"}
    status, where = await location(world, "/ui/login", "POST", form=form)
    assert (status, where) == (303, "/ui/tokens")
    assert await location(world, "/ui/login?next=/ui/users") == (302, "/ui/users")  # signed in already
    assert await location(world, "/ui") == (308, "/ui/")
