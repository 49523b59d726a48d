"""``create_app(config)``: the embedded shape — the control plane's app (controller/app.py) with the data plane
composed in front of it, in one process: the access log (and the gateway's metrics) around everything,
refusals included; then authentication; then the gateway (the hot path); then Quart (everything else)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from quart import Quart

from common.asgi import ASGIApp, Receive, Scope, Send
from controller.app import build_services, create_control_app
from controller.auth.asgi import AuthMiddleware
from controller.auth.verify import forward_auth
from controller.config import Config
from controller.lifecycle.model import Probe
from controller.runtime.base import Runtime
from proxy.access import AccessLog
from proxy.app import Gateway
from proxy.measure import GatewayMetrics

GATEWAY_KEY = "llamacontroller.gateway"  # the composed app's gateway (tests read its route table)


def create_app(
    config: Config,
    *,
    runtime: Runtime | None = None,
    probe: Probe | None = None,
    binary: Callable[[], str] | None = None,
    on_ready: Callable[[Quart], None] | None = None,
) -> Quart:
    """The whole application; ``runtime``/``probe``/``binary`` are for tests (a fake runtime)."""
    services = build_services(config, runtime=runtime, probe=probe, binary=binary)
    app = create_control_app(services, on_ready)
    gateway = Gateway(
        services.supervisor,
        cast(ASGIApp, app.asgi_app),
        config.server.max_body_bytes,
        services.upstream,
        config.gateway.unsupported_tools,
    )
    auth = services.auth

    async def verify(scope: Scope, receive: Receive, send: Send) -> None:
        await forward_auth(scope, send, auth)

    authenticated = AuthMiddleware(gateway, auth, verify, services.metrics.auth_refused)
    front = AccessLog(authenticated, GatewayMetrics(services.registry), services.peers)
    app.asgi_app = cast(Any, front)  # type: ignore[method-assign]
    app.extensions[GATEWAY_KEY] = gateway
    app.after_serving(gateway.close)  # after the control plane's lifespan has ended
    return app
