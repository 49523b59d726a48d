"""The app's own listener (uvicorn + httptools, as `serve` runs it), over real sockets: request heads are bounded,
since other pods and local users reach this port without the edge's limits in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.runtime.fake import FakeRuntime
from controller.runtime.process import free_port
from tests.support.harness import fake_config
from tests.support.server import RunningApp, running_app

LIMIT = 16 * 1024


@pytest.fixture
async def served(tmp_path: Path, tiny_model: Path) -> AsyncIterator[RunningApp]:
    server = {"data_dir": str(tmp_path / "data"), "listen": f"127.0.0.1:{free_port()}", "max_header_bytes": LIMIT}
    config = fake_config(tmp_path, tiny_model, {"a": {}}, server=server)
    runtime = FakeRuntime()
    async with running_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "x") as running:
        yield running


async def exchange(running: RunningApp, pieces: list[bytes]) -> bytes:
    """Send ``pieces`` on one connection (the server may hang up half-way) and read until it closes."""
    host, _, port = running.url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def read_all() -> bytes:
        chunks: list[bytes] = []
        with contextlib.suppress(ConnectionError):  # a reset after the answer: what came before it counts
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    answer = asyncio.ensure_future(read_all())
    with contextlib.suppress(ConnectionError):
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
    try:
        return await asyncio.wait_for(answer, 30)
    finally:
        writer.close()


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_listener_refuses_a_header_larger_than_the_limit(served: RunningApp) -> None:
    head = b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Filler: "
    filler = [b"a" * 4096] * 256  # 1 MiB of one header (100 MiB were once accepted)
    answer = await exchange(served, [head, *filler, b"\r\nConnection: close\r\n\r\n"])
    status, body = status_and_body(answer)
    assert status == 431
    assert json.loads(body) == {"error": f"request headers are larger than the limit of {LIMIT} bytes"}


async def test_listener_refuses_many_small_headers_and_a_long_url(served: RunningApp) -> None:
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(400))
    answer = await exchange(served, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n", many, b"Connection: close\r\n\r\n"])
    assert status_and_body(answer)[0] == 431
    long_url = b"GET /v1/models?" + b"q" * (4 * LIMIT) + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, body = status_and_body(await exchange(served, [long_url]))
    assert status == 431 and json.loads(body)["error"]["type"] == "invalid_request_error"  # OpenAI's dialect


async def test_listener_heads_under_the_limit_and_bodies_over_it_are_served(served: RunningApp) -> None:
    cookie = b"Cookie: c=" + b"x" * (LIMIT // 2) + b"\r\n"
    body = json.dumps({"model": "a", "prompt": "p" * (4 * LIMIT), "stream": False}).encode()
    post = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + cookie + b"Connection: close\r\n\r\n"
    # Keep-alive: the second request's head is counted from the end of the first request, not its start.
    answer = await exchange(served, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n", post, second])
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert len(statuses) == 3 and statuses[0] == 200 and statuses[2] == 200
    assert statuses[1] not in (400, 431)  # its body is four times the head limit: bodies are not heads


async def test_listener_a_client_that_abandons_its_upload_is_a_499_not_an_error(
    served: RunningApp, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut-off body once let CancelledError escape the gateway: an ERROR with a 24-line traceback per request."""
    caplog.set_level(logging.INFO)
    host, _, port = served.url.removeprefix("http://").rpartition(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    writer.write(b'{"model": "a')
    await writer.drain()
    await asyncio.sleep(0.2)  # the gateway is reading the body
    writer.close()
    for _ in range(200):
        if any(" status=499 " in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(
        r.getMessage().startswith("POST /api/chat ") and " status=499 " in r.getMessage() for r in caplog.records
    )
