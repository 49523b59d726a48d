"""Server-sent events from a queue, with a heartbeat comment so idle proxies keep the stream open."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from quart import Response

HEARTBEAT_SECONDS = 15.0
PING = object()  # what heartbeat() yields when it is time for a keep-alive comment


async def heartbeat(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    """Each item of ``queue`` as it comes, and ``PING`` when nothing came for HEARTBEAT_SECONDS."""
    while True:
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):
                item = await queue.get()
        except TimeoutError:
            yield PING
            continue
        yield item


async def sse_stream(queue: asyncio.Queue[Any], encode: Callable[[Any], str] = json.dumps) -> AsyncIterator[bytes]:
    """Yield ``data:`` events for each queue item, and ``: ping`` when nothing happened for a while."""
    async for item in heartbeat(queue):
        yield b": ping\n\n" if item is PING else f"data: {encode(item)}\n\n".encode()


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(stream: AsyncIterator[bytes]) -> Response:
    """A streamed event response: no buffering by proxies, no time limit."""
    response = Response(stream, headers=SSE_HEADERS)
    response.timeout = None
    return response
