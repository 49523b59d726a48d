"""Serve the app: uvicorn with httptools and uvloop, on a socket bound before start-up.

uvicorn rather than Hypercorn: measured side by side on these machines, the same raw-ASGI gateway added
0.7 ms (p50) over direct llama-server under uvicorn + httptools and 1.0 ms under Hypercorn (h11), see
docs/architecture.md. Binding first means a port already in use is reported before anything starts. Request
heads are bounded (``server.max_header_bytes``): the app's port is reachable without the edge in front of it
(other pods, local users), so it cannot rely on Caddy's limits.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from quart import Quart
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from common.address import Address
from common.asgi import ASGIApp, compact_json
from common.dialects import error_body
from controller.config import Config
from controller.services import services_of


def bind(listen: str) -> socket.socket:
    """A listening TCP socket for ``host:port`` (IPv6 hosts may be bracketed); raises OSError."""
    where = Address.parse(listen)
    family, kind, proto, _, address = socket.getaddrinfo(where.host, where.port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)  # a backend must never hold the controller's port
    return sock


class _BoundedHead(HttpToolsProtocol):
    """httptools with a bound on a request's head (request line and headers), which httptools itself lacks:
    it buffers a header until its end, so a client could grow the server by sending one that never ends
    (uvicorn's h11_max_incomplete_event_size is for h11 only).

    Bytes are counted from the end of one request to the end of the next one's headers; a head that would pass
    ``max_head`` bytes is answered 431 (in the dialect of its path) before the parser sees more of it, and the
    connection is closed. The body is never counted (it has its own limit, server.max_body_bytes). The usual
    read costs one addition and one comparison; only a read that would cross the limit is searched for the
    head's end."""

    max_head = 64 * 2**10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: int | None = 0  # bytes of the request head read so far; None while in a body
        self._begun = False  # the parser has seen the start of the current request

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            size = len(data)
            if self._head + size > self.max_head:
                end = data.find(b"\r\n\r\n")  # the head may end in this read, the body follow
                size = size if end < 0 else end + 4
                if self._head + size > self.max_head:
                    self._refuse(data)
                    return
            self._head += size
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._begun = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head, self._begun = 0, False
        super().on_message_complete()

    def _refuse(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # never in the middle of an answer
            if self._begun:
                url: bytes = self.url
            else:  # the request line is in this read, not parsed yet
                line = data.lstrip(b"\r\n").partition(b"\r\n")[0].split(b" ")
                url = line[1] if len(line) > 1 else b"/"
            path = url.partition(b"?")[0].decode("latin-1") or "/"
            message = f"request headers are larger than the limit of {self.max_head} bytes"
            body = compact_json(error_body(path, 431, message, "request_header_fields_too_large"))
            head = (
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            )
            self.transport.write(head + body)
        self.transport.close()


def bounded_httptools(max_head: int) -> type[asyncio.Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``: httptools with request heads bounded."""
    return type("BoundedHttpTools", (_BoundedHead,), {"max_head": max_head})


# After the app asked to end (the lead lost), how long past the graceful shutdown's own bound the process may
# take before it is ended on the spot: its backends are the next leader's, nothing here must hold it.
ENDING_BACKSTOP = 15.0


class _Server(uvicorn.Server):
    """uvicorn, which ends the app's event streams when it begins to shut down: it waits for open answers before
    it stops the app, and an event stream never ends by itself. The app may ask it to end (``Ending``): a graceful
    shutdown, with the process ended outright if that outlasts its bound."""

    def __init__(self, config: uvicorn.Config, end_streams: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.end_streams = end_streams
        self._backstop: asyncio.TimerHandle | None = None

    def end(self, code: int) -> None:
        self.should_exit = True
        if self._backstop is None:
            bound = (self.config.timeout_graceful_shutdown or 0) + ENDING_BACKSTOP
            self._backstop = asyncio.get_running_loop().call_later(bound, os._exit, code)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.end_streams is not None:
            self.end_streams()
        await super().shutdown(sockets)
        if self._backstop is not None:  # ended in time
            self._backstop.cancel()


def uvicorn_server(
    app: Quart | ASGIApp, config: Config, end_streams: Callable[[], None] | None = None
) -> uvicorn.Server:
    """uvicorn for the controller's app (a Quart app, whose event streams end at shutdown) or a gateway process's
    (``end_streams``: what ends the streams it relays)."""
    settings = uvicorn.Config(
        app,
        loop="uvloop",
        http=bounded_httptools(config.server.max_header_bytes),
        lifespan="on",
        access_log=False,  # proxy/access.py writes its own line per request, with the model
        log_config=None,  # keep the application's logging set-up
        timeout_keep_alive=75,
        # The grace for answers still running at shutdown. Whole seconds (uvicorn's type), rounded up: 0 is "now",
        # as stop_timeout 0 is everywhere else, never "no limit" (that was 0.5 truncated, and a stream open
        # through a SIGTERM then kept the process forever).
        timeout_graceful_shutdown=math.ceil(config.runtime.stop_timeout),
        server_header=False,
        # Not uvicorn's proxy_headers (a rewrite of every request's scope): the client's address behind the edge
        # is read only where it is used (common/peers.py).
        proxy_headers=False,
    )
    if isinstance(app, Quart):
        services = services_of(app)
        server = _Server(settings, services.streams.close)
        services.ending.stop = server.end
        return server
    return _Server(settings, end_streams)
