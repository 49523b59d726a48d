"""The gateway: a raw ASGI router in front of the controller's Quart app.

The Ollama surface (``/`` and ``/api/*``), OpenAI's ``/v1/*`` and the native ``/llama/*`` are answered here
without a framework; every other request goes to ``fallback`` (the Quart app: control API, health, UI).
Errors leave in the caller's dialect. One access-log line per request: method, path, model, status, latency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from controller.errors import MethodNotAllowed, NotFound
from proxy import measure
from proxy.asgi import ASGIApp, Message, Receive, Scope, Send, send_json
from proxy.dialects import describe, error_body
from proxy.directory import ModelDirectory
from proxy.forward import REQUEST_ID_KEY, request_id
from proxy.native import PREFIX as NATIVE_PREFIX
from proxy.native import NativeRoutes
from proxy.ollama.routes import OllamaRoutes
from proxy.openai import PASSTHROUGH_PATHS, OpenAIRoutes
from proxy.upstream import Upstream

access_log = logging.getLogger("llamacontroller.access")

Handler = Callable[[Scope, Receive, Send], Awaitable[str | None]]


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    handler: Handler
    label: str = "other"  # the route's name in metrics


class _Tracking:
    """Wraps ``send`` to remember the status (for the access log and the error path), to give every answer
    its request id, to note when the answer's pieces leave (metrics), and to drop the body of HEAD responses."""

    def __init__(self, send: Send, head: bool, request_id: str, timing: measure.RequestTiming) -> None:
        self._send = send
        self._head = head
        self._request_id = request_id.encode()
        self._timing = timing
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", self._request_id)]}
        elif message["type"] == "http.response.body":
            if message.get("body"):
                timing = self._timing
                timing.bodies += 1
                if timing.first_body_at is None:
                    timing.first_body_at = time.perf_counter()
            if self._head:
                message = {"type": "http.response.body", "body": b"", "more_body": message.get("more_body", False)}
        await self._send(message)


class Gateway:
    def __init__(
        self,
        directory: ModelDirectory,
        fallback: ASGIApp,
        max_body: int,
        upstream: Upstream | None = None,
        metrics: measure.GatewayMetrics | None = None,
    ) -> None:
        self.directory = directory
        self.fallback = fallback
        self.upstream = upstream or Upstream()
        self.openai = OpenAIRoutes(directory, self.upstream, max_body)
        self.native = NativeRoutes(directory, self.upstream, max_body)
        self.ollama = OllamaRoutes(directory, self.upstream, max_body)
        self.routes = self._route_table()
        self.metrics = metrics or measure.GatewayMetrics(CollectorRegistry())

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
        timing = measure.RequestTiming(time.perf_counter())
        measure.current.set(timing)  # this request's task (and the tasks it starts) see it
        method: str = scope["method"]
        tracking = _Tracking(send, method == "HEAD", request_id(scope), timing)
        model: str | None = None
        try:
            if route.methods and method not in route.methods:
                allowed = ", ".join(sorted(route.methods))
                raise MethodNotAllowed(f"{method} is not allowed on {scope['path']}; use {allowed}")
            handler = route.handler if route.methods else self._not_found
            model = await handler(scope, receive, tracking)
        except Exception as exc:
            if tracking.status:  # the response began: nothing more can be said in it
                access_log.warning("error after the response began: %s", exc)
            else:
                status, message, code = describe(exc)
                await send_json(tracking, status, error_body(scope["path"], status, message, code))
        finally:
            ended = time.perf_counter()
            elapsed = ended - timing.started
            self.metrics.observe(route.label, timing.model, tracking.status, timing, ended)
            access_log.info(
                "%s %s model=%s status=%s %.1fms id=%s",
                method,
                scope["path"],
                model or "-",
                tracking.status or "-",
                elapsed * 1000,
                scope[REQUEST_ID_KEY],
            )

    async def close(self) -> None:
        await self.ollama.close()
        await self.upstream.close()
