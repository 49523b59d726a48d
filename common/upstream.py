"""A small HTTP/1.1 client for the backends, and the boundary where its transport failures become ours.

Why not aiohttp or httpx: on these machines aiohttp added ~1 ms per request over a plain asyncio stream
talking to the same llama-server (2.5 vs 1.6 ms for a one-token completion), and httpx ~3 ms more; the
gateway's budget is 1 ms in all. The peer is always llama-server on a private address, so the client
needs only what it speaks: keep-alive, Content-Length and chunked bodies, one write per request.

Rules it keeps (RFC 9112):
- Framing: no body for HEAD, 1xx, 204 and 304; ``Transfer-Encoding: chunked`` wins over Content-Length
  (and such a connection is not reused); otherwise Content-Length; otherwise the body runs to the close.
  A chunk's trailing CRLF is checked, so a confused backend can never desynchronise a pooled connection.
- Errors are mapped only around socket reads and writes (``_io``): an exception raised by the caller's
  own code while it holds the response (say, while translating NDJSON) is never reported as a backend fault.
- Retry: a request goes out once more on a fresh connection only when it was sent on a reused connection
  and either the write failed or nothing at all came back — the backend closed an idle connection, so it
  never saw the request. Once any byte of an answer was read, a failure is final.
- Timeouts: connect, write, and the time to the first byte of the answer (generous: a non-streamed
  generation sends its head only when it is done).
- Pool: per backend address, at most ``max_idle_per_host`` idle connections, each given up after
  ``idle`` seconds (llama-server drops them after 5 s), swept by a timer so the connections of backends
  that stopped (every restart gets a new port) are closed too. A connection is pooled again only after
  its answer was read to the end; llama-server closes the connection after every streamed (SSE) answer,
  so those are not pooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from common.errors import UpstreamError, UpstreamTimeout

_HEAD_LIMIT = 64 * 1024
_READ_CHUNK = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})

Address = tuple[str, int]
T = TypeVar("T")


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    write: float = 60.0
    response: float = 600.0  # to the first byte of the answer's head
    stall: float | None = 600.0  # silence in the middle of a body (a backend that hung after its head)
    idle: float = 3.0  # a pooled connection is given up after this long unused


class _NothingRead(UpstreamError):
    """The connection failed before any byte of an answer: safe to send again on a fresh connection."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionResetError | BrokenPipeError):
        return "the model's backend closed the connection (it may have crashed)"
    if isinstance(exc, asyncio.LimitOverrunError):
        return "the model's backend sent an oversized HTTP header or chunk line"
    return f"the model's backend failed: {exc.__class__.__name__}"


async def _io(operation: Awaitable[T]) -> T:
    """Await one socket operation; transport failures become UpstreamError (the one mapping point)."""
    try:
        return await operation
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise UpstreamError(_describe(exc)) from exc


def _invalid(reason: str) -> UpstreamError:
    return UpstreamError(f"the model's backend sent an invalid HTTP answer ({reason})")


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()
        self.reused = False

    def usable(self, idle: float) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing() and time.monotonic() - self.idle_since < idle

    def close(self) -> None:
        self.writer.close()


def _parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise _invalid("bad status line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise _invalid("bad header line")
        headers.append((name, value.strip()))
    return int(parts[1]), headers


class _StallWatch:
    """Ends an answer whose backend went silent: while a read waits, a timer checks every quarter of
    ``seconds`` whether a byte arrived; after ``seconds`` without one it cancels the reading task (which
    ``iter_chunks`` turns into UpstreamTimeout). One timer per answer: an asyncio.timeout around every
    read cost about 10 µs per streamed chunk (measured with py-spy), this costs two attribute writes."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.reading = False
        self.reads = 0
        self.fired = False
        self._handle: asyncio.TimerHandle | None = None
        if seconds is not None:
            self._task = asyncio.current_task()
            self._loop = asyncio.get_running_loop()
            self._seen, self._since = -1, self._loop.time()
            self._handle = self._loop.call_later(seconds / 4, self._tick)

    async def read(self, operation: Awaitable[T]) -> T:
        self.reading = True
        try:
            return await _io(operation)
        finally:
            self.reading = False
            self.reads += 1

    def _tick(self) -> None:
        assert self.seconds is not None
        now = self._loop.time()
        if not self.reading or self.reads != self._seen:
            self._seen, self._since = self.reads, now
        elif now - self._since >= self.seconds and self._task is not None:
            self.fired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_later(self.seconds / 4, self._tick)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class UpstreamResponse:
    """Status, headers and a body to read once: ``read()`` or ``iter_chunks()``."""

    def __init__(
        self,
        connection: _Connection,
        status: int,
        headers: list[tuple[bytes, bytes]],
        method: str,
        stall: float | None = None,
    ) -> None:
        self._reader = connection.reader
        self._stall = stall
        self.status = status
        self.raw_headers = headers
        self.headers: dict[str, str] = {}
        for name, value in headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        self.complete = False
        encodings = [e.strip().lower() for e in self.headers.get("transfer-encoding", "").split(",") if e.strip()]
        self._chunked = bool(encodings) and encodings[-1] == "chunked"
        self._length: int | None = None
        if method == "HEAD" or 100 <= status < 200 or status in _NO_BODY_STATUSES:
            self._length = 0
        elif not encodings and "content-length" in self.headers:
            values = {v.strip() for v in self.headers["content-length"].split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise _invalid("bad Content-Length")
            self._length = int(values.pop())
        self.content_length = self._length
        self.keep_alive = (
            self.headers.get("connection", "").lower() != "close"
            and (self._length is not None or self._chunked)
            # both framings at once is a smuggling pattern: answer this one, never reuse the connection
            and not (encodings and "content-length" in self.headers)
            # llama-server closes the connection after a stream: never hand such a connection out again
            and not self.headers.get("content-type", "").startswith("text/event-stream")
        )

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (each chunk at once: no buffering of a stream). A backend silent for
        ``stall`` seconds while a read waits ends it with UpstreamTimeout; a slow client never counts."""
        watch = _StallWatch(self._stall)
        try:
            async for piece in self._pieces(watch):
                yield piece
        except asyncio.CancelledError:
            if not watch.fired:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # our own cancellation, turned into the error below
            raise UpstreamTimeout(
                f"the model's backend did not send more of its answer within {self._stall:g}s"
            ) from None
        finally:
            watch.close()

    async def _pieces(self, watch: _StallWatch) -> AsyncIterator[bytes]:
        reader, read = self._reader, watch.read
        if self._length is not None:
            remaining = self._length
            while remaining > 0:
                data = await read(reader.read(min(remaining, _READ_CHUNK)))
                if not data:
                    raise UpstreamError(_describe(asyncio.IncompleteReadError(b"", remaining)))
                remaining -= len(data)
                yield data
        elif self._chunked:
            while True:
                size = self._chunk_size(await read(reader.readuntil(b"\r\n")))
                if size == 0:
                    while (await read(reader.readuntil(b"\r\n"))) != b"\r\n":  # trailers, then the final CRLF
                        pass
                    break
                data = await read(reader.readexactly(size + 2))
                if data[-2:] != b"\r\n":
                    raise _invalid("chunk not followed by CRLF")
                yield data[:-2]
        else:
            while data := await read(reader.read(_READ_CHUNK)):
                yield data
        self.complete = True

    @staticmethod
    def _chunk_size(line: bytes) -> int:
        digits = line[:-2].split(b";", 1)[0].strip()
        if not digits or len(digits) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in digits):
            raise _invalid("bad chunk size")
        return int(digits, 16)

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunks()])


def bearer(api_key: str) -> dict[str, str]:
    """The ``Authorization`` header for a backend's own API key (none for a backend started without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _request_bytes(
    method: str, target: bytes, address: Address, body: bytes, headers: Mapping[str, str] | None
) -> bytes:
    if not target.startswith(b"/") or any(c <= 0x20 or c == 0x7F for c in target):
        raise UpstreamError("refusing to send a request target with spaces or control characters")
    lines = [method.encode("ascii") + b" " + target + b" HTTP/1.1", f"Host: {address[0]}:{address[1]}".encode()]
    for name, value in (headers or {}).items():
        if any(c in name + value for c in "\r\n\0"):
            raise UpstreamError(f"refusing to send header {name!r}: it contains a line break")
        lines.append(f"{name}: {value}".encode("latin-1", "replace"))
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Upstream:
    def __init__(self, timeouts: Timeouts = Timeouts(), max_idle_per_host: int = 16) -> None:
        self.timeouts = timeouts
        self.max_idle_per_host = max_idle_per_host
        self._pools: dict[Address, list[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def idle_connections(self) -> int:
        return sum(len(pool) for pool in self._pools.values())

    async def _connect(self, address: Address) -> _Connection:
        try:
            async with asyncio.timeout(self.timeouts.connect):
                reader, writer = await asyncio.open_connection(*address, limit=_HEAD_LIMIT)
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
            if connection.usable(self.timeouts.idle):
                connection.reused = True
                return connection
            connection.close()
        return await self._connect(address)

    def _release(self, address: Address, connection: _Connection) -> None:
        pool = self._pools.setdefault(address, [])
        if len(pool) >= self.max_idle_per_host:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        pool.append(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.timeouts.idle, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for too long, whatever their backend (it may be gone for good)."""
        self._sweeper = None
        for address, pool in list(self._pools.items()):
            keep = [c for c in pool if c.usable(self.timeouts.idle)]
            for connection in pool:
                if connection not in keep:
                    connection.close()
            if keep:
                self._pools[address] = keep
            else:
                del self._pools[address]
        if self._pools:
            self._sweeper = asyncio.get_running_loop().call_later(self.timeouts.idle, self._sweep)

    async def _exchange(self, connection: _Connection, request: bytes, method: str) -> UpstreamResponse:
        try:
            connection.writer.write(request)
            async with asyncio.timeout(self.timeouts.write):
                await connection.writer.drain()
        except TimeoutError as exc:
            what = f"take the request within {self.timeouts.write:g}s"
            raise UpstreamTimeout(f"the model's backend did not {what}") from exc
        except OSError as exc:
            raise _NothingRead(_describe(exc)) from exc  # an incomplete request is never processed
        reader = connection.reader
        while True:
            try:
                async with asyncio.timeout(self.timeouts.response):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _NothingRead(_describe(exc)) from exc
                raise UpstreamError(_describe(exc)) from exc
            except ConnectionResetError as exc:
                raise _NothingRead(_describe(exc)) from exc
            except TimeoutError as exc:
                what = f"answer within {self.timeouts.response:g}s"
                raise UpstreamTimeout(f"the model's backend did not {what}") from exc
            except (OSError, asyncio.LimitOverrunError) as exc:
                raise UpstreamError(_describe(exc)) from exc
            status, headers = _parse_head(head[:-4])
            if not 100 <= status < 200 or status == 101:
                return UpstreamResponse(connection, status, headers, method, self.timeouts.stall)
            # an informational answer (100 Continue): the real one follows

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str] | None = None,
        *,
        target: bytes | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """Send one request and yield the response. ``target`` (raw path and query, as received) replaces
        the path of ``url``. Transport failures raise UpstreamError; the caller's own do not."""
        parts = urlsplit(url)
        address = (parts.hostname or "127.0.0.1", parts.port or 80)
        if target is None:
            target = ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode("latin-1")
        request = _request_bytes(method, target, address, body or b"", headers)

        connection = await self._acquire(address)
        try:
            try:
                response = await self._exchange(connection, request, method)
            except _NothingRead:
                if not connection.reused:
                    raise
                connection.close()  # closed by the backend while idle: it never saw this request
                connection = await self._connect(address)
                response = await self._exchange(connection, request, method)
        except _NothingRead as exc:
            connection.close()
            raise UpstreamError(exc.message) from exc
        except BaseException:
            connection.close()
            raise
        try:
            yield response
        finally:
            # A body read to its end leaves a clean connection; anything else (cancelled because the
            # client left, failed mid-body) is closed, which also tells llama-server to stop generating.
            if response.complete and response.keep_alive:
                self._release(address, connection)
            else:
                connection.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            for connection in pool:
                connection.close()
                with contextlib.suppress(OSError):
                    await connection.writer.wait_closed()
        self._pools.clear()
