"""``create_app(config)``: the embedded shape — the control plane's app (controller/app.py) with the data plane
composed in front of it, in one process: the access log (and the gateway's metrics) around everything,
refusals included; then authentication; then the gateway (the hot path); then Quart (everything else)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
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
    caddy_apart: bool = False,
    gateway_metrics: Path | None = None,
) -> Quart:
    """The whole application; ``runtime``/``probe``/``binary`` are for tests (a fake runtime).

    Under ``serve``'s supervisor, ``caddy_apart``: the supervisor runs Caddy; ``gateway_metrics``: the folder where
    the gateway processes keep their request metrics, added up into this app's ``/metrics``."""
    services = build_services(config, runtime=runtime, probe=probe, binary=binary, caddy_apart=caddy_apart)
    if gateway_metrics is not None:
        MultiProcessCollector(services.registry, path=str(gateway_metrics))  # type: ignore[no-untyped-call]
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
    # Under serve's supervisor the gateway processes' samples are this registry's series: the controller's own
    # gateway (its loopback port serves none of the public traffic) keeps its samples apart.
    measured = services.registry if gateway_metrics is None else CollectorRegistry(auto_describe=True)
    front = AccessLog(authenticated, GatewayMetrics(measured), services.peers)
    app.asgi_app = cast(Any, front)  # type: ignore[method-assign]
    app.extensions[GATEWAY_KEY] = gateway
    app.after_serving(gateway.close)  # after the control plane's lifespan has ended
    return app
