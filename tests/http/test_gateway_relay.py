"""What the gateway sends to a backend and relays back, against the scripted llama-server stand-in.

Translation details (NDJSON shapes, options) have golden tests in tests/unit; these follow requests over
real sockets to a backend that records them: headers, bodies, truncation retries, raw paths.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from controller.runtime.fake import FakeRuntime
from controller.runtime.process import free_port
from tests.support.harness import fake_app, fake_config
from tests.support.server import running_app
from tests.support.standin import StandIn


@dataclass
class World:
    client: Client
    standin: StandIn
    runtime: FakeRuntime


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path) -> AsyncIterator[World]:
    config = fake_config(
        tmp_path, tiny_model, {"tiny": {}, "shifty": {"args": ["--context-shift"]}}, scheduling={"max_loaded_models": 2}
    )
    async with StandIn(context_chars=200, batch_tokens=16) as standin:
        runtime = FakeRuntime(backend_url=standin.url)
        app: Quart = fake_app(config, runtime)
        async with app.test_app():
            yield World(app.test_client(), standin, runtime)


async def post(world: World, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    response = await world.client.post(path, json=body, headers=headers or {})
    data = await response.get_data()
    try:
        return response.status_code, json.loads(data)
    except ValueError:
        return response.status_code, [json.loads(line) for line in data.splitlines() if line.strip()]


async def test_relay_ollama_chat_streams_ndjson_from_sse(world: World) -> None:
    status, lines = await post(world, "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "a b"}]})
    assert status == 200
    assert "".join(line["message"]["content"] for line in lines) == "echo: a b"
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop" and lines[-1]["eval_count"] == 3
    sent = world.standin.last("/v1/chat/completions")
    assert sent.body["stream"] is True and sent.body["messages"] == [{"role": "user", "content": "a b"}]


async def test_relay_ollama_chat_without_stream_asks_for_one_answer(world: World) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": False}
    status, reply = await post(world, "/api/chat", body)
    assert status == 200 and reply["message"]["content"] == "echo: x" and reply["done"] is True
    assert world.standin.last("/v1/chat/completions").body["stream"] is False


async def test_relay_thinking_of_earlier_turns_is_kept(world: World) -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "thinking": "because"},
        {"role": "user", "content": "more"},
    ]
    await post(world, "/api/chat", {"model": "tiny", "messages": messages, "stream": False})
    sent = world.standin.last("/v1/chat/completions").body["messages"]
    assert sent[1] == {"role": "assistant", "content": "a", "reasoning_content": "because"}


async def test_relay_request_id_and_trace_context_reach_the_backend_client_credentials_do_not(world: World) -> None:
    headers = {
        "X-Request-Id": "req-42",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=1",
        "Authorization": "Bearer lc_secret_never_forwarded",
        "Cookie": "lc_session=nope",
    }
    response = await world.client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
        headers=headers,
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-42"
    sent = world.standin.last("/v1/chat/completions").headers
    assert sent["x-request-id"] == "req-42" and sent["tracestate"] == "vendor=1"
    assert sent["traceparent"] == headers["traceparent"]
    assert "cookie" not in sent
    # The backend gets its own key from the gateway, never the client's credentials.
    assert sent["authorization"] == f"Bearer {world.runtime.starts[-1].api_key}"
    assert "lc_secret_never_forwarded" not in json.dumps(sent)


@pytest.mark.parametrize(
    ("path", "body", "backend_path"),
    [
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": False}, "/v1/chat"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "raw": True, "stream": False}, "/completion"),
        ("/api/embed", {"model": "tiny", "input": "x"}, "/v1/embeddings"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}, "/v1/chat"),
        ("/llama/tiny/tokenize", {"content": "x"}, "/tokenize"),
    ],
)
async def test_relay_every_route_opens_the_backend_with_its_own_key(
    world: World, path: str, body: Any, backend_path: str
) -> None:
    response = await world.client.post(path, json=body, headers={"Authorization": "Bearer client-token"})
    assert response.status_code == 200, await response.get_data()
    key = world.runtime.starts[-1].api_key
    assert len(key) == 64
    sent = [r for r in world.standin.requests if r.target.startswith(backend_path)]
    assert sent and all(r.headers.get("authorization") == f"Bearer {key}" for r in sent)


async def test_relay_a_request_id_is_made_when_none_is_sent(world: World) -> None:
    response = await world.client.post("/api/chat", json={"model": "tiny", "messages": [], "stream": False})
    assert len(response.headers["x-request-id"]) == 16


async def test_relay_chat_truncate_drops_the_oldest_turns_and_keeps_system_and_last(world: World) -> None:
    messages = [{"role": "system", "content": "S" * 20}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}" * 60} for i in range(6)]
    messages.append({"role": "user", "content": "last question"})
    status, reply = await post(world, "/api/chat", {"model": "tiny", "messages": messages, "stream": False})
    assert status == 200 and reply["message"]["content"] == "echo: last question"
    sent = world.standin.last("/v1/chat/completions").body["messages"]
    assert sent[0]["content"] == "S" * 20 and sent[-1]["content"] == "last question"
    assert sum(len(m["content"]) for m in sent) <= 200 and len(sent) < len(messages)
    assert [m["content"] for m in sent[1:-1]] == [m["content"] for m in messages[1:-1]][-len(sent) + 2 :]


async def test_relay_chat_truncate_false_is_a_clear_400(world: World) -> None:
    messages = [{"role": "user", "content": "x" * 300}]
    status, reply = await post(world, "/api/chat", {"model": "tiny", "messages": messages, "truncate": False})
    assert status == 400
    assert reply == {
        "error": "the prompt (300 tokens) is longer than the context length (200 tokens): raise options.num_ctx"
    }


async def test_relay_single_prompt_too_long_is_a_clear_400(world: World) -> None:
    status, reply = await post(world, "/api/generate", {"model": "tiny", "prompt": "y" * 300})
    assert status == 400 and reply["error"].startswith("the prompt (300 tokens) is longer than the context length")


async def test_relay_shift_must_match_what_the_backend_runs_with(world: World) -> None:
    chat = {"messages": [{"role": "user", "content": "x"}], "stream": False}
    status, reply = await post(world, "/api/chat", {**chat, "model": "tiny", "shift": True})
    assert status == 400 and "shift: true is not available for tiny" in reply["error"]
    assert (await post(world, "/api/chat", {**chat, "model": "tiny", "shift": False}))[0] == 200
    assert (await post(world, "/api/chat", {**chat, "model": "shifty", "shift": True}))[0] == 200
    status, reply = await post(world, "/api/chat", {**chat, "model": "shifty", "shift": False})
    assert status == 400 and "runs with --context-shift" in reply["error"]


async def test_relay_embed_truncate_cuts_long_inputs_to_the_backend_limit(world: World) -> None:
    status, reply = await post(world, "/api/embed", {"model": "tiny", "input": ["short", "z" * 40]})
    assert status == 200 and len(reply["embeddings"]) == 2
    sent = world.standin.last("/v1/embeddings").body["input"]
    assert sent[0] == [ord(c) for c in "short"] and len(sent[1]) == 16  # tokenized, then cut to the batch size


async def test_relay_embed_truncate_false_is_ollamas_400(world: World) -> None:
    status, reply = await post(world, "/api/embed", {"model": "tiny", "input": "z" * 40, "truncate": False})
    assert (status, reply) == (400, {"error": "the input length exceeds the context length"})


@pytest.mark.parametrize(
    "path", ["/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/v1/rerank", "/v1/reranking"]
)
async def test_relay_openai_and_anthropic_paths_are_routed_by_model(world: World, path: str) -> None:
    status, reply = await post(world, path, {"model": "tiny", "input": "x"})
    assert status == 200 and reply == {"served_by": "standin", "path": path, "model": "tiny"}


async def test_relay_native_passthrough_keeps_the_raw_path(tmp_path: Path, tiny_model: Path) -> None:
    """Over a real socket (uvicorn): the test client rebuilds raw_path from the decoded path."""
    config = fake_config(tmp_path, tiny_model, {"tiny": {}}, server={"listen": f"127.0.0.1:{free_port()}"})
    async with StandIn() as standin:
        runtime = FakeRuntime(backend_url=standin.url)
        async with running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "x") as running:
            raw = "/llama/tiny/echo/a%20b%3Fc%23d%2Fe?x=%C3%A9&y=1"
            response = await running.client.get(raw)
            assert response.status_code == 200
            assert response.json()["target"] == "/echo/a%20b%3Fc%23d%2Fe?x=%C3%A9&y=1"
            encoded_name = await running.client.get("/llama/tin%79/echo")  # the name may be encoded too
            assert encoded_name.json()["target"] == "/echo"


async def test_relay_native_passthrough_non_latin1_path_is_not_a_500(world: World) -> None:
    response = await world.client.get("/llama/tiny/echo/ünïcødé/€")
    assert response.status_code == 200
    target = (await response.get_json())["target"]
    assert target.startswith("/echo/") and all(ord(c) < 128 for c in target)


async def test_relay_native_head_answers_without_a_body(world: World) -> None:
    response = await world.client.head("/llama/tiny/health")
    assert response.status_code == 200 and await response.get_data() == b""


TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("stream", [True, False])
async def test_relay_tools_a_model_cannot_use_are_dropped_and_the_answer_says_so(world: World, stream: bool) -> None:
    """The default (gateway.unsupported_tools: ignore): a chat front end that sends its tools with every request
    (Open WebUI) still chats with a model whose template has no tool support."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "stream": stream}
    response = await world.client.post("/api/chat", json=body)
    data = await response.get_data()
    assert response.status_code == 200 and response.headers["X-LlamaController-Ignored"] == "tools"
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[-1]["done"] is True and "".join(line["message"]["content"] for line in lines) == "echo: x"
    sent = world.standin.last("/v1/chat/completions").body
    assert "tools" not in sent and "tool_choice" not in sent and sent["messages"] == [{"role": "user", "content": "x"}]


async def test_relay_a_chat_without_tools_says_nothing_of_them(world: World) -> None:
    response = await world.client.post(
        "/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    )
    assert response.status_code == 200 and "X-LlamaController-Ignored" not in response.headers


async def test_relay_tools_a_model_cannot_use_are_refused_as_ollama_does(tmp_path: Path, tiny_model: Path) -> None:
    config = fake_config(tmp_path, tiny_model, {"tiny": {}}, gateway={"unsupported_tools": "reject"})
    async with StandIn() as standin:
        app: Quart = fake_app(config, FakeRuntime(backend_url=standin.url))
        async with app.test_app():
            body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
            response = await app.test_client().post("/api/chat", json=body)
            assert response.status_code == 400
            assert await response.get_json() == {"error": "tiny does not support tools"}
            assert not [r for r in standin.requests if r.target.startswith("/v1/chat")]
