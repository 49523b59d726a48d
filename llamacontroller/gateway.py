"""A gateway process: the data plane apart from the controller (``serve``'s workers, ``llamacontroller gateway``).

It answers the Ollama, OpenAI/Anthropic and native routes itself — authentication against the shared store,
with its short cache; rate limits counted in the shared store; a backend from its copy of the directory
(``proxy/remote.py``) — and passes every other request to the controller (``proxy/control.py``), which
authenticates those itself. It holds no state of its own that a restart would lose.

Its request metrics go to Prometheus' multiprocess files when ``PROMETHEUS_MULTIPROC_DIR`` is set (``serve``
sets it for its workers; the controller's ``/metrics`` adds them up), else they stay in this process.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from common.address import Address
from common.asgi import Receive, Scope, Send, send_json, send_response
from common.background import cancel_and_wait
from common.peers import TrustedProxies
from common.upstream import Upstream
from controller.auth.asgi import AuthMiddleware
from controller.auth.authenticate import Authenticator
from controller.config import Config
from controller.store import make_store
from proxy.access import AccessLog
from proxy.app import Gateway
from proxy.control import ControlProxy
from proxy.measure import GatewayMetrics
from proxy.remote import RemoteDirectory

log = logging.getLogger(__name__)


async def _no_fallback(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("the gateway process routes what is not the gateway's before the gateway")


class GatewayProcess:
    """The ASGI app of one gateway process (its lifespan included)."""

    def __init__(self, config: Config, controller: str, secret: str) -> None:
        self.config = config
        self.store, self.ephemeral = make_store(config)
        self.auth = Authenticator.from_config(config, self.store, self.ephemeral)
        gateway = config.gateway
        self.directory = RemoteDirectory(
            controller, secret, report_interval=gateway.report_interval, load_wait=gateway.load_wait
        )
        self.peers = TrustedProxies(config.server.trusted_proxies)
        max_body = config.server.max_body_bytes
        self.gateway = Gateway(
            self.directory, _no_fallback, max_body, Upstream(config.upstream.timeouts), gateway.unsupported_tools
        )
        self.control = ControlProxy(controller, self.peers, max_body, self.directory.flush)
        self.registry = CollectorRegistry(auto_describe=True)
        authenticated = AuthMiddleware(self.gateway, self.auth)
        self.front = AccessLog(authenticated, GatewayMetrics(self.registry), self.peers)
        # Its own metrics, on a port of their own (a gateway run apart): the main port's /metrics is the controller's.
        metrics = config.gateway.metrics_listen
        self.metrics_port = Address.parse(metrics).port if metrics else None
        self.metrics = AuthMiddleware(self._own_metrics, self.auth)
        self._resolving: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.metrics_port is not None and (scope.get("server") or ("", 0))[1] == self.metrics_port:
            await self.metrics(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
            # This process answers: the edge's and the kubelet's probe of a gateway, whatever the controller does.
            await send_json(send, 200, {"status": "ok"})
        elif scope["type"] == "http" and self.gateway.handles(scope["path"]):
            await self.front(scope, receive, send)
        elif scope["type"] == "websocket":
            # Nothing here or in the controller speaks WebSocket: closed before it is accepted (uvicorn answers
            # 403), never relayed as if it were an HTTP request.
            await send({"type": "websocket.close", "code": 1008})
        else:
            await self.control(scope, receive, send)

    async def _own_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            await send_json(send, 404, {"error": "this port serves GET /metrics only"})
            return
        body = generate_latest(self.registry)
        await send_response(send, 200, body, CONTENT_TYPE_LATEST.encode())

    async def start(self) -> None:
        await self.store.open()
        self._resolving = asyncio.create_task(self.peers.keep_resolved(), name="trusted-proxies")
        self.directory.start()

    async def stop(self) -> None:
        await cancel_and_wait(self._resolving)
        await self.directory.close()
        await self.gateway.close()
        await self.control.close()
        await self.auth.close()
        await self.ephemeral.close()
        await self.store.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:  # the process cannot serve: say why, and let uvicorn end it
                    log.exception("the gateway could not start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
