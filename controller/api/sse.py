"""Server-sent events from a queue, with a heartbeat comment so idle proxies keep the stream open.

A stream lasts as long as its client wants, far longer than the credentials it was opened with may: at every
heartbeat (at least every HEARTBEAT_SECONDS, busy or idle) the caller is asked about again, and the stream
ends once the token is revoked or expired, the session signed out, the account disabled, or the permission or
model taken away. Every stream also ends when the server begins to shut down: a stream never ends by itself,
and the server waits for open answers before it stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from quart import Response

from common.errors import AuthError, Unavailable
from controller.auth.authenticate import Authenticator
from controller.auth.identity import Identity
from controller.services import services

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0
PING = object()  # what heartbeat() yields when it is time for a keep-alive comment


class EventStreams:
    """The app's open event streams, ended together by ``close()`` (at the start of the server's shutdown)."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()

    def close(self) -> None:
        self.closing.set()


class StreamAccess:
    """Who a stream is for, asked about again at every heartbeat. Made in the request's handler (it reads the
    app's services); ``identity`` follows the caller's current scopes and allow-lists."""

    def __init__(self, identity: Identity, scope: str | None = None, model: str | None = None) -> None:
        self.identity = identity
        self._scope = scope
        self._model = model
        self._service: Authenticator = services().auth
        streams: EventStreams = services().streams
        self.closing = streams.closing

    async def holds(self) -> bool:
        try:
            identity = await self._service.revalidate(self.identity)
        except (AuthError, Unavailable) as exc:  # Unavailable: the store cannot say (Redis down): end, the
            # client's reconnection is asked about like any new request
            log.info("an event stream of %s ended: %s", self.identity.subject, exc.message)
            return False
        if self._scope is not None and not identity.has(self._scope):
            log.info("an event stream of %s ended: the '%s' permission was taken away", identity.subject, self._scope)
            return False
        if self._model is not None and not identity.allows_model(self._model):
            log.info("an event stream of %s ended: model '%s' was taken away", identity.subject, self._model)
            return False
        self.identity = identity
        return True


async def heartbeat(queue: asyncio.Queue[Any], access: StreamAccess) -> AsyncIterator[Any]:
    """Each item of ``queue`` as it comes, and ``PING`` at least every HEARTBEAT_SECONDS once ``access`` still
    holds; ends when it no longer does or when the server shuts down."""
    loop = asyncio.get_running_loop()
    closing = asyncio.ensure_future(access.closing.wait())
    getting: asyncio.Future[Any] | None = None
    try:
        due = loop.time() + HEARTBEAT_SECONDS
        while not closing.done():
            if loop.time() >= due:
                if not await access.holds():
                    return
                yield PING
                due = loop.time() + HEARTBEAT_SECONDS
            elif not queue.empty():  # a busy stream makes no task per item
                yield queue.get_nowait()
            else:
                getting = getting or asyncio.ensure_future(queue.get())  # one that timed out still waits
                await asyncio.wait((getting, closing), timeout=due - loop.time(), return_when=asyncio.FIRST_COMPLETED)
                if getting.done():
                    item, getting = getting.result(), None
                    yield item
    finally:  # a cancelled get leaves its item in the queue
        for waiting in (getting, closing):
            if waiting is not None:
                waiting.cancel()


async def sse_stream(
    queue: asyncio.Queue[Any], access: StreamAccess, encode: Callable[[Any], str] = json.dumps
) -> AsyncIterator[bytes]:
    """Yield ``data:`` events for each queue item, and ``: ping`` when nothing happened for a while."""
    async for item in heartbeat(queue, access):
        yield b": ping\n\n" if item is PING else f"data: {encode(item)}\n\n".encode()


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_response(stream: AsyncIterator[bytes]) -> Response:
    """A streamed event response: no buffering by proxies, no time limit."""
    response = Response(stream, headers=SSE_HEADERS)
    response.timeout = None
    return response
