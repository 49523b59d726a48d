"""The lifecycle against the real llama-server (tiny generated models): load, switch, expiry, crash, drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.server import backend_headers, backend_processes, bearer, real_config, running_app

Models = Callable[..., dict[str, dict[str, Any]]]
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


def path_of(models: dict[str, dict[str, Any]], name: str) -> Path:
    return Path(models[name]["path"])


async def state(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    response = await client.get(f"/control/v1/models/{name}")
    body: dict[str, Any] = response.json()
    return body


async def wait_for_state(client: httpx.AsyncClient, name: str, wanted: str, timeout: float = 10) -> float:
    started = time.monotonic()
    while (await state(client, name))["state"] != wanted:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{name} never became {wanted}: {await state(client, name)}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_real_load_unload_and_switch(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a", "b")
    async with running_app(real_config(tmp_path, models, scheduling={"max_loaded_models": 2})) as running:
        client = running.client
        loaded = (await client.post("/control/v1/models/a/load")).json()
        assert loaded["state"] == "ready"
        health = await client.get(f"{loaded['backend_url']}/health")
        assert health.json() == {"status": "ok"}
        assert len(backend_processes(path_of(models, "a"))) == 1

        await client.post("/control/v1/models/b/load")
        assert len(backend_processes(path_of(models, "a"))) == 1, "room for two: a stays"

        switched = await client.post("/control/v1/models/a/load", json={"exclusive": True})
        assert switched.json()["state"] == "ready"
        assert (await state(client, "b"))["state"] == "stopped"
        assert backend_processes(path_of(models, "b")) == []

        unloaded = (await client.post("/control/v1/models/a/unload")).json()
        assert unloaded["state"] == "stopped" and unloaded["backend_url"] is None
        assert backend_processes(path_of(models, "a")) == []


async def test_real_backend_answers_the_gateway_only(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    async with running_app(real_config(tmp_path, models)) as running:
        client = running.client
        url = (await client.post("/control/v1/models/a/load")).json()["backend_url"]
        async with httpx.AsyncClient(timeout=30) as direct:  # a local user who found the port
            chat = {"model": "a", **CHAT}
            assert (await direct.post(f"{url}/v1/chat/completions", json=chat)).status_code == 401
            key_file = tmp_path / "data" / "run" / "a:latest.key"
            key = key_file.read_text().strip()
            assert len(key) == 64 and key_file.stat().st_mode & 0o077 == 0
            assert (await direct.get(f"{url}/props")).status_code == 401
            assert (await direct.get(f"{url}/metrics")).status_code == 401
            with_token = await direct.post(f"{url}/completion", json={"prompt": "x"}, headers=bearer(running.token))
            assert with_token.status_code == 401, "a LlamaController token is no key to a backend"
            assert (await direct.get(f"{url}/health")).status_code == 200  # open: kubelet probes need no key
            assert (await direct.post(f"{url}/v1/chat/completions", json=chat, headers=bearer(key))).status_code == 200
        assert (await client.post("/v1/chat/completions", json={"model": "a", **CHAT})).status_code == 200
        assert (await client.get("/llama/a/props")).status_code == 200
        (process,) = backend_processes(path_of(models, "a"))
        assert key not in " ".join(process.cmdline()) and "--api-key-file" in process.cmdline()


async def test_real_on_demand_load_from_chat_and_streaming(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    async with running_app(real_config(tmp_path, models)) as running:
        client = running.client
        assert (await state(client, "a"))["state"] == "stopped"
        response = await client.post("/v1/chat/completions", json={"model": "a", **CHAT})
        assert response.status_code == 200
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == "a"
        assert body["usage"]["completion_tokens"] > 0

        events = []
        async with client.stream("POST", "/v1/chat/completions", json={"model": "a", "stream": True, **CHAT}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len(chunks) >= 2


async def test_real_twenty_concurrent_requests_start_one_process(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    config = real_config(tmp_path, models, defaults={"max_concurrent": 4, "queue_depth": 64})
    async with running_app(config) as running:
        responses = await asyncio.gather(
            *(running.client.post("/v1/chat/completions", json={"model": "a", **CHAT}) for _ in range(20))
        )
        assert [r.status_code for r in responses] == [200] * 20
        assert len(backend_processes(path_of(models, "a"))) == 1
        assert (await state(running.client, "a"))["starts"] == 1


async def test_real_keep_alive_expiry_unloads(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    async with running_app(real_config(tmp_path, models, defaults={"keep_alive": "1s"})) as running:
        await running.client.post("/v1/chat/completions", json={"model": "a", **CHAT})
        assert (await state(running.client, "a"))["expires_at"] is not None
        await wait_for_state(running.client, "a", "stopped", timeout=5)
        assert backend_processes(path_of(models, "a")) == []


async def test_real_pinned_model_is_never_evicted(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("p", "a", "b", p={"pinned": True})
    config = real_config(tmp_path, models, scheduling={"max_loaded_models": 2})
    async with running_app(config) as running:
        client = running.client
        await wait_for_state(client, "p", "ready")
        for name in ("a", "b", "a"):
            assert (await client.post("/v1/chat/completions", json={"model": name, **CHAT})).status_code == 200
        assert (await state(client, "p"))["state"] == "ready"
        assert (await state(client, "b"))["state"] == "stopped"
        pinned_pid = (await state(client, "p"))["handle"]
        assert [str(p.pid) for p in backend_processes(path_of(models, "p"))] == [pinned_pid]


async def test_real_busy_model_is_not_evicted_until_drained(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a", "b")
    async with running_app(real_config(tmp_path, models)) as running:
        client = running.client
        long_request = {"model": "a", "prompt": "hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        first_chunk = asyncio.Event()
        chunks = 0

        async def stream_a() -> None:
            nonlocal chunks
            async with client.stream("POST", "/v1/completions", json=long_request) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        chunks += 1
                        first_chunk.set()
                        await asyncio.sleep(0.001)  # a slow reader keeps the request in flight longer

        streaming = asyncio.create_task(stream_a())
        await first_chunk.wait()
        switching = asyncio.create_task(client.post("/control/v1/models/b/load"))
        await asyncio.sleep(0.2)
        if not streaming.done():
            assert len(backend_processes(path_of(models, "a"))) == 1, "a must keep serving its stream"
            assert not switching.done()
        await streaming
        assert chunks > 100, "the stream ran to its end, not cut off by the switch"
        assert (await switching).json()["state"] == "ready"
        assert backend_processes(path_of(models, "a")) == []


async def test_real_kill_9_fails_fast_and_next_request_restarts(tmp_path: Path, long_tiny_model: Path) -> None:
    # A 32k-token context per request: the generation below runs for seconds, so the kill lands mid-stream.
    models = {"a": {"path": str(long_tiny_model), "ctx_size": 32768, "max_concurrent": 1}}
    async with running_app(real_config(tmp_path, models)) as running:
        client = running.client
        long_request = {"model": "a", "prompt": "hi", "max_tokens": 20000, "ignore_eos": True, "stream": True}
        events: list[str] = []
        started = asyncio.Event()

        async def stream() -> None:
            async with client.stream("POST", "/v1/completions", json=long_request) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        streaming = asyncio.create_task(stream())
        await started.wait()
        pid = int((await state(client, "a"))["handle"])
        os.kill(pid, signal.SIGKILL)
        detected_after = await wait_for_state(client, "a", "failed", timeout=3)
        assert detected_after < 1.0, f"crash noticed after {detected_after:.2f}s"
        await asyncio.wait_for(streaming, 5)
        last = json.loads(events[-1])
        assert "error" in last and "crash" in last["error"]["message"]
        failed = await state(client, "a")
        assert "killed (SIGKILL)" in failed["error"]

        response = await client.post("/v1/chat/completions", json={"model": "a", **CHAT})
        assert response.status_code == 200
        again = await state(client, "a")
        assert again["state"] == "ready" and int(again["handle"]) != pid


async def test_real_embeddings_restart_a_chat_model_with_embeddings(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    async with running_app(real_config(tmp_path, models)) as running:
        client = running.client
        assert (await client.post("/v1/chat/completions", json={"model": "a", **CHAT})).status_code == 200
        response = await client.post("/v1/embeddings", json={"model": "a", "input": ["hello world", "sky"]})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert len(data) == 2 and len(data[0]["embedding"]) == 64
        status = await state(client, "a")
        assert status["embeddings"] is True and status["starts"] == 2
        assert (await client.post("/v1/chat/completions", json={"model": "a", **CHAT})).status_code == 200
        assert (await state(client, "a"))["starts"] == 2, "chat works on the embeddings backend: no restart"


async def test_real_native_passthrough_and_logs(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    async with running_app(real_config(tmp_path, models)) as running:
        client = running.client
        props = await client.get("/llama/a/props")
        assert props.status_code == 200 and props.json()["total_slots"] == 2
        tokens = await client.post("/llama/a/tokenize", json={"content": "hello world"})
        assert tokens.status_code == 200 and tokens.json()["tokens"]
        deadline = time.monotonic() + 3
        while True:  # the log file is tailed every 0.2 s
            logs = (await client.get("/control/v1/models/a/logs?tail=500")).json()["lines"]
            if any("listening" in line for line in logs) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert any("listening" in line for line in logs), logs[-5:]

        lines: list[str] = []

        async def follow() -> None:
            async with client.stream("GET", "/control/v1/models/a/logs?follow=1&tail=0") as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                # llama-server logs each completion (slot lines): that must arrive on the stream.
                await client.post("/llama/a/completion", json={"prompt": "again", "n_predict": 2})
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        lines.append(json.loads(line[6:]))
                        return

        await asyncio.wait_for(follow(), 10)
        assert lines and isinstance(lines[0], str)


async def test_real_bad_requests_are_clear_4xx(tmp_path: Path, tiny_models: Models) -> None:
    models = tiny_models("a")
    discovered = tmp_path / "discovered"
    discovered.mkdir()
    (discovered / "fake-model.gguf").write_bytes(b"this is not gguf")
    async with running_app(real_config(tmp_path, models)) as running:
        client = running.client
        cases = [
            ({"model": "fake-model", **CHAT}, 400, "not a GGUF file"),
            ({"model": "nope", **CHAT}, 404, "model 'nope' not found"),
            ({"model": "a/../../b", **CHAT}, 400, "invalid model name"),
        ]
        for body, status, text in cases:
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == status and text in response.json()["error"]["message"]
        response = await client.post(
            "/v1/chat/completions", content=b'{"model": "a", ', headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400 and "invalid JSON" in response.json()["error"]["message"]
        assert (await client.get("/healthz")).status_code == 200


async def test_real_broken_gguf_fails_to_load_with_the_reason(
    tmp_path: Path, tiny_models: Models, tiny_model: Path
) -> None:
    models = tiny_models("a")
    broken = tmp_path / "models" / "cut.gguf"
    broken.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])  # header fine, tensors cut
    models["cut"] = {"path": str(broken)}
    async with running_app(real_config(tmp_path, models)) as running:
        response = await running.client.post("/v1/chat/completions", json={"model": "cut", **CHAT})
        assert response.status_code == 502
        message = response.json()["error"]["message"]
        assert message.startswith("model 'cut' failed to load: llama-server exited with code 1: ")
        assert "error" in message.partition("code 1: ")[2]
        assert (await state(running.client, "cut"))["state"] == "failed"
        assert (await running.client.post("/v1/chat/completions", json={"model": "a", **CHAT})).status_code == 200


async def test_real_client_disconnect_cancels_the_generation(tmp_path: Path, long_tiny_model: Path) -> None:
    # 32k tokens of context: uncancelled, this generation would keep the slot busy for many seconds.
    models = {"a": {"path": str(long_tiny_model), "ctx_size": 32768, "max_concurrent": 1}}
    async with running_app(real_config(tmp_path, models)) as running:
        client = running.client
        long_request = {"model": "a", "prompt": "hi", "max_tokens": 200000, "ignore_eos": True, "stream": True}
        tokens = 0
        async with httpx.AsyncClient(base_url=running.url, timeout=30, headers=bearer(running.token)) as leaving:
            async with leaving.stream("POST", "/v1/completions", json=long_request) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        tokens += 1
                        break  # leave after the first token: the connection closes with this block
        assert tokens == 1, "the generation had started"
        backend = (await state(client, "a"))["backend_url"]  # asked directly: the gateway would queue it
        deadline = time.monotonic() + 3
        while True:
            slots = (
                await client.get(f"{backend}/slots", headers=backend_headers(tmp_path / "data", "a:latest"))
            ).json()
            busy = [s for s in slots if s["is_processing"]]
            in_flight = (await state(client, "a"))["in_flight"]
            if (not busy and in_flight == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert busy == [], "llama-server still generates for a client that left"
        assert in_flight == 0
