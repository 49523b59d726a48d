"""The data plane apart: gateway processes following the controller's directory (proxy/remote.py,
controller/api/internal.py), over real sockets, with the scripted llama-server stand-in as every backend.

The same with `serve`'s worker processes, the real llama-server and a controller killed by SIGKILL:
tests/integration/test_data_plane.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.config import Config
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from tests.support.harness import fake_config
from tests.support.server import RunningApp, running_app, running_gateway
from tests.support.standin import StandIn

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@dataclass
class World:
    config: Config
    controller: RunningApp
    runtime: FakeRuntime


@pytest.fixture
async def standin() -> AsyncIterator[StandIn]:
    async with StandIn() as running:
        yield running


def split_config(tmp_path: Path, tiny_model: Path, **gateway: Any) -> Config:
    settings = {"report_interval": "0.1s", "report_ttl": "1s", "load_wait": "1s", **gateway}
    return fake_config(tmp_path, tiny_model, {"tiny": {}, "other": {}}, gateway=settings)


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path, standin: StandIn) -> AsyncIterator[World]:
    config = split_config(tmp_path, tiny_model)
    runtime = FakeRuntime(backend_url=standin.url)
    async with running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server") as app:
        yield World(config, app, runtime)


def state(world: World, model: str = "tiny") -> str:
    return services_of(world.controller.app).supervisor.view(model).state


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.02)


async def test_a_gateway_loads_on_demand_then_serves_from_its_copy(world: World) -> None:
    async with running_gateway(world.controller, world.config) as gateway:
        reply = await gateway.client.post("/api/chat", json=CHAT)
        assert reply.status_code == 200 and reply.json()["message"]["content"] == "echo: hi"
        assert state(world) == "ready"
        await until(lambda: gateway.process.directory._serving("tiny:latest", False, None, None) is not None)
        for _ in range(3):
            assert (await gateway.client.post("/api/chat", json=CHAT)).status_code == 200
        assert services_of(world.controller.app).supervisor.view("tiny").starts == 1
        tags = (await gateway.client.get("/api/tags")).json()
        assert {m["name"] for m in tags["models"]} == {"tiny:latest", "other:latest"}
        ps = (await gateway.client.get("/api/ps")).json()
        assert [m["name"] for m in ps["models"]] == ["tiny:latest"]


async def test_ready_models_are_served_while_no_controller_answers(world: World) -> None:
    async with running_gateway(world.controller, world.config) as gateway:
        assert (await gateway.client.post("/api/chat", json=CHAT)).status_code == 200
        await until(lambda: gateway.process.directory._serving("tiny:latest", False, None, None) is not None)
        # The controller goes away: its address refuses from now on (port 1 on loopback refuses at once).
        gateway.process.directory.controller = gateway.process.control.controller = "http://127.0.0.1:1"
        for _ in range(5):
            reply = await gateway.client.post("/api/chat", json=CHAT)
            assert reply.status_code == 200, reply.text
        began = time.monotonic()
        reply = await gateway.client.post("/api/chat", json={**CHAT, "model": "other"})
        assert reply.status_code == 503 and "controller is not answering" in reply.json()["error"]
        assert reply.headers["retry-after"] == "5"
        assert time.monotonic() - began >= 0.9  # gateway.load_wait: 1s
        control = await gateway.client.get("/control/v1/models")
        assert control.status_code == 503 and control.headers["retry-after"] == "5"
        assert "controller is not answering" in control.json()["error"]


async def test_a_drain_waits_for_every_gateways_requests(world: World) -> None:
    async with (
        running_gateway(world.controller, world.config) as first,
        running_gateway(world.controller, world.config) as second,
    ):
        assert (await first.client.post("/api/chat", json=CHAT)).status_code == 200
        await until(lambda: second.process.directory._serving("tiny:latest", False, None, None) is not None)
        async with first.process.directory.lease("tiny") as held:  # a long stream on the first gateway
            await first.process.directory.report()
            unload = asyncio.create_task(world.controller.client.post("/control/v1/models/tiny/unload"))
            # The second gateway's copy says draining: it sends the backend nothing new.
            await until(lambda: second.process.directory._serving("tiny:latest", False, None, None) is None)
            entry = second.process.directory._entries["tiny:latest"]
            assert entry.backends[0].draining and entry.backends[0].handle == held.handle
            await asyncio.sleep(0.5)  # five reports later, the first gateway still has it in flight
            assert state(world) == "ready" and not unload.done()
        assert (await unload).status_code == 200
        assert state(world) == "stopped"


async def test_a_silent_gateway_stops_holding_a_backend_after_its_ttl(world: World) -> None:
    async with running_gateway(world.controller, world.config) as first:
        assert (await first.client.post("/api/chat", json=CHAT)).status_code == 200
        directory = first.process.directory
        async with directory.lease("tiny"):
            await directory.report()
            for task in directory._tasks:  # the gateway is killed: it never reports again
                task.cancel()
            began = time.monotonic()
            reply = await world.controller.client.post("/control/v1/models/tiny/unload")
            assert reply.status_code == 200
            waited = time.monotonic() - began
        assert 0.8 <= waited < 5  # gateway.report_ttl: 1s


async def test_the_drain_timeout_bounds_the_wait(tmp_path: Path, tiny_model: Path, standin: StandIn) -> None:
    config = split_config(tmp_path, tiny_model, drain_timeout="0.5s")
    runtime = FakeRuntime(backend_url=standin.url)
    async with (
        running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server") as app,
        running_gateway(app, config) as gateway,
    ):
        assert (await gateway.client.post("/api/chat", json=CHAT)).status_code == 200
        async with gateway.process.directory.lease("tiny"):  # a stream that never ends
            began = time.monotonic()
            assert (await app.client.post("/control/v1/models/tiny/unload")).status_code == 200
            assert 0.4 <= time.monotonic() - began < 5


async def test_keep_alive_zero_through_a_gateway_unloads_after_the_request(world: World) -> None:
    async with running_gateway(world.controller, world.config) as gateway:
        reply = await gateway.client.post("/api/chat", json={**CHAT, "keep_alive": 0})
        assert reply.status_code == 200, reply.text
        await until(lambda: state(world) == "stopped", timeout=5)


async def test_the_internal_routes_need_the_secret_and_are_refused_by_gateways(world: World) -> None:
    async with running_gateway(world.controller, world.config) as gateway:
        direct = await world.controller.client.get("/internal/v1/directory")
        assert direct.status_code == 401
        forged = await world.controller.client.get(
            "/internal/v1/directory", headers={"Authorization": "Bearer " + "0" * 64}
        )
        assert forged.status_code == 401
        through = await gateway.client.get("/internal/v1/directory")
        assert through.status_code == 404
        assert (await gateway.client.post("/internal/v1/report", json={})).status_code == 404


async def raw_status(url: str, method: str, target: str, headers: dict[str, str]) -> int:
    """The status of one request sent as written (an HTTP client would tidy the target)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{head}\r\n".encode())
    await writer.drain()
    status = (await reader.read()).split(b" ", 2)[1]
    writer.close()
    return int(status)


@pytest.mark.parametrize(
    "target", ["//internal/v1/directory", "///internal/v1/directory", "/%2Finternal/v1/directory", "//internal"]
)
async def test_no_spelling_of_an_internal_path_passes_a_gateway(world: World, target: str) -> None:
    # Shown even the deployment's secret, a gateway passes no internal route on: they are the controller's own.
    from controller.auth.secrets import internal_secret

    secret = {"Authorization": f"Bearer {internal_secret(world.config.secrets_dir)}"}
    assert await raw_status(world.controller.url, "GET", "/internal/v1/directory", secret) == 200
    async with running_gateway(world.controller, world.config) as gateway:
        for method in ("GET", "HEAD"):
            assert await raw_status(gateway.url, method, target, secret) == 404, (method, target)


async def test_a_tokens_rate_limit_is_one_limit_across_gateways(
    tmp_path: Path, tiny_model: Path, standin: StandIn
) -> None:
    gateway = {"report_interval": "0.1s"}
    config = fake_config(tmp_path, tiny_model, {"tiny": {}}, auth={"enabled": True}, gateway=gateway)
    runtime = FakeRuntime(backend_url=standin.url)
    async with (
        running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server") as app,
        running_gateway(app, config) as first,
        running_gateway(app, config) as second,
    ):
        made = await app.client.post("/control/v1/tokens", json={"name": "limited", "scopes": ["inference"], "rpm": 4})
        assert made.status_code in (200, 201), made.text
        limited = {"Authorization": f"Bearer {made.json()['token']}"}
        statuses = []
        for n in range(6):
            gateway = (first, second)[n % 2]
            statuses.append((await gateway.client.get("/api/tags", headers=limited)).status_code)
        assert statuses == [200, 200, 200, 200, 429, 429]  # 4 per minute in all, not 4 per gateway


async def test_an_idle_model_spends_no_revisions(world: World) -> None:
    # Its expiry, as the directory shows it, is the same each time it is computed: nothing to send the gateways.
    async with running_gateway(world.controller, world.config) as gateway:
        assert (await gateway.client.post("/api/chat", json=CHAT)).status_code == 200
        await until(lambda: gateway.process.directory._serving("tiny:latest", False, None, None) is not None)
        await asyncio.sleep(0.5)
        publisher = services_of(world.controller.app).publisher
        before = publisher.revision
        await asyncio.sleep(2.5)
        assert publisher.revision == before


async def test_an_empty_directory_is_waited_on_like_any_other(tmp_path: Path, tiny_model: Path) -> None:
    # No model at all: the directory stays at revision 0, and a gateway's long poll must still be held.
    config = fake_config(tmp_path, tiny_model, {}, gateway={"report_interval": "1s"})
    runtime = FakeRuntime()
    async with (
        running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server") as app,
        running_gateway(app, config) as gateway,
    ):
        directory = gateway.process.directory
        calls = 0
        real = directory._call

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await real(*args, **kwargs)

        directory._call = counted
        await asyncio.sleep(1.0)
        assert calls < 10


async def test_a_gateway_without_a_copy_answers_503_not_404(tmp_path: Path, tiny_model: Path) -> None:
    # A gateway started while its controller is away (a failover, a controller still starting): its copy is empty,
    # so no name can be known to be missing. Ollama's clients read a 404 as "pull the model".
    import httpx

    from controller.auth.secrets import internal_secret
    from llamacontroller.gateway import GatewayProcess

    config = split_config(tmp_path, tiny_model)
    process = GatewayProcess(config, "http://127.0.0.1:1", internal_secret(config.secrets_dir))
    await process.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=process), base_url="http://gw") as client:
            ollama = await client.post("/api/chat", json=CHAT)
            assert ollama.status_code == 503, ollama.text
            assert ollama.headers["retry-after"] == "5" and isinstance(ollama.json()["error"], str)
            openai = await client.post("/v1/chat/completions", json={**CHAT, "model": "other"})
            assert openai.status_code == 503, openai.text
            assert openai.headers["retry-after"] == "5" and "message" in openai.json()["error"]
    finally:
        await process.stop()


async def test_a_huge_num_ctx_through_a_gateway_is_answered_as_by_the_controller(world: World) -> None:
    # Ollama's options take any 64-bit integer; the model's context caps it (or over_limit: refuse names it).
    huge = {**CHAT, "options": {"num_ctx": 2**40, "num_predict": 2**40}}
    direct = await world.controller.client.post("/api/chat", json=huge)
    assert direct.status_code == 200, direct.text
    await world.controller.client.post("/control/v1/models/tiny/unload")
    async with running_gateway(world.controller, world.config) as gateway:
        reply = await gateway.client.post("/api/chat", json=huge)
        assert reply.status_code == 200, reply.text


async def test_a_controller_that_accepts_and_never_answers_does_not_hold_a_gateway(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A controller stopped mid-way (SIGSTOP, a node gone without a reset, a wedged event loop): its connections
    # stay open. A report or a look at the directory gives up as if it had refused, and what waits on a report (the
    # control API's requests, /api/ps) is not held behind it.
    import proxy.remote as remote
    from proxy.remote import RemoteDirectory, Unreachable

    monkeypatch.setattr(remote, "EXCHANGE_TIMEOUT", 0.3)
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    directory = RemoteDirectory(f"http://127.0.0.1:{port}", "s" * 64, report_interval=0.1, load_wait=0.5)
    try:
        directory.start()
        began = time.monotonic()
        with pytest.raises(Unreachable):
            await asyncio.wait_for(directory.report(), 5)
        directory._unreported = True
        await asyncio.wait_for(directory.flush(), 5)
        assert time.monotonic() - began < 3
        await asyncio.sleep(0.5)
        assert not directory.controller_answers
    finally:
        await directory.close()
        for writer in held:
            writer.close()
        server.close()


async def test_a_websocket_upgrade_at_a_gateway_is_refused_not_an_error(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing speaks WebSocket here; any client may ask for it, on any path the gateway passes to the controller.
    upgrade = (
        b"GET /control/v1/events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with running_gateway(world.controller, world.config) as gateway:
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(upgrade)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(200), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 403"), answer
        await asyncio.sleep(0.1)
        assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_gateway_that_stops_deliberately_holds_no_drain(
    tmp_path: Path, tiny_model: Path, standin: StandIn
) -> None:
    # A gateway stopped on purpose (serve's restart of a worker, a rolling update, a scale-down) says so as it ends:
    # a drain that begins just after it does not wait for it to fall silent for gateway.report_ttl.
    config = split_config(tmp_path, tiny_model, report_ttl="5s")
    runtime = FakeRuntime(backend_url=standin.url)
    async with running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server") as app:
        async with running_gateway(app, config) as gateway:
            assert (await gateway.client.post("/api/chat", json=CHAT)).status_code == 200
            await gateway.process.directory.report()
        began = time.monotonic()
        assert (await app.client.post("/control/v1/models/tiny/unload")).status_code == 200
        assert time.monotonic() - began < 2


async def test_an_answer_relayed_from_the_controller_has_one_date(world: World) -> None:
    async with running_gateway(world.controller, world.config) as gateway:
        for path in ("/control/v1/models", "/readyz", "/ui/login"):
            reply = await gateway.client.get(path)
            assert len(reply.headers.get_list("date")) == 1, (path, reply.headers)


async def test_a_restarted_controller_does_not_stop_an_adopted_backend_under_a_gateways_request(
    tmp_path: Path, tiny_model: Path, standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from controller.runtime.process import free_port

    monkeypatch.setenv("LLAMACONTROLLER_INTERNAL_SECRET", "s" * 40)  # the next controller's is the same
    config = split_config(tmp_path, tiny_model)
    first_runtime = FakeRuntime(backend_url=standin.url)
    options = {"probe": first_runtime.probe, "binary": lambda: "/bin/llama-server"}
    async with (
        running_app(config, runtime=first_runtime, **options) as first,
        running_gateway(first, config) as gateway,
    ):
        assert (await gateway.client.post("/api/chat", json={**CHAT, "keep_alive": "1h"})).status_code == 200
        await until(lambda: gateway.process.directory._serving("tiny:latest", False, None, None) is not None)
        ((handle, running),) = first_runtime.running.items()
        # What the first controller leaves: the backend, with the keep_alive of the last request it heard of (0).
        left = replace(running.backend, labels={**running.backend.labels, "keep_alive": "0.0"})
        async with gateway.process.directory.lease("tiny") as held:  # a long stream on the gateway, meanwhile
            assert held.handle == handle
            listen = f"127.0.0.1:{free_port()}"
            next_config = config.model_copy(update={"server": config.server.model_copy(update={"listen": listen})})
            runtime = FakeRuntime(backend_url=standin.url, leftovers=[left])
            gateway.process.directory.controller = gateway.process.control.controller = f"http://{listen}"
            async with running_app(next_config, runtime=runtime, probe=runtime.probe, binary=options["binary"]):
                await asyncio.sleep(2.0)  # past the adoption's settling time: from here the gateway's reports hold it
                assert handle not in runtime.stops, "the adopted backend was stopped under the gateway's request"


async def test_a_controller_that_stops_ends_the_gateways_long_polls_at_once(
    tmp_path: Path, tiny_model: Path, standin: StandIn
) -> None:
    # A restart, an upgrade, a lead handed over: the gateways' held polls must not hold the controller's stop for its
    # graceful bound (runtime.stop_timeout), then be cut with a 500.
    config = split_config(tmp_path, tiny_model)
    runtime = FakeRuntime(backend_url=standin.url)
    controller = running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server")
    app = await controller.__aenter__()
    gateway = running_gateway(app, config)
    await gateway.__aenter__()
    try:
        await asyncio.sleep(0.5)  # the gateway's long poll is held by the controller now
        began = time.monotonic()
        await controller.__aexit__(None, None, None)
        assert time.monotonic() - began < 3
    finally:
        await gateway.__aexit__(None, None, None)


async def test_a_gateway_apart_has_its_request_metrics_scraped(
    tmp_path: Path, tiny_model: Path, standin: StandIn
) -> None:
    # Its own /metrics on gateway.metrics_listen (one scrape target per replica), with the metrics scope as anywhere.
    from controller.runtime.process import free_port

    metrics_listen = f"127.0.0.1:{free_port()}"
    gateway_settings = {"report_interval": "0.1s", "metrics_listen": metrics_listen}
    config = fake_config(tmp_path, tiny_model, {"tiny": {}}, auth={"enabled": True}, gateway=gateway_settings)
    runtime = FakeRuntime(backend_url=standin.url)
    async with (
        running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server") as app,
        running_gateway(app, config) as gateway,
    ):
        for _ in range(3):
            assert (await gateway.client.post("/api/chat", json=CHAT)).status_code == 200
        own = f"http://{metrics_listen}/metrics"
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(own)).status_code == 401
            metrics = (await client.get(own, headers=app.client.headers)).text
            assert (
                await client.get(f"http://{metrics_listen}/api/tags", headers=app.client.headers)
            ).status_code == 404
        served = [line for line in metrics.splitlines() if line.startswith("llamacontroller_requests_total{")]
        assert any('endpoint="chat"' in line and line.endswith(" 3.0") for line in served), served
        # The main port's /metrics stays the controller's (its own gateway served none of these requests).
        controllers = (await gateway.client.get("/metrics")).text
        assert "llamacontroller_model_state{" in controllers


async def test_a_models_bound_on_requests_holds_through_a_gateway(
    tmp_path: Path, tiny_model: Path, standin: StandIn
) -> None:
    """max_concurrent + queue_depth, shared out over the live gateways: one gateway admits the whole bound."""
    gateway_settings = {"report_interval": "0.1s"}
    config = fake_config(
        tmp_path, tiny_model, {"tiny": {"max_concurrent": 1, "queue_depth": 1}}, gateway=gateway_settings
    )
    runtime = FakeRuntime(backend_url=standin.url)
    async with (
        running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "/bin/llama-server") as app,
        running_gateway(app, config) as gateway,
    ):
        assert (await gateway.client.post("/api/chat", json=CHAT)).status_code == 200
        directory = gateway.process.directory
        await until(lambda: (entry := directory._entries.get("tiny:latest")) is not None and entry.admits == 2)
        async with directory.lease("tiny"), directory.lease("tiny"):
            refused = await gateway.client.post("/api/chat", json=CHAT)
            assert refused.status_code == 503 and "queue" in refused.json()["error"]
        assert (await gateway.client.post("/api/chat", json=CHAT)).status_code == 200


async def test_a_request_for_no_path_is_a_404_not_a_controller_away(world: World) -> None:
    # `OPTIONS *` (and a `GET *`) names the server, no resource: the controller is there, and nothing is wrong with it.
    async with running_gateway(world.controller, world.config) as gateway:
        for method in ("OPTIONS", "GET"):
            assert await raw_status(gateway.url, method, "*", {}) == 404, method
