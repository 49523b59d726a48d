"""Fault injection with a scripted backend that dies mid-stream (tests/support/fault_backend.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import pytest

from tests.support.server import real_config, running_app

FAULT_BACKEND = Path(__file__).resolve().parents[1] / "support" / "fault_backend.py"


def fault_binary(tmp_path: Path, signal_at_start: str = "") -> str:
    wrapper = tmp_path / "fault-llama-server"
    env = f"FAULT_BACKEND_SIGNAL={signal_at_start} " if signal_at_start else ""
    wrapper.write_text(f'#!/bin/sh\n{env}exec "{sys.executable}" "{FAULT_BACKEND}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


async def test_fault_sigill_at_load_says_what_happened_and_what_to_do(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller")
    binary = fault_binary(tmp_path, signal_at_start="ILL")
    config = real_config(tmp_path, {"cpu": {"path": str(tiny_model)}}, llama_server={"binary": binary})
    async with running_app(config) as running:
        response = await running.client.post("/control/v1/models/cpu/load")
        assert response.status_code == 502
        error = response.json()["error"]
        assert "crashed with an illegal instruction (SIGILL)" in error
        assert "built for CPU features this machine cannot run" in error and "scripts/bootstrap.sh" in error
        state = (await running.client.get("/control/v1/models/cpu")).json()
        assert state["state"] == "failed" and "illegal instruction" in state["error"]
        ollama = await running.client.post("/api/generate", json={"model": "cpu", "prompt": "x", "stream": False})
        assert ollama.status_code == 502 and "illegal instruction" in ollama.json()["error"]
    assert "illegal instruction (SIGILL)" in caplog.text


async def test_fault_ollama_stream_ends_with_an_error_line(tmp_path: Path, tiny_model: Path) -> None:
    config = real_config(
        tmp_path, {"flaky": {"path": str(tiny_model)}}, llama_server={"binary": fault_binary(tmp_path)}
    )
    async with running_app(config) as running:
        lines = []
        body = {"model": "flaky", "messages": [{"role": "user", "content": "hi"}]}
        async with running.client.stream("POST", "/api/chat", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(json.loads(line))
        assert [line["message"]["content"] for line in lines[:-1]] == ["one", " two", " three"]
        assert set(lines[-1]) == {"error"} and "crashed" in lines[-1]["error"]
        deadline = time.monotonic() + 1  # the exit is noticed within a second (usually milliseconds)
        while (state := (await running.client.get("/control/v1/models/flaky")).json())["state"] != "failed":
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.01)
        assert "killed (SIGKILL)" in state["error"]

        non_streaming = await running.client.post("/api/chat", json={**body, "stream": False})
        assert non_streaming.status_code in (500, 502) and set(non_streaming.json()) == {"error"}


async def test_fault_openai_stream_ends_with_an_error_event(tmp_path: Path, tiny_model: Path) -> None:
    config = real_config(
        tmp_path, {"flaky": {"path": str(tiny_model)}}, llama_server={"binary": fault_binary(tmp_path)}
    )
    async with running_app(config) as running:
        events = []
        body = {"model": "flaky", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with running.client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[0]["choices"][0]["delta"]["content"] == "one"
        assert events[-1]["error"]["type"] == "server_error" and "crashed" in events[-1]["error"]["message"]


async def test_fault_queue_full_is_a_503_in_ollama_shape(tmp_path: Path, tiny_model: Path) -> None:
    config = real_config(
        tmp_path,
        {"flaky": {"path": str(tiny_model), "max_concurrent": 1, "queue_depth": 0}},
        llama_server={"binary": fault_binary(tmp_path)},
    )
    async with running_app(config) as running:
        body = {"model": "flaky", "messages": [{"role": "user", "content": "hi"}]}
        async with running.client.stream("POST", "/api/chat", json=body) as response:
            async for _ in response.aiter_lines():
                second = await running.client.post("/api/chat", json=body)
                break
        assert second.status_code == 503
        assert set(second.json()) == {"error"} and second.json()["error"].startswith("server busy")
