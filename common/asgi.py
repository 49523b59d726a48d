"""Small raw-ASGI helpers for the gateway's hot path (no framework on it: every layer costs latency)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from common.errors import ClientGone, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing (413) anything over ``limit`` before reading it all."""
    declared = header(scope, b"content-length")
    # A length of more digits than any limit has is over it (and int() refuses 4,300 digits and more).
    if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client went away before its request body was read")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_response(
    send: Send, status: int, body: bytes, content_type: bytes, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    headers: Headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# One encoder for every answer: json.dumps with any non-default argument builds a new encoder per call, which
# cost 1.4 µs of the 4.8 µs per Ollama line on the streaming path.
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact_json(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (no spaces, non-ASCII kept as is)."""
    return _COMPACT.encode(value).encode()


async def send_json(send: Send, status: int, value: Any, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = compact_json(value)
    await send_response(send, status, body, b"application/json; charset=utf-8", extra)


async def run_until_disconnect(receive: Receive, work: Awaitable[None]) -> None:
    """Run ``work``; cancel it if the client disconnects first (so the upstream generation stops too).

    Call this only after the request body has been read: then the next ``receive()`` returns only
    when the client goes away. A client that left needs no answer, so that case returns quietly.
    """
    task = asyncio.ensure_future(work)
    client_gone = False

    async def watch() -> None:
        nonlocal client_gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if client_gone and current is not None and not current.cancelling():
            return
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
