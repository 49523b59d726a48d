"""``/readyz`` is the controller's readiness (the Helm chart's readiness probe): an edge whose admin API cannot be
reached is reported — in ``/readyz``'s answer, the system status and the metrics — but leaves the controller
ready, so that the control plane stays in its Service while the edge is repaired."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.runtime.fake import FakeRuntime
from controller.runtime.process import free_port
from tests.support.harness import fake_app, fake_config

DEADLINE = 30.0


async def test_readyz_stays_ready_while_the_edge_is_unreachable(tmp_path: Path, tiny_model: Path) -> None:
    edge = {"enabled": True, "supervise": False, "admin": f"127.0.0.1:{free_port()}"}  # nothing listens there
    config = fake_config(tmp_path, tiny_model, {"a": {}}, edge=edge)
    app = fake_app(config, FakeRuntime())
    async with app.test_app():
        client = app.test_client()

        async def edge_state() -> str:
            state: str = (await (await client.get("/control/v1/system")).get_json())["edge"]["state"]
            return state

        async with asyncio.timeout(DEADLINE):
            while await edge_state() == "starting":
                await asyncio.sleep(0.02)
        assert await edge_state() == "down"
        ready = await client.get("/readyz")
        body = await ready.get_json()
        assert ready.status_code == 200, body
        assert body["status"] == "ready" and body["edge"]["state"] == "down" and body["edge"]["error"]
        metrics = await (await client.get("/metrics")).get_data(as_text=True)
        assert 'llamacontroller_edge_state{state="down"} 1.0' in metrics
        assert 'llamacontroller_edge_state{state="ok"} 0.0' in metrics


async def test_readyz_without_an_edge_says_nothing_of_it(tmp_path: Path, tiny_model: Path) -> None:
    app = fake_app(fake_config(tmp_path, tiny_model, {"a": {}}), FakeRuntime())
    async with app.test_app():
        client = app.test_client()
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and await ready.get_json() == {"status": "ready"}
        assert "llamacontroller_edge_state" not in await (await client.get("/metrics")).get_data(as_text=True)
