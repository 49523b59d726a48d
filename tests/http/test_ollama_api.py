"""The Ollama surface's own behaviour through the test client (FakeRuntime): shapes, errors, fuzzing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart import Quart
from quart.typing import TestClientProtocol as Client

from controller.runtime.fake import FakeRuntime
from tests.support.harness import fake_app, fake_config


@pytest.fixture
async def app(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Quart]:
    config = fake_config(
        tmp_path,
        tiny_model,
        {"tiny": {}, "other:v2": {}},
        server={"data_dir": str(tmp_path / "data"), "max_body_bytes": 65536},
        scheduling={"max_loaded_models": 2},
    )
    runtime = FakeRuntime()
    application = fake_app(config, runtime)
    async with application.test_app():
        yield application


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


async def post(client: Client, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    return response.status_code, json.loads(await response.get_data())


async def test_ollama_http_root_version_tags(client: Client) -> None:
    root = await client.get("/")
    assert root.status_code == 200 and await root.get_data() == b"Ollama is running"
    head = await client.head("/api/tags")
    assert head.status_code == 200 and await head.get_data() == b""
    assert (await (await client.get("/api/version")).get_json()) == {"version": "0.33.0"}
    tags = await (await client.get("/api/tags")).get_json()
    names = [m["name"] for m in tags["models"]]
    assert names == ["other:v2", "tiny:latest"]
    model = tags["models"][1]
    assert set(model) == {"name", "model", "modified_at", "size", "digest", "details", "capabilities"}
    assert model["modified_at"].endswith("Z") and isinstance(model["size"], int) and len(model["digest"]) == 64
    assert model["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "119K",
        "quantization_level": "F32",
    }


async def test_ollama_http_show_and_ps(client: Client) -> None:
    status, shown = await post(client, "/api/show", {"model": "tiny"})
    assert status == 200
    assert shown["model_info"]["llama.context_length"] == 2048
    assert shown["model_info"]["tokenizer.ggml.tokens"] == []  # long arrays are summarised
    assert "general.name" not in shown["model_info"] and "tokenizer.chat_template" not in shown["model_info"]
    assert shown["capabilities"] == ["completion"] and shown["template"].startswith("{% for message")
    assert (await post(client, "/api/show", {"name": "tiny"}))[0] == 200  # the legacy field
    assert await post(client, "/api/show", {}) == (400, {"error": "model is required"})
    assert await post(client, "/api/show", {"model": "ghost"}) == (404, {"error": "model 'ghost' not found"})
    assert await (await client.get("/api/ps")).get_json() == {"models": []}


async def test_ollama_http_load_and_unload_without_generating(client: Client) -> None:
    status, loaded = await post(client, "/api/generate", {"model": "tiny", "stream": False})
    assert status == 200 and loaded["done_reason"] == "load" and loaded["response"] == ""
    ps = await (await client.get("/api/ps")).get_json()
    assert [m["name"] for m in ps["models"]] == ["tiny:latest"]
    assert ps["models"][0]["context_length"] == 2048 and ps["models"][0]["expires_at"].endswith("Z")
    response = await client.post("/api/chat", json={"model": "tiny", "messages": [], "keep_alive": 0})
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = (await response.get_data()).decode().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["done_reason"] == "unload"
    assert json.loads(lines[0])["message"] == {"role": "assistant", "content": ""}
    assert await (await client.get("/api/ps")).get_json() == {"models": []}


async def test_ollama_http_embed_without_input_loads(client: Client) -> None:
    assert await post(client, "/api/embed", {"model": "tiny"}) == (200, {"model": "tiny", "embeddings": []})
    assert await post(client, "/api/embeddings", {"model": "tiny", "prompt": ""}) == (200, {"embedding": []})


@pytest.mark.parametrize(
    "path", ["/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs/sha256:" + "a" * 64]
)
async def test_ollama_http_management_endpoints_are_refused(client: Client, path: str) -> None:
    status, body = await post(client, path, {"model": "tiny"})
    assert status == 403 and "models_dir" in body["error"] and set(body) == {"error"}


async def test_ollama_http_unreachable_backend_is_a_clean_error(client: Client) -> None:
    status, body = await post(
        client, "/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": False}
    )
    assert status == 502 and set(body) == {"error"} and "refused" in body["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/chat", b"", 400, "missing request body"),
        ("/api/chat", b"{", 400, None),
        ("/api/chat", b"[]", 400, "request body must be a JSON object"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/generate", {"prompt": "x"}, 404, "model '' not found"),
        ("/api/chat", {"model": "a/b", "messages": []}, 400, None),
        (
            "/api/chat",
            {"model": "ghost", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model 'ghost' not found",
        ),
        (
            "/api/chat",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "think": True},
            400,
            '"tiny" does not support thinking',
        ),
        ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, '"tiny" does not support insert'),
        ("/api/embed", {"model": "tiny", "input": 3}, 400, "invalid input type"),
        ("/api/nothing", {}, 404, "no such endpoint: /api/nothing"),
        ("/api/chat", b'{"model": "tiny", "x": "' + b"y" * 70000 + b'"}', 413, None),
    ],
)
async def test_ollama_http_errors_in_ollama_shape(
    client: Client, path: str, body: Any, status: int, error: str | None
) -> None:
    got_status, got = await post(client, path, body)
    assert got_status == status and set(got) == {"error"}
    if error is not None:
        assert got["error"] == error
    assert "Traceback" not in got["error"]


async def test_ollama_http_wrong_method(client: Client) -> None:
    response = await client.get("/api/chat")
    assert response.status_code == 405 and "use POST" in (await response.get_json())["error"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model",
    "messages",
    "prompt",
    "stream",
    "options",
    "format",
    "keep_alive",
    "think",
    "tools",
    "images",
    "raw",
    "suffix",
    "system",
    "template",
    "input",
    "top_logprobs",
    "logprobs",
    "dimensions",
    "truncate",
]
BODIES = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), JSON, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"]),
    body=BODIES | JSON,
)
async def test_ollama_http_fuzzed_bodies_never_500(client: Client, path: str, body: Any) -> None:
    status, payload = await post(client, path, body)
    assert status != 500, payload
    if status >= 400:
        assert isinstance(payload, dict) and set(payload) == {"error"} and isinstance(payload["error"], str)


WRONG_TYPES = {
    "stream": st.text(min_size=1) | st.integers(),
    "options": st.lists(st.integers(), max_size=2) | st.text(),
    "format": st.integers() | st.text(min_size=1).filter(lambda s: s != "json"),
    # Go accepts a bare "0" as a duration; any other number without a unit is an error.
    "keep_alive": st.lists(st.integers(), max_size=1)
    | st.text(alphabet="0123456789", min_size=1).filter(lambda s: s.strip("0") != ""),
    "think": st.integers()
    | st.text(min_size=1).filter(lambda s: s.lower() not in {"low", "medium", "high", "max", "true", "false"}),
    "messages": st.integers() | st.text(),
}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(WRONG_TYPES)), data=st.data())
async def test_ollama_http_any_mistyped_field_is_a_400(client: Client, field: str, data: st.DataObject) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], field: data.draw(WRONG_TYPES[field])}
    status, payload = await post(client, "/api/chat", body)
    assert status == 400 and set(payload) == {"error"}, (body, payload)
