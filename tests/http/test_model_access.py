"""The one model-authorization rule, on every endpoint that names a model.

A name outside the caller's allow-list is 403 whether or not the model exists (existence never leaks);
inside it, an unknown model is 404; listings and the events stream show only allowed models; an alias
cannot get around the list. The requests that are allowed really reach a (scripted) backend.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from controller.auth.admin import Administration
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from tests.support.harness import fake_app, fake_config
from tests.support.standin import StandIn

FORBIDDEN_B = "these credentials may not use model 'b'"
FORBIDDEN_GHOST = "these credentials may not use model 'ghost'"


@dataclass
class World:
    app: Quart
    client: Client
    tokens: dict[str, str]
    standin: StandIn


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path) -> AsyncIterator[World]:
    config = fake_config(
        tmp_path,
        tiny_model,
        {"a": {}, "b": {"aliases": ["bee"]}},
        auth={"enabled": True},
        scheduling={"max_loaded_models": 2},
    )
    async with StandIn() as standin:
        runtime = FakeRuntime(backend_url=standin.url)
        app = fake_app(config, runtime)
        async with app.test_app():
            service: Administration = services_of(app).admin
            await service.add_user("root", "root-password", "admin", "tests")
            tokens = {}
            for name, scopes, models in (
                ("manage-a", ["models:manage", "inference"], ["a"]),
                ("alias-only", ["models:manage", "inference"], ["bee"]),
                ("all", ["models:manage", "inference"], []),
            ):
                tokens[name], _ = await service.create_token("root", name, scopes, models, None, None, "tests")
            yield World(app, app.test_client(use_cookies=False), tokens, standin)


def auth(world: World, token: str = "manage-a") -> dict[str, str]:
    return {"Authorization": f"Bearer {world.tokens[token]}"}


def message_of(body: Any) -> str:
    error = body["error"]
    return str(error if isinstance(error, str) else error["message"])


CONTROL = [
    ("GET", "/control/v1/models/{name}"),
    ("POST", "/control/v1/models/{name}/load"),
    ("POST", "/control/v1/models/{name}/unload"),
    ("GET", "/control/v1/models/{name}/logs"),
    ("GET", "/control/v1/models/{name}/logs?follow=1"),
]
GATEWAY = [
    ("POST", "/api/chat", {"messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("POST", "/api/generate", {"prompt": "hi", "stream": False}),
    ("POST", "/api/generate", {"keep_alive": 0}),  # an unload
    ("POST", "/api/embed", {"input": "hi"}),
    ("POST", "/api/show", {}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/responses", {"input": "hi"}),
    ("POST", "/v1/messages", {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["d"]}),
]


@pytest.mark.parametrize(("method", "template"), CONTROL)
@pytest.mark.parametrize("name", ["b", "bee", "ghost"])
async def test_access_control_api_refuses_models_outside_the_allow_list(
    world: World, method: str, template: str, name: str
) -> None:
    response = await world.client.open(template.format(name=name), method=method, headers=auth(world))
    assert response.status_code == 403
    assert message_of(await response.get_json()) == f"these credentials may not use model '{name}'"


@pytest.mark.parametrize(("method", "template"), CONTROL[:4])
async def test_access_control_api_serves_allowed_models(world: World, method: str, template: str) -> None:
    response = await world.client.open(template.format(name="a"), method=method, headers=auth(world))
    assert response.status_code == 200, await response.get_data()


async def test_access_unknown_model_inside_the_allow_list_is_404(world: World) -> None:
    response = await world.client.get("/control/v1/models/ghost", headers=auth(world, "all"))
    assert response.status_code == 404


async def test_access_listings_show_only_allowed_models(world: World) -> None:
    body = await (await world.client.get("/control/v1/models", headers=auth(world))).get_json()
    assert [m["name"] for m in body["models"]] == ["a"]
    tags = await (await world.client.get("/api/tags", headers=auth(world))).get_json()
    assert [m["name"] for m in tags["models"]] == ["a:latest"]
    models = await (await world.client.get("/v1/models", headers=auth(world))).get_json()
    assert [m["id"] for m in models["data"]] == ["a"]


@pytest.mark.parametrize(("method", "path", "body"), GATEWAY)
@pytest.mark.parametrize("name", ["b", "ghost"])
async def test_access_gateway_refuses_models_outside_the_allow_list(
    world: World, method: str, path: str, body: dict[str, Any], name: str
) -> None:
    response = await world.client.open(path, method=method, json={"model": name, **body}, headers=auth(world))
    assert response.status_code == 403, await response.get_data()
    assert message_of(await response.get_json()) == f"these credentials may not use model '{name}'"
    assert world.standin.requests == [], "nothing reached a backend"


@pytest.mark.parametrize(("method", "path", "body"), GATEWAY)
async def test_access_gateway_serves_allowed_models(world: World, method: str, path: str, body: dict[str, Any]) -> None:
    response = await world.client.open(path, method=method, json={"model": "a", **body}, headers=auth(world))
    assert response.status_code == 200, await response.get_data()


async def test_access_anthropic_path_refuses_in_anthropic_shape(world: World) -> None:
    body = {"model": "b", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    response = await world.client.post("/v1/messages", json=body, headers=auth(world))
    assert await response.get_json() == {"type": "error", "error": {"type": "permission_error", "message": FORBIDDEN_B}}


@pytest.mark.parametrize("name", ["b", "bee", "ghost"])
async def test_access_native_passthrough_refuses_models_outside_the_allow_list(world: World, name: str) -> None:
    response = await world.client.get(f"/llama/{name}/health", headers=auth(world))
    assert response.status_code == 403
    assert message_of(await response.get_json()) == f"these credentials may not use model '{name}'"


async def test_access_an_alias_cannot_get_around_the_allow_list(world: World) -> None:
    """The list says "bee" (an alias of b); the rule matches the resolved catalog name, "b"."""
    chat = {"model": "bee", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    response = await world.client.post("/api/chat", json=chat, headers=auth(world, "alias-only"))
    assert response.status_code == 403
    response = await world.client.post("/control/v1/models/bee/load", headers=auth(world, "alias-only"))
    assert response.status_code == 403


async def test_access_events_stream_shows_only_allowed_models(world: World) -> None:
    seen: list[dict[str, Any]] = []

    async def listen() -> None:
        async with world.client.request("/control/v1/events", headers=auth(world)) as connection:
            await connection.send_complete()
            while True:
                data = await connection.receive()
                for line in data.decode().splitlines():
                    if line.startswith("data: "):
                        seen.append(json.loads(line[6:]))

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.05)
    for name in ("b", "a"):
        response = await world.client.post(f"/control/v1/models/{name}/load", headers=auth(world, "all"))
        assert response.status_code == 200
    for _ in range(100):
        if any(event["model"] == "a:latest" and event["state"] == "ready" for event in seen):
            break
        await asyncio.sleep(0.01)
    listener.cancel()
    assert {event["model"] for event in seen} == {"a:latest"}
