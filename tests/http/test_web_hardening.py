"""The web page's edges: every redirect the app makes is relative (behind the HTTPS edge the app sees plain http
and whatever Host a client sent, so an absolute Location built from them sent browsers to http://<any host>/,
a downgrade and an open redirect for a forged Host); the sign-in forms, open to anyone, are bounded far below
server.max_body_bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from controller.auth.admin import Administration
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
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
        service: Administration = services_of(app).admin
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


async def test_web_hardening_oversized_sign_in_form_is_413(world: World) -> None:
    """Sign-in is open to anyone: its forms are bounded far below server.max_body_bytes (64 MiB here), which
    a name and a password never need."""
    form = {"username": "root", "password": "x" * 1_000_000, "next": "/ui/"}
    answer = await world.client.post("/ui/login", form=form)
    page = await answer.get_data(as_text=True)
    assert answer.status_code == 413 and answer.mimetype == "text/html"
    assert "request body is larger than the limit of 16384 bytes" in page
    body = {"username": "root", "password": "x" * 1_000_000}
    answer = await world.client.post("/auth/login", json=body)
    assert answer.status_code == 413
    assert await answer.get_json() == {
        "error": "request body is larger than the limit of 16384 bytes",
        "code": "payload_too_large",
    }
    form = {"username": "root", "password": "root-password", "next": "/ui/"}
    assert (await world.client.post("/ui/login", form=form)).status_code == 303, "a real form still fits"
