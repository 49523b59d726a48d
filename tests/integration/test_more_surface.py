"""The rest of the gateway's surface against the real llama-server: the real `anthropic` client on
/v1/messages, the real `openai` client on /v1/responses, reranking, and Ollama's truncate (chat and embed)
on real context and batch limits."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import anthropic
import ollama
import openai
import pytest

from controller.runtime.process import free_port
from tests.support.server import ServeProcess, serve_subprocess

pytestmark = pytest.mark.gemma
GEMMA = "gemma3:270m"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, gemma_model: Path) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("surface")
    gemma = gemma_model
    for name in ("small", "ranker"):
        shutil.copy(tiny_model, root / f"{name}.gguf")
    config = {
        "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "edge": {"enabled": False},
        "models_dir": str(root / "none"),
        "defaults": {"ctx_size": 2048, "max_concurrent": 1, "keep_alive": "10m"},
        "scheduling": {"max_loaded_models": 3},
        "models": {
            GEMMA: {"path": str(gemma)},
            # 256 tokens per request and a 64-token batch: the limits truncate works against
            "small": {"path": str(root / "small.gguf"), "ctx_size": 256, "args": ["-ub", "64", "-b", "64"]},
            "ranker": {"path": str(root / "ranker.gguf"), "reranking": True},
        },
    }
    with serve_subprocess(config, root) as served:
        yield served


def test_surface_anthropic_client_on_messages(server: ServeProcess) -> None:
    # Every client is closed: one left to the garbage collector warns (an error here) in whichever test runs then.
    with anthropic.Anthropic(base_url=server.url, api_key=server.token, max_retries=0) as client:
        reply = client.messages.create(model=GEMMA, max_tokens=12, messages=[{"role": "user", "content": "Say hello."}])
        assert reply.role == "assistant" and reply.content and reply.content[0].type == "text"
        assert reply.usage.output_tokens > 0
        with client.messages.stream(
            model=GEMMA, max_tokens=8, messages=[{"role": "user", "content": "Count to three."}]
        ) as stream:
            text = "".join(stream.text_stream)
        assert text
        counted = client.messages.count_tokens(model=GEMMA, messages=[{"role": "user", "content": "Hello there"}])
        assert counted.input_tokens > 0


def test_surface_anthropic_client_errors_are_anthropic_errors(server: ServeProcess) -> None:
    with anthropic.Anthropic(base_url=server.url, api_key="lc_bad_token", max_retries=0) as unauthenticated:
        with pytest.raises(anthropic.AuthenticationError):
            unauthenticated.messages.create(model=GEMMA, max_tokens=4, messages=[{"role": "user", "content": "x"}])
    with anthropic.Anthropic(base_url=server.url, api_key=server.token, max_retries=0) as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            client.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert "model 'nope' not found" in str(missing.value)


def test_surface_openai_client_on_responses(server: ServeProcess) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0) as client:
        response = client.responses.create(model=GEMMA, input="Say hello.", max_output_tokens=12)
        assert response.output_text
        events = list(client.responses.create(model=GEMMA, input="Count to three.", max_output_tokens=8, stream=True))
    assert any(event.type == "response.output_text.delta" for event in events)
    assert events[-1].type == "response.completed"


def test_surface_rerank_reaches_a_reranking_backend(server: ServeProcess) -> None:
    body = {"model": "ranker", "query": "hello", "documents": ["hello world", "goodbye"]}
    response = server.http.post("/v1/rerank", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert sorted(result["index"] for result in results) == [0, 1]
    assert all(isinstance(result["relevance_score"], float) for result in results)


def test_surface_chat_truncate_drops_old_turns_on_the_real_context(server: ServeProcess) -> None:
    long_turn = "hello world " * 40  # far over 256 tokens in four turns
    messages = [{"role": "system", "content": "Be brief."}]
    for index in range(4):
        messages += [{"role": "user", "content": f"{index} {long_turn}"}, {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": "hello"})
    with ollama.Client(host=server.url, headers=server.headers, timeout=120) as client:
        reply = client.chat("small", messages=messages, options={"num_predict": 4})
    assert reply.done
    # The Python client has no truncate argument: the raw request.
    refused = server.http.post("/api/chat", json={"model": "small", "messages": messages, "truncate": False})
    assert refused.status_code == 400 and "is longer than the context length" in refused.json()["error"]


def test_surface_embed_truncate_on_the_real_batch_limit(server: ServeProcess) -> None:
    long_input = "hello world " * 60  # more tokens than the 64-token batch
    with ollama.Client(host=server.url, headers=server.headers, timeout=120) as client:
        embedded = client.embed("small", input=["hello", long_input])
        assert len(embedded.embeddings) == 2 and all(len(v) == 64 for v in embedded.embeddings)
        with pytest.raises(ollama.ResponseError) as refused:
            client.embed("small", input=long_input, truncate=False)
    assert refused.value.status_code == 400 and refused.value.error == "the input length exceeds the context length"
