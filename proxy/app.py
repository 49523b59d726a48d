"""The gateway: a raw ASGI router in front of the controller's Quart app.

Hot-path routes (``/v1/*``, ``/llama/*``) are answered here without a framework; every other request
goes to ``fallback`` (the Quart app: control API, health, UI). Errors leave in the caller's dialect.
One access-log line per request: method, path, model, status, latency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from controller.errors import MethodNotAllowed, NotFound
from proxy.asgi import ASGIApp, Message, Receive, Scope, Send, send_json
from proxy.dialects import describe, openai_error
from proxy.directory import ModelDirectory
from proxy.native import PREFIX as NATIVE_PREFIX
from proxy.native import NativeRoutes
from proxy.openai import PASSTHROUGH_PATHS, OpenAIRoutes
from proxy.upstream import Upstream

access_log = logging.getLogger("llamacontroller.access")

Handler = Callable[[Scope, Receive, Send], Awaitable[str | None]]


class _Tracking:
    """Wraps ``send`` to remember the status and whether the response has started."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        await self._send(message)


class Gateway:
    def __init__(
        self,
        directory: ModelDirectory,
        fallback: ASGIApp,
        max_body: int,
        upstream: Upstream | None = None,
    ) -> None:
        self.directory = directory
        self.fallback = fallback
        self.upstream = upstream or Upstream()
        self.openai = OpenAIRoutes(directory, self.upstream, max_body)
        self.native = NativeRoutes(directory, self.upstream, max_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith("/v1/"):
            await self._handle(scope, receive, send, self._openai_route)
        elif path.startswith(NATIVE_PREFIX):
            await self._handle(scope, receive, send, self.native.passthrough)
        else:
            await self.fallback(scope, receive, send)

    async def _openai_route(self, scope: Scope, receive: Receive, send: Send) -> str | None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in PASSTHROUGH_PATHS:
            if method != "POST":
                raise MethodNotAllowed(f"{method} is not allowed on {path}; use POST")
            return await self.openai.passthrough(scope, receive, send)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"{method} is not allowed on {path}; use GET")
            name = path[len("/v1/models/") :] if path != "/v1/models" else ""
            if name:
                await self.openai.get_model(scope, receive, send, name)
                return name
            await self.openai.list_models(scope, receive, send)
            return None
        raise NotFound(f"no such endpoint: {path}")

    async def _handle(self, scope: Scope, receive: Receive, send: Send, handler: Handler) -> None:
        started = time.perf_counter()
        tracking = _Tracking(send)
        model: str | None = None
        try:
            model = await handler(scope, receive, tracking)
        except Exception as exc:
            if tracking.status:  # the response began: nothing more can be said in it
                access_log.warning("error after response start: %s", exc)
            else:
                status, message, code = describe(exc)
                await send_json(tracking, status, openai_error(status, message, code))
        finally:
            access_log.info(
                "%s %s model=%s status=%s %.1fms",
                scope["method"],
                scope["path"],
                model or "-",
                tracking.status or "-",
                (time.perf_counter() - started) * 1000,
            )

    async def close(self) -> None:
        await self.upstream.close()
