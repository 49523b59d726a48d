"""The contract: the real `ollama` Python client (sync and async) against the gateway, real llama-server.

Gemma 3 270M where realism matters (templates, capabilities from a real GGUF, embeddings); tiny generated
models for tools (a template that supports them) and for cancellation.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from controller.runtime.process import free_port
from tests.support.server import ServeProcess, backend_headers, serve_subprocess
from tests.support.tinymodel import TOOLS_CHAT_TEMPLATE, write_tiny_model

pytestmark = pytest.mark.gemma
GEMMA = "gemma3:270m"
SHORT = {"num_predict": 12, "temperature": 0}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def gemma_file(gemma_model: Path) -> Path:
    return gemma_model


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, gemma_file: Path, tiny_model: Path, long_tiny_model: Path
) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("ollama")
    tools_model = write_tiny_model(root / "tools.gguf", chat_template=TOOLS_CHAT_TEMPLATE)
    shutil.copy(tiny_model, root / "tiny.gguf")
    config = {
        "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "edge": {"enabled": False},
        "models_dir": str(root / "none"),
        "defaults": {"ctx_size": 2048, "max_concurrent": 2, "keep_alive": "10m"},
        "scheduling": {"max_loaded_models": 4},
        "models": {
            GEMMA: {"path": str(gemma_file)},
            "tiny": {"path": str(root / "tiny.gguf")},
            "tools": {"path": str(tools_model)},
            # 32k tokens of context per request: a generation that runs for seconds unless cancelled.
            "long": {"path": str(long_tiny_model), "ctx_size": 32768, "max_concurrent": 1},
        },
    }
    with serve_subprocess(config, root) as served:
        yield served


@pytest.fixture
def client(server: ServeProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=120, headers=server.headers) as made:
        yield made


def test_ollama_root_version_and_redirect(server: ServeProcess) -> None:
    root = server.http.get("/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert server.http.head("/").status_code == 200
    assert server.http.get("/api/version").json()["version"].count(".") == 2
    browser = server.http.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert browser.status_code == 302 and browser.headers["location"] == "/ui/"
    wrong = server.http.post("/api/tags")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_ollama_list_and_show(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {GEMMA, "tiny:latest", "tools:latest", "long:latest"}
    gemma = listed[GEMMA]
    assert isinstance(gemma.modified_at, datetime) and gemma.size == 253113024
    assert gemma.digest and len(gemma.digest) == 64
    assert gemma.details and gemma.details.family == "gemma3" and gemma.details.quantization_level == "Q4_K_M"
    assert gemma.details.parameter_size == "268.10M"

    shown = client.show(GEMMA)
    assert shown.modelinfo is not None and shown.modelinfo["gemma3.context_length"] == 32768
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.capabilities == ["completion"]
    assert "num_ctx" in (shown.parameters or "")
    assert "tools" in (client.show("tools").capabilities or [])
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("nope")
    assert missing.value.status_code == 404 and missing.value.error == "model 'nope' not found"


def test_ollama_gemma_gets_its_own_chat_format(server: ServeProcess) -> None:
    """The demo GGUF has no template: the backend must still speak Gemma's turn format, not ChatML."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    rendered = server.http.post(f"/llama/{GEMMA}/apply-template", json={"messages": messages}).json()["prompt"]
    assert rendered == "<start_of_turn>user\nBe brief.\n\nHello!<end_of_turn>\n<start_of_turn>model\n"


def test_ollama_generate_stream_and_not(client: ollama.Client) -> None:
    reply = client.generate(GEMMA, "Why is the sky blue?", options=SHORT)
    assert reply.done and reply.done_reason in ("stop", "length") and reply.response
    assert reply.eval_count and 0 < reply.eval_count <= 12
    assert reply.total_duration and reply.eval_duration and reply.prompt_eval_count
    assert reply.total_duration > reply.eval_duration > 0

    parts = list(client.generate(GEMMA, "Name three colours.", options=SHORT, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.response or "" for p in parts[:-1])
    assert parts[-1].eval_count and parts[-1].created_at and parts[-1].created_at.endswith("Z")


def test_ollama_chat_stream_and_not(client: ollama.Client) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    reply = client.chat(GEMMA, messages=messages, options=SHORT)
    assert reply.message.role == "assistant" and reply.message.content and reply.done
    parts = list(client.chat(GEMMA, messages=messages, options=SHORT, stream=True))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert all(p.message.role == "assistant" for p in parts)


def test_ollama_structured_outputs(client: ollama.Client) -> None:
    """The schema reaches llama-server as a grammar: the output can only be (a prefix of) that document.

    A 270M model pads with whitespace until the token limit, so completeness is not asserted; without the
    constraint it writes prose."""
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "maxLength": 12}},
        "required": ["colour"],
    }
    reply = client.chat(
        GEMMA,
        messages=[{"role": "user", "content": "Favourite colour as JSON."}],
        format=schema,
        options={"num_predict": 40, "temperature": 0},
    )
    compact = re.sub(r"\s", "", reply.message.content or "")
    assert re.fullmatch(r'\{("colour"(:("[^"]{0,12}("\}?)?)?)?)?', compact), reply.message.content
    if reply.done_reason == "stop":
        assert set(json.loads(reply.message.content or "")) == {"colour"}
    reply = client.chat(
        GEMMA,
        messages=[{"role": "user", "content": "Favourite colour as JSON."}],
        format="json",
        options={"num_predict": 40, "temperature": 0},
    )
    assert re.sub(r"\s", "", reply.message.content or "").startswith("{"), reply.message.content


def test_ollama_capabilities_are_enforced(client: ollama.Client) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"think": True}, f'"{GEMMA}" does not support thinking'),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "what is this?",
                        "images": [base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()],
                    }
                ]
            },
            f'"{GEMMA}" does not support image input',
        ),
    ]
    for extra, message in cases:
        arguments: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **extra}
        with pytest.raises(ollama.ResponseError) as refused:
            client.chat(GEMMA, **arguments)
        assert refused.value.status_code == 400 and refused.value.error == message
    assert client.chat(GEMMA, messages=[{"role": "user", "content": "hi"}], think=False, options=SHORT).done


def test_ollama_tools_gemma_cannot_use_are_dropped_and_it_answers(client: ollama.Client) -> None:
    """gateway.unsupported_tools: ignore (the default), as a chat front end sending its tools every time meets it;
    the refusal Ollama answers instead (reject) is tested in tests/http/test_gateway_relay.py."""
    reply = client.chat(
        GEMMA, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], options=SHORT, stream=False
    )
    assert reply.done and reply.message.content and not reply.message.tool_calls


def test_ollama_tool_history_reaches_a_tools_model(client: ollama.Client) -> None:
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            ],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 degrees"},
    ]
    reply = client.chat("tools", messages=messages, tools=[WEATHER_TOOL], options={"num_predict": 4})
    assert reply.done and reply.prompt_eval_count and reply.prompt_eval_count > 50  # the tools made it in


def test_ollama_num_ctx_restarts_only_when_larger(client: ollama.Client, server: ServeProcess) -> None:
    client.chat("tiny", messages=[{"role": "user", "content": "hi"}], options={"num_ctx": 1024, "num_predict": 2})
    before = server.http.get("/control/v1/models/tiny").json()
    client.chat("tiny", messages=[{"role": "user", "content": "hi"}], options={"num_ctx": 2048, "num_predict": 2})
    after = server.http.get("/control/v1/models/tiny").json()
    assert after["starts"] == before["starts"], "the running context (2048) already covers it"
    ps = {m.model: m for m in client.ps().models}
    assert ps["tiny:latest"].context_length == 2048


def test_ollama_embeddings(client: ollama.Client) -> None:
    embedded = client.embed(GEMMA, ["hello world", "the sky is blue"], dimensions=8)
    assert len(embedded.embeddings) == 2 and all(len(v) == 8 for v in embedded.embeddings)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-6 for v in embedded.embeddings)
    assert embedded.prompt_eval_count and embedded.prompt_eval_count > 2
    full = client.embed(GEMMA, "hello world")
    assert len(full.embeddings[0]) == 640
    legacy = client.embeddings(GEMMA, "hello world")
    assert len(legacy.embedding) == 640
    assert client.embeddings(GEMMA, "").embedding == []


def test_ollama_embed_rejects_wrong_input_types(server: ServeProcess) -> None:
    response = server.http.post("/api/embed", json={"model": GEMMA, "input": [1, 2]})
    assert response.status_code == 400 and response.json() == {"error": "invalid input type"}


def test_ollama_load_unload_and_ps(client: ollama.Client) -> None:
    loaded = client.generate("tiny")
    assert loaded.done and loaded.done_reason == "load"
    ps = {m.model: m for m in client.ps().models}
    assert "tiny:latest" in ps
    tiny = ps["tiny:latest"]
    assert isinstance(tiny.expires_at, datetime) and tiny.expires_at > datetime.now(UTC)
    sizes = {m.model: m.size for m in client.list().models}
    assert tiny.size == sizes["tiny:latest"] and tiny.size_vram == 0

    forever = client.chat("tiny", messages=[], keep_alive=-1)
    assert forever.done_reason == "load"
    tiny = {m.model: m for m in client.ps().models}["tiny:latest"]
    assert tiny.expires_at and tiny.expires_at.year > datetime.now(UTC).year + 100

    unloaded = client.generate("tiny", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "tiny:latest" not in {m.model for m in client.ps().models}


def test_ollama_errors_reach_the_client(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat("missing-model", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and missing.value.error == "model 'missing-model' not found"
    with pytest.raises(ollama.ResponseError) as duration:
        client.generate(GEMMA, "hi", keep_alive="-1")
    assert duration.value.status_code == 400 and "missing unit" in duration.value.error
    with pytest.raises(ollama.ResponseError) as typed:
        client.generate(GEMMA, "hi", options={"temperature": "hot"})
    assert typed.value.status_code == 400 and typed.value.error == 'option "temperature" must be of type float32'


@pytest.mark.parametrize("call", ["pull", "push", "create", "delete", "copy"])
def test_ollama_model_management_is_refused(client: ollama.Client, call: str) -> None:
    arguments: dict[str, Any] = {
        "pull": {"model": GEMMA},
        "push": {"model": GEMMA},
        "create": {"model": "x", "from_": GEMMA},
        "delete": {"model": GEMMA},
        "copy": {"source": GEMMA, "destination": "x"},
    }[call]
    with pytest.raises(ollama.ResponseError) as refused:
        getattr(client, call)(**arguments)
    assert refused.value.status_code == 403 and "models_dir" in refused.value.error


def test_ollama_blobs_are_refused(server: ServeProcess) -> None:
    digest = "sha256:" + "0" * 64
    for method in ("HEAD", "POST"):
        response = server.http.request(method, f"/api/blobs/{digest}", content=b"x")
        assert response.status_code == 403


def test_ollama_async_client(server: ServeProcess) -> None:
    async def scenario() -> None:
        async with ollama.AsyncClient(host=server.url, timeout=120, headers=server.headers) as client:
            await exercise(client)

    async def exercise(client: ollama.AsyncClient) -> None:
        assert GEMMA in {m.model for m in (await client.list()).models}
        reply = await client.generate(GEMMA, "Hello", options=SHORT)
        assert reply.done and reply.response
        parts = [
            part
            async for part in await client.chat(
                GEMMA, messages=[{"role": "user", "content": "Hi"}], options=SHORT, stream=True
            )
        ]
        assert parts[-1].done and parts[-1].eval_count
        embedded = await client.embed(GEMMA, "hi")
        assert len(embedded.embeddings) == 1
        assert (await client.show(GEMMA)).capabilities == ["completion"]
        assert isinstance((await client.ps()).models, list)

    asyncio.run(scenario())


def test_ollama_tokens_stream_before_generation_ends(server: ServeProcess) -> None:
    """No buffering: lines arrive spread over the generation, not all at its end."""
    body = {"model": GEMMA, "prompt": "Tell me a long story about a cat.", "options": {"num_predict": 48}}
    arrivals: list[float] = []
    lines: list[dict[str, Any]] = []
    with server.http.stream("POST", "/api/generate", json=body, timeout=60) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        for line in response.iter_lines():
            arrivals.append(time.perf_counter())
            lines.append(json.loads(line))
    assert not lines[0]["done"] and lines[-1]["done"]
    eval_seconds = lines[-1]["eval_duration"] / 1e9
    assert arrivals[-1] - arrivals[0] > 0.5 * eval_seconds, "the lines arrived together: the stream was buffered"


def test_ollama_client_disconnect_frees_the_slot(server: ServeProcess) -> None:
    server.http.post("/control/v1/models/long/load", timeout=60)
    backend = server.http.get("/control/v1/models/long").json()["backend_url"]  # asked directly: the
    # gateway would queue this behind the generation (max_concurrent 1)
    body = {"model": "long", "prompt": "hi", "raw": True, "options": {"num_predict": 30000}}
    with server.http.stream("POST", "/api/generate", json=body, timeout=30) as response:
        lines = response.iter_lines()  # kept: dropping the iterator would already close the stream
        assert not json.loads(next(lines))["done"]
        # (llama-server may run more slots than asked for: any of them)
        assert any(
            slot["is_processing"]
            for slot in httpx.get(
                f"{backend}/slots", headers=backend_headers(server.config["server"]["data_dir"], "long:latest")
            ).json()
        ), "the generation runs"
    deadline = time.monotonic() + 3
    busy: list[Any] = []
    while time.monotonic() < deadline:
        busy = [
            s
            for s in httpx.get(
                f"{backend}/slots", headers=backend_headers(server.config["server"]["data_dir"], "long:latest")
            ).json()
            if s["is_processing"]
        ]
        if not busy:
            break
        time.sleep(0.05)
    assert busy == [], "the client left: llama-server must stop generating"


def test_ollama_client_without_credentials_gets_a_clean_401(server: ServeProcess) -> None:
    with ollama.Client(host=server.url) as anonymous:
        with pytest.raises(ollama.ResponseError) as refused:
            anonymous.list()
    assert refused.value.status_code == 401
    assert refused.value.error == "authentication required: send 'Authorization: Bearer <API token>'"
    with ollama.Client(host=server.url, headers={"Authorization": "Bearer lc_0000000000000000_" + "x" * 43}) as wrong:
        with pytest.raises(ollama.ResponseError) as invalid:
            wrong.chat(GEMMA, messages=[{"role": "user", "content": "hi"}])
    assert invalid.value.status_code == 401 and invalid.value.error == "invalid API token"
    assert httpx.get(server.url + "/").text == "Ollama is running"  # the liveness probe stays open
