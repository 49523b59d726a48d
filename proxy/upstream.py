"""A small HTTP/1.1 client for the backends, and the boundary where its failures become ours.

Why not aiohttp or httpx: on these machines aiohttp added ~1 ms per request over a plain asyncio stream
talking to the same llama-server (2.5 vs 1.6 ms for a one-token completion), and httpx ~3 ms more; the
gateway's budget is 1 ms in all. The peer is always llama-server on a private address, so the client
needs only what it speaks: keep-alive, Content-Length and chunked bodies, one write per request.

Connections are pooled per backend. A connection is reused only after its response was read to the end;
llama-server closes the connection after every streamed (chunked SSE) response, so those are not pooled.
A pooled connection that the backend closed while idle fails before any answer: that request is sent once
more on a fresh connection (llama-server never saw it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from controller.errors import UpstreamError

_IDLE_SECONDS = 3.0  # llama-server drops idle keep-alive connections after 5 s: give them up first
_CONNECT_TIMEOUT = 10.0
_HEAD_LIMIT = 64 * 1024
_READ_CHUNK = 64 * 1024

Address = tuple[str, int]


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()
        self.reused = False

    def usable(self) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < _IDLE_SECONDS
        )

    def close(self) -> None:
        self.writer.close()


class UpstreamResponse:
    """Status, headers and a body to read once: ``read()`` or ``iter_chunks()``."""

    def __init__(self, connection: _Connection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._connection = connection
        self.status = status
        self.raw_headers = headers
        self.headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}
        self.complete = False
        self._length = int(self.headers["content-length"]) if "content-length" in self.headers else None
        self.content_length = self._length
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        self.keep_alive = (
            self.headers.get("connection", "").lower() != "close"
            and (self._length is not None or self._chunked)
            # llama-server closes the connection after a stream: never hand such a connection out again
            and not self.headers.get("content-type", "").startswith("text/event-stream")
        )

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (each chunk at once: no buffering of a stream)."""
        reader = self._connection.reader
        if self._length is not None:
            remaining = self._length
            while remaining > 0:
                data = await reader.read(min(remaining, _READ_CHUNK))
                if not data:
                    raise asyncio.IncompleteReadError(b"", remaining)
                remaining -= len(data)
                yield data
        elif self._chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the final CRLF
                        pass
                    break
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        else:
            while data := await reader.read(_READ_CHUNK):
                yield data
        self.complete = True

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])


def _parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise UpstreamError("the model's backend sent an invalid HTTP answer")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers.append((name.strip(), value.strip()))
    return int(parts[1]), headers


class Upstream:
    def __init__(self) -> None:
        self._pools: dict[Address, list[_Connection]] = {}

    async def _connect(self, address: Address) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*address, limit=_HEAD_LIMIT), _CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError("the model's backend refused the connection (it may have just stopped)") from exc
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    async def _acquire(self, address: Address) -> _Connection:
        pool = self._pools.get(address)
        while pool:
            connection = pool.pop()
            if connection.usable():
                connection.reused = True
                return connection
            connection.close()
        return await self._connect(address)

    def _release(self, address: Address, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._pools.setdefault(address, []).append(connection)

    async def _exchange(self, connection: _Connection, request: bytes) -> UpstreamResponse:
        connection.writer.write(request)
        await connection.writer.drain()
        head = await connection.reader.readuntil(b"\r\n\r\n")
        status, headers = _parse_head(head[:-4])
        return UpstreamResponse(connection, status, headers)

    @asynccontextmanager
    async def request(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[UpstreamResponse]:
        """Send one request and yield the response; any transport failure raises UpstreamError."""
        parts = urlsplit(url)
        address = (parts.hostname or "127.0.0.1", parts.port or 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        payload = body or b""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {address[0]}:{address[1]}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if payload or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(payload)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload

        connection = await self._acquire(address)
        try:
            try:
                response = await self._exchange(connection, request)
            except (OSError, asyncio.IncompleteReadError):
                if not connection.reused:
                    raise
                connection.close()  # closed by the backend while idle: it never saw this request
                connection = await self._connect(address)
                response = await self._exchange(connection, request)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            connection.close()
            raise UpstreamError(_describe(exc)) from exc
        except BaseException:
            connection.close()
            raise
        try:
            yield response
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise UpstreamError(_describe(exc)) from exc
        finally:
            # A body read to its end leaves a clean connection; anything else (cancelled because the
            # client left, failed mid-body) is closed, which also tells llama-server to stop generating.
            if response.complete and response.keep_alive:
                self._release(address, connection)
            else:
                connection.close()

    async def close(self) -> None:
        for pool in self._pools.values():
            for connection in pool:
                connection.close()
                with contextlib.suppress(OSError):
                    await connection.writer.wait_closed()
        self._pools.clear()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionResetError | BrokenPipeError):
        return "the model's backend closed the connection (it may have crashed)"
    if isinstance(exc, asyncio.LimitOverrunError):
        return "the model's backend sent an oversized HTTP header"
    if isinstance(exc, ValueError):
        return "the model's backend sent an invalid HTTP answer"
    return f"the model's backend failed: {exc.__class__.__name__}"
