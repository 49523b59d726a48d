"""The gateway: a raw ASGI router in front of the controller's Quart app.

The Ollama surface (``/`` and ``/api/*``), OpenAI's ``/v1/*`` and the native ``/llama/*`` are answered here
without a framework; every other request goes to ``fallback`` (the Quart app: control API, health, UI).
Errors leave in the caller's dialect. The access log and the per-request metrics are ``proxy.access``'s, the
layer outside authentication, so that refusals are logged too.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from common import notes
from common.asgi import ASGIApp, Receive, Scope, Send, send_json
from common.dialects import describe, error_body
from common.directory import ModelDirectory
from common.errors import ClientGone, MethodNotAllowed, NotFound
from common.logsafe import loggable
from common.upstream import Upstream
from proxy.access import ROUTE_KEY, access_log
from proxy.native import PREFIX as NATIVE_PREFIX
from proxy.native import NativeRoutes
from proxy.ollama.routes import OllamaRoutes, UnsupportedTools
from proxy.openai import PASSTHROUGH_PATHS, OpenAIRoutes

Handler = Callable[[Scope, Receive, Send], Awaitable[str | None]]


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    handler: Handler
    label: str = "other"  # the route's name in metrics


class Gateway:
    def __init__(
        self,
        directory: ModelDirectory,
        fallback: ASGIApp,
        max_body: int,
        upstream: Upstream | None = None,
        unsupported_tools: UnsupportedTools = "ignore",
    ) -> None:
        self.directory = directory
        self.fallback = fallback
        self.upstream = upstream or Upstream()
        self.openai = OpenAIRoutes(directory, self.upstream, max_body)
        self.native = NativeRoutes(directory, self.upstream, max_body)
        self.ollama = OllamaRoutes(directory, self.upstream, max_body, unsupported_tools)
        self.routes = self._route_table()

    def _route_table(self) -> dict[str, Route]:
        def ollama(methods: str, handler: Callable[[Scope, Receive, Send], Awaitable[Any]]) -> Route:
            return Route(frozenset(methods.split()), handler, handler.__name__)

        o = self.ollama
        table = {
            "/": ollama("GET HEAD", o.root),
            "/api/version": ollama("GET HEAD", o.version),
            "/api/tags": ollama("GET HEAD", o.tags),
            "/api/ps": ollama("GET HEAD", o.ps),
            "/api/show": ollama("POST", o.show),
            "/api/generate": ollama("POST", o.generate),
            "/api/chat": ollama("POST", o.chat),
            "/api/embed": ollama("POST", o.embed),
            "/api/embeddings": ollama("POST", o.embeddings),
        }
        for path in ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"):
            table[path] = ollama("GET HEAD POST PUT DELETE", o.management)
        for path in PASSTHROUGH_PATHS:
            table[path] = Route(frozenset({"POST"}), self.openai.passthrough, path.removeprefix("/"))
        table["/v1/models"] = Route(frozenset({"GET", "HEAD"}), self.openai.list_models, "v1/models")
        return table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        path: str = scope["path"]
        route = self.routes.get(path)
        if route is None:
            route = self._prefix_route(path)
        if route is None:
            await self.fallback(scope, receive, send)
            return
        await self._handle(scope, receive, send, route)

    def handles(self, path: str) -> bool:
        """Whether ``path`` is the gateway's (else ``fallback``'s): a gateway process sends the rest on."""
        return path in self.routes or self._prefix_route(path) is not None

    def _prefix_route(self, path: str) -> Route | None:
        if path.startswith("/v1/models/"):
            return Route(frozenset({"GET", "HEAD"}), self.openai.get_model, "v1/models")
        if path.startswith(NATIVE_PREFIX):
            methods = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
            return Route(methods, self.native.passthrough, "llama")
        if path.startswith("/api/blobs/"):
            return Route(frozenset({"GET", "HEAD", "POST"}), self.ollama.management)
        if path.startswith(("/api/", "/v1/")):
            return Route(frozenset(), self._not_found)
        return None

    @staticmethod
    async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
        raise NotFound(f"no such endpoint: {scope['path']}")

    async def _handle(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        """Run the route; an error before the answer began is answered in the caller's dialect. The access
        log line and the metrics are written by the layer outside (``proxy.access``)."""
        scope[ROUTE_KEY] = route.label
        method: str = scope["method"]
        try:
            if route.methods and method not in route.methods:
                allowed = ", ".join(sorted(route.methods))
                raise MethodNotAllowed(f"{method} is not allowed on {scope['path']}; use {allowed}")
            handler = route.handler if route.methods else self._not_found
            notes.note_asked(await handler(scope, receive, send))
        except ClientGone as exc:
            timing = notes.current.get()
            if timing is not None and not timing.status:
                timing.status = ClientGone.status  # the access log says 499, as nginx does; nothing to answer
            access_log.info("%s", exc)
        except Exception as exc:
            timing = notes.current.get()
            if timing is not None and timing.status:  # the response began: nothing more can be said in it
                access_log.warning("error after the response began: %s", loggable(exc))
            else:
                status, message, code = describe(exc)
                retry_after = getattr(exc, "retry_after", None)  # a rate limit, a controller away
                extra = [(b"retry-after", b"%d" % max(1, math.ceil(retry_after)))] if retry_after else []
                await send_json(send, status, error_body(scope["path"], status, message, code), extra)

    async def close(self) -> None:
        await self.ollama.close()
        await self.upstream.close()
