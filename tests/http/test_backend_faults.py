"""A backend that misbehaves on the wire — hangs after its headers, sends garbage, closes in the middle of a
chunk: each client gets a clear error in its own dialect, the controller stays up, and the next request to a
backend that behaves again succeeds. The backend is a byte-scripted socket (fault injection); crashes of a real
llama-server process are in tests/integration/test_faults.py."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from controller.runtime.fake import FakeRuntime
from tests.support.harness import fake_app, fake_config
from tests.support.scripted_http import Exchange, ScriptedServer, response

STALL = 0.5
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def sse_chunk(content: str) -> bytes:
    event = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    data = f"data: {json.dumps(event)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse_done() -> bytes:
    final = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    data = f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"


@dataclass
class Backend:
    """What the scripted backend does next: ``ok`` answers properly; anything else is a fault."""

    mode: str = "ok"
    hangs: list[asyncio.Event] = field(default_factory=list)

    async def __call__(self, exchange: Exchange) -> None:
        streaming = b'"stream": true' in exchange.body or b'"stream":true' in exchange.body
        if self.mode == "ok":
            if streaming:
                await exchange.send(SSE_HEAD + sse_chunk("Hello") + sse_done())
            else:
                message = {"role": "assistant", "content": "Hello"}
                answer = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
                await exchange.send(response(json.dumps(answer).encode(), headers="Content-Type: application/json\r\n"))
        elif self.mode == "hang":  # headers (and a first piece), then nothing at all
            if streaming:
                await exchange.send(SSE_HEAD + sse_chunk("Hel"))
            else:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                await exchange.send(head + b"{")
            released = asyncio.Event()
            self.hangs.append(released)
            await released.wait()
        elif self.mode == "garbage":
            await exchange.send(b"\x00\x17 this is not HTTP \xff\r\n\r\n")
            exchange.close()
        elif self.mode == "mid-chunk":
            await exchange.send(SSE_HEAD + sse_chunk("Hel") + b'80\r\ndata: {"choi')
            exchange.close()


@dataclass
class World:
    client: Client
    backend: Backend


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path) -> AsyncIterator[World]:
    config = fake_config(tmp_path, tiny_model, {"a": {}}, upstream={"stall_timeout": STALL, "response_timeout": 5})
    backend = Backend()
    async with ScriptedServer(backend) as server:
        runtime = FakeRuntime(backend_url=server.url)
        app = fake_app(config, runtime)
        async with app.test_app():
            yield World(app.test_client(), backend)
            for hang in backend.hangs:
                hang.set()


OLLAMA_CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
OPENAI_CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


async def ask(world: World, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    answer = await world.client.post(path, json=body)
    return answer.status_code, await answer.get_data()


def ndjson(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def sse_events(data: bytes) -> list[Any]:
    return [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]


async def still_serving(world: World) -> None:
    """The controller is up, the model is still ready, and a backend that behaves again is answered."""
    world.backend.mode = "ok"
    model = await (await world.client.get("/control/v1/models/a")).get_json()
    assert model["state"] == "ready"
    status, body = await ask(world, "/api/chat", {**OLLAMA_CHAT, "stream": False})
    assert status == 200 and json.loads(body)["message"]["content"] == "Hello", body


async def test_faults_backend_hangs_after_its_headers(world: World) -> None:
    world.backend.mode = "hang"
    status, body = await ask(world, "/api/chat", OLLAMA_CHAT)  # streamed: the first piece, then an error line
    lines = ndjson(body)
    assert status == 200 and lines[0]["message"]["content"] == "Hel"
    assert f"did not send more of its answer within {STALL:g}s" in lines[-1]["error"]
    status, body = await ask(world, "/v1/chat/completions", {**OPENAI_CHAT, "stream": True})
    events = sse_events(body)
    assert status == 200 and events[-1]["error"]["code"] == "upstream_timeout"
    status, body = await ask(world, "/v1/chat/completions", OPENAI_CHAT)  # nothing sent yet: a clean 504
    assert status == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    status, body = await ask(world, "/api/chat", {**OLLAMA_CHAT, "stream": False})
    assert status == 504 and "did not send more of its answer" in json.loads(body)["error"]
    await still_serving(world)


async def test_faults_backend_sends_garbage(world: World) -> None:
    world.backend.mode = "garbage"
    status, body = await ask(world, "/api/chat", OLLAMA_CHAT)
    assert status == 502 and json.loads(body) == {
        "error": "the model's backend sent an invalid HTTP answer (bad status line)"
    }
    status, body = await ask(world, "/v1/chat/completions", OPENAI_CHAT)
    error = json.loads(body)["error"]
    assert status == 502 and "invalid HTTP answer" in error["message"] and error["type"] == "server_error"
    await still_serving(world)


async def test_faults_backend_closes_in_the_middle_of_a_chunk(world: World) -> None:
    world.backend.mode = "mid-chunk"
    status, body = await ask(world, "/api/chat", OLLAMA_CHAT)
    lines = ndjson(body)
    assert status == 200 and lines[0]["message"]["content"] == "Hel"
    assert "closed the connection" in lines[-1]["error"] and "done" not in lines[-1]
    status, body = await ask(world, "/v1/chat/completions", {**OPENAI_CHAT, "stream": True})
    events = sse_events(body)
    assert status == 200 and "closed the connection" in events[-1]["error"]["message"]
    await still_serving(world)


async def test_faults_an_answer_that_timed_out_names_its_model_in_the_access_log(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llamacontroller.access")
    world.backend.mode = "hang"
    assert (await ask(world, "/v1/chat/completions", OPENAI_CHAT))[0] == 504
    assert (await ask(world, "/api/chat", {**OLLAMA_CHAT, "stream": False}))[0] == 504
    lines = [r.getMessage() for r in caplog.records if r.name == "llamacontroller.access"]
    timed_out = [line for line in lines if " status=504 " in line]
    assert len(timed_out) == 2 and all(" model=a " in line for line in timed_out), lines
