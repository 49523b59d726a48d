"""What the native passthrough ``/llama/<model>/*`` keeps from an inference token: the model file's place on
the host, and the backend's /metrics (which needs the ``metrics`` scope)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from quart.typing import TestClientProtocol as Client

from controller.auth.admin import Administration
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from tests.support.harness import fake_app, fake_config
from tests.support.standin import StandIn


@dataclass
class World:
    client: Client
    tokens: dict[str, str]
    standin: StandIn


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path) -> AsyncIterator[World]:
    config = fake_config(tmp_path, tiny_model, {"a": {}}, auth={"enabled": True})
    async with StandIn() as standin:
        app = fake_app(config, FakeRuntime(backend_url=standin.url))
        async with app.test_app():
            service: Administration = services_of(app).admin
            await service.add_user("root", "root-password", "admin", "tests")
            tokens = {}
            for name, scopes in (("inference", ["inference"]), ("metrics", ["inference", "metrics"])):
                tokens[name], _ = await service.create_token("root", name, scopes, [], None, None, "tests")
            yield World(app.test_client(use_cookies=False), tokens, standin)


def auth(world: World, token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {world.tokens[token]}"}


@pytest.mark.parametrize("path", ["/llama/a/props", "/llama/a/props?x=1", "/llama/a/%70rops"])
async def test_native_props_do_not_say_where_the_model_file_lies(world: World, path: str) -> None:
    response = await world.client.get(path, headers=auth(world, "inference"))
    assert response.status_code == 200
    props = await response.get_json()
    assert props == {"total_slots": 1, "default_generation_settings": {"n_ctx": 64}}
    assert world.standin.model_path not in (await response.get_data()).decode()
    assert int(response.headers["content-length"]) == len(await response.get_data())


@pytest.mark.parametrize("path", ["/llama/a/metrics", "/llama/a//metrics", "/llama/a/%6Detrics", "/llama/a/./metrics/"])
async def test_native_metrics_need_the_metrics_scope(world: World, path: str) -> None:
    refused = await world.client.get(path, headers=auth(world, "inference"))
    assert refused.status_code == 403
    assert "metrics" in (await refused.get_json())["error"]["message"]
    assert not any(r.target.endswith("metrics") for r in world.standin.requests)  # never reached the backend
    allowed = await world.client.get("/llama/a/metrics", headers=auth(world, "metrics"))
    assert allowed.status_code == 200 and b"llamacpp:requests_processing" in await allowed.get_data()


def test_routed_path_is_the_path_llama_server_routes() -> None:
    from proxy.native import routed_path

    assert routed_path(b"/%6Detrics/?a=b") == "/metrics"
    assert routed_path(b"//./props") == "/props"
    assert routed_path(b"/v1/chat/completions") == "/v1/chat/completions"
