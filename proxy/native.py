"""``/llama/<model>/<path>``: llama-server's own API for one model, passed through as is."""

from __future__ import annotations

from controller.errors import NotFound
from proxy.asgi import Receive, Scope, Send, header, read_body, run_until_disconnect
from proxy.directory import ModelDirectory, Restricted
from proxy.forward import forward
from proxy.upstream import Upstream

PREFIX = "/llama/"


def split_native_path(path: str) -> tuple[str, str]:
    """``/llama/gemma3:270m/v1/models`` → (``gemma3:270m``, ``/v1/models``)."""
    rest = path[len(PREFIX) :]
    name, slash, tail = rest.partition("/")
    if not name:
        raise NotFound("use /llama/<model>/<llama-server path>, e.g. /llama/gemma3:270m/health")
    return name, slash + tail if slash else "/"


class NativeRoutes:
    def __init__(self, directory: ModelDirectory, upstream: Upstream, max_body: int) -> None:
        self._directory = directory
        self._upstream = upstream
        self._max_body = max_body

    async def passthrough(self, scope: Scope, receive: Receive, send: Send) -> str:
        name, tail = split_native_path(scope["path"])
        body = await read_body(scope, receive, self._max_body)
        query = scope.get("query_string", b"")
        target = tail + ("?" + query.decode("latin-1") if query else "")
        content_type = (header(scope, b"content-type") or b"application/json").decode("latin-1")
        method: str = scope["method"]

        async def work() -> None:
            async with Restricted.for_scope(self._directory, scope).lease(name) as lease:
                await forward(self._upstream, send, method, lease.url + target, body or None, content_type)

        await run_until_disconnect(receive, work())
        return name
