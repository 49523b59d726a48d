"""``/llama/<model>/<path>``: llama-server's own API for one model, passed through as is.

The backend gets the path and query exactly as the client sent them (``raw_path``, still percent-encoded):
decoding first would turn ``%3F`` into a query, ``%23`` into a fragment and ``%2F`` into a new path segment.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from controller.errors import NotFound
from proxy import measure
from proxy.asgi import Receive, Scope, Send, header, read_body, run_until_disconnect
from proxy.directory import ModelDirectory, Restricted
from proxy.forward import forward, passed_headers
from proxy.upstream import Upstream

PREFIX = "/llama/"
_PREFIX_BYTES = PREFIX.encode()


def _escape(raw: bytes) -> bytes:
    """Percent-encode what may not appear in a request line (non-ASCII, spaces, controls); keep the rest."""
    return b"".join(bytes([c]) if 0x20 < c < 0x7F else b"%%%02X" % c for c in raw)


def split_native_target(scope: Scope) -> tuple[str, bytes]:
    """``/llama/gemma3:270m/v1/models?x=1`` → (``gemma3:270m``, ``b"/v1/models?x=1"``), from the raw path."""
    raw: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
    rest = raw[len(_PREFIX_BYTES) :] if raw.startswith(_PREFIX_BYTES) else raw.lstrip(b"/")
    name_raw, slash, tail = rest.partition(b"/")
    name = unquote(name_raw.decode("latin-1"))
    if not name:
        raise NotFound("use /llama/<model>/<llama-server path>, e.g. /llama/gemma3:270m/health")
    target = _escape(b"/" + tail if slash else b"/")
    query: bytes = scope.get("query_string", b"")
    return name, target + (b"?" + _escape(query) if query else b"")


class NativeRoutes:
    def __init__(self, directory: ModelDirectory, upstream: Upstream, max_body: int) -> None:
        self._directory = directory
        self._upstream = upstream
        self._max_body = max_body

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> str:
        name, target = split_native_target(scope)
        measure.note_asked(name)
        body = await read_body(scope, receive, self._max_body)
        content_type = (header(scope, b"content-type") or b"application/json").decode("latin-1")
        method: str = scope["method"]
        extra = passed_headers(scope)

        async def work() -> None:
            async with Restricted.for_scope(self._directory, scope).lease(name) as lease:
                await forward(self._upstream, send, method, lease.url, body or None, content_type, extra, target=target)

        await run_until_disconnect(receive, work())
        return name
