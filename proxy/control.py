"""What a gateway process does with the requests that are not its own (the web page, the control API, health,
metrics): it passes them to the controller and streams the answer back, so one listener serves everything.

The client's credentials pass untouched: the controller authenticates these requests itself (the gateway does not,
or a token's requests per minute would be counted twice). ``X-Forwarded-For`` is replaced by the client's address
as this gateway worked it out (``common.peers``), which the controller believes from a trusted peer: a client
cannot choose its own. The internal routes are refused here, whoever asks. While no controller answers, the
answer is 503 with Retry-After, in the caller's dialect.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from common.asgi import Receive, Scope, Send, run_until_disconnect, send_json
from common.dialects import error_body
from common.errors import PayloadTooLarge, UpstreamError
from common.peers import TrustedProxies
from common.upstream import Timeouts, Upstream, UpstreamResponse
from common.wire import INTERNAL_PREFIX

# Not passed on: they describe this hop's connection, or are this hop's to set.
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
        b"content-length",
        b"x-forwarded-for",
    }
)
# ``date``: this process's server writes its own, and a second one is a malformed answer (a singleton field).
_HOP_BACK = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"trailer", b"upgrade", b"date"})
RETRY_AFTER = b"5"
_SLASHES = re.compile(r"/{2,}")
# An event stream is silent between heartbeats; a page waits on a slow query: generous, but bounded.
TIMEOUTS = Timeouts(connect=2.0, write=30.0, response=300.0, stall=300.0)


def _internal(path: str) -> bool:
    """Whether ``path`` is an internal route however it is spelt: the controller's router reads ``//internal/…``
    (and ``/%2Finternal/…``, decoded) as ``/internal/…``."""
    merged = _SLASHES.sub("/", path)
    return merged.startswith(INTERNAL_PREFIX) or merged == INTERNAL_PREFIX.rstrip("/")


class ControlProxy:
    def __init__(
        self,
        controller: str,
        peers: TrustedProxies,
        max_body: int,
        before: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``before``: what runs before a request is passed on (the gateway's unreported requests reported, so
        that the controller's answer includes them: a keep_alive this client just set, say)."""
        self.controller = controller.rstrip("/")
        self.before = before
        self.peers = peers
        self.max_body = max_body
        self.client = Upstream(TIMEOUTS)
        self._ending = asyncio.Event()  # set when this process begins to stop: event streams end cleanly

    def end_streams(self) -> None:
        """The server begins to stop: end the relayed event streams (the page's, the control API's) as the
        controller itself would, cleanly, instead of cutting them when the grace runs out."""
        self._ending.set()

    async def close(self) -> None:
        await self.client.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if _internal(path) or not path.startswith("/"):  # `OPTIONS *` and the like name no resource of ours
            await send_json(send, 404, error_body(path, 404, f"no such endpoint: {path}", "not_found"))
            return
        try:
            body = await self._body(receive)
        except PayloadTooLarge as exc:
            await send_json(send, exc.status, error_body(path, exc.status, exc.message, exc.code))
            return
        if self.before is not None:
            await self.before()
        await run_until_disconnect(receive, self._relay(scope, send, body))

    async def _body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise PayloadTooLarge(f"request body is larger than the limit of {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _headers(self, scope: Scope) -> dict[str, str]:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.lower()
            if name in _HOP:
                continue
            key, value = name.decode("latin-1"), raw_value.decode("latin-1")
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        client = self.peers.client(scope)
        if client:
            headers["x-forwarded-for"] = client
        return headers

    async def _relay_events(self, answer: UpstreamResponse, send: Send) -> None:
        """An event stream, until the controller ends it or this process begins to stop."""
        chunks = answer.iter_chunks()
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            while True:
                piece = asyncio.ensure_future(anext(chunks))
                await asyncio.wait({piece, ending}, return_when=asyncio.FIRST_COMPLETED)
                if not piece.done():
                    piece.cancel()
                    return
                try:
                    chunk = piece.result()
                except StopAsyncIteration:
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            ending.cancel()  # the answer's own end closes the connection to the controller

    async def _relay(self, scope: Scope, send: Send, body: bytes) -> None:
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        started = False
        try:
            request = self.client.request(scope["method"], self.controller, body, self._headers(scope), target=target)
            async with request as answer:
                headers = [(k, v) for k, v in answer.raw_headers if k.lower() not in _HOP_BACK]
                await send({"type": "http.response.start", "status": answer.status, "headers": headers})
                started = True
                if answer.headers.get("content-type", "").startswith("text/event-stream"):
                    await self._relay_events(answer, send)
                else:
                    async for chunk in answer.iter_chunks():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamError:
            if started:
                raise  # the answer began: the connection ends, as the controller's did
            path: str = scope["path"]
            message = "the controller is not answering (it may be restarting); try again shortly"
            await send_json(
                send, 503, error_body(path, 503, message, "controller_unavailable"), [(b"retry-after", RETRY_AFTER)]
            )
