"""``create_app(config)``: the Quart app with the gateway in front, the supervisor behind, errors in JSON."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from functools import cache
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common.asgi import ASGIApp, Receive, Scope, Send
from common.background import cancel_and_wait
from common.dialects import control_error, describe
from common.errors import BackendStartFailed, LlamaControllerError
from common.peers import TrustedProxies
from common.upstream import Timeouts, Upstream
from controller import __version__, web
from controller.api import admin, health, metrics, models, system
from controller.api.sse import STREAMS_KEY, EventStreams
from controller.auth import views as auth_views
from controller.auth.asgi import AuthMiddleware, auth_headers
from controller.auth.service import AuthService
from controller.auth.verify import forward_auth
from controller.bodies import BoundedRequest, too_large
from controller.catalog.entries import Catalog
from controller.config import Config
from controller.edge.edge import Edge
from controller.lifecycle.health import HttpProbe
from controller.lifecycle.model import Probe
from controller.lifecycle.supervisor import Supervisor
from controller.metrics import ControllerMetrics
from controller.observability import EventBus
from controller.runtime.base import Runtime
from controller.runtime.instance import instance_id
from controller.runtime.keys import BackendKeys
from controller.runtime.logs import LogBook
from controller.runtime.process import ProcessRuntime
from controller.settings import find_llama_server, supported_flags
from controller.store import make_store
from proxy.access import AccessLog
from proxy.app import Gateway
from proxy.measure import GatewayMetrics

log = logging.getLogger(__name__)


def create_app(
    config: Config,
    *,
    runtime: Runtime | None = None,
    probe: Probe | None = None,
    binary: Callable[[], str] | None = None,
    on_ready: Callable[[Quart], None] | None = None,
) -> Quart:
    """Build the whole application; ``runtime``/``probe``/``binary`` are for tests (a fake runtime)."""
    app = Quart("controller")
    app.request_class = BoundedRequest
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    logbook = LogBook()
    events = EventBus()
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    find_binary = binary or cache(lambda: find_llama_server(config.llama_server.binary))
    runtime = runtime or make_runtime(config, logbook, find_binary)
    timeouts = Timeouts(
        connect=config.upstream.connect_timeout,
        write=config.upstream.write_timeout,
        response=config.upstream.response_timeout,
        stall=config.upstream.stall_timeout,
    )
    upstream = Upstream(timeouts)  # one keep-alive pool for requests and health probes alike
    registry = CollectorRegistry(auto_describe=True)  # one per app: tests build many apps in one process
    counted: ControllerMetrics | None = None

    def publish(event: dict[str, Any]) -> None:
        if counted is not None:
            counted.on_event(event)
        events.publish(event)

    http_probe = HttpProbe(upstream)
    supervisor = Supervisor(
        config,
        runtime,
        Catalog(config),
        logbook,
        probe or http_probe,
        publish,
        keys=BackendKeys.from_secrets_dir(config.secrets_dir),
        key_check=None if probe else http_probe.key_accepted,  # a test's stand-in probe knows no keys
    )
    counted = ControllerMetrics(registry, supervisor)
    edge = Edge(config, events.publish) if config.edge.enabled else None
    if edge is not None:
        registry.register(health.EdgeState(edge))
    gateway = Gateway(supervisor, cast(ASGIApp, app.asgi_app), config.server.max_body_bytes, upstream)
    peers = TrustedProxies(config.server.trusted_proxies)
    store, ephemeral = make_store(config)
    auth = AuthService.from_config(config, store, ephemeral)

    async def verify(scope: Scope, receive: Receive, send: Send) -> None:
        await forward_auth(scope, send, auth)

    # The access log (and the gateway's metrics) around everything, refusals included; then authentication;
    # then the gateway (hot path); then Quart (the rest).
    authenticated = AuthMiddleware(gateway, auth, verify, counted.auth_refused)
    app.asgi_app = cast(Any, AccessLog(authenticated, GatewayMetrics(registry), peers))  # type: ignore[method-assign]
    app.extensions["llamacontroller.metrics"] = counted
    app.extensions["llamacontroller.auth"] = auth
    app.extensions["llamacontroller.config"] = config
    app.extensions["llamacontroller.supervisor"] = supervisor
    app.extensions["llamacontroller.events"] = events
    app.extensions[STREAMS_KEY] = EventStreams()  # the server ends them when it begins to shut down
    app.extensions["llamacontroller.gateway"] = gateway
    app.extensions["llamacontroller.upstream"] = upstream
    app.extensions["llamacontroller.edge"] = edge
    app.register_blueprint(health.blueprint)
    app.register_blueprint(models.blueprint)
    app.register_blueprint(admin.blueprint)
    app.register_blueprint(metrics.blueprint)
    app.register_blueprint(system.blueprint)
    app.register_blueprint(web.blueprint)
    app.register_blueprint(auth_views.blueprint)
    _register_error_handlers(app)
    _relative_redirects(app)

    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        if config.runtime.kind == "process":  # a container runtime's llama-server is in its image
            try:
                binary_path = await asyncio.to_thread(find_binary)
                supervisor.set_flags(await asyncio.to_thread(supported_flags, binary_path))
            except BackendStartFailed as exc:
                log.error("%s", exc.message)
        await store.open()
        if config.auth.enabled:
            password = await auth.ensure_first_admin()
            if password is not None:  # printed once, to the console only: never logged
                print(
                    f"\n  created user 'admin' with password: {password}\n"
                    "  (shown once; change it with: llamacontroller user passwd admin)\n",
                    flush=True,
                )
        else:
            log.warning("authentication is DISABLED (auth.enabled: false): anyone who can connect is admin")
        resolving = asyncio.create_task(peers.keep_resolved(), name="trusted-proxies")
        try:
            await supervisor.start()
            if edge is not None:
                await edge.start()
            count = len(supervisor.catalog.entries())
            log.info("LlamaController %s ready: %d model(s) in the catalog", __version__, count)
            if on_ready is not None:
                on_ready(app)
            yield
        finally:  # also when start-up failed half-way: nothing started may outlive the controller
            await cancel_and_wait(resolving)
            if edge is not None:
                await edge.close()
            await supervisor.close()
            await gateway.close()  # closes the shared upstream pool, the probe's too
            await auth.close()
            await ephemeral.close()
            await store.close()

    return app


def make_runtime(config: Config, logbook: LogBook, binary: Callable[[], str]) -> Runtime:
    """The runtime ``runtime.kind`` names (the docker SDK and the Kubernetes client are imported only when used)."""
    if config.runtime.kind == "docker":
        from controller.runtime.docker import DockerRuntime

        return DockerRuntime(config, logbook, instance_id(config.data_dir))
    if config.runtime.kind == "kubernetes":
        from controller.runtime.kubernetes import KubernetesRuntime

        return KubernetesRuntime(config, logbook, instance_id(config.data_dir))
    return ProcessRuntime(config.data_dir, logbook, binary)


def _relative_redirects(app: Quart) -> None:
    @app.after_request
    async def relative_location(response: Response) -> Response:
        """A redirect to this app names a path only. Quart's trailing-slash redirect (``/ui`` → ``/ui/``) is
        absolute, built from the app's own scheme and the request's Host: behind the HTTPS edge that is
        ``http://`` (a downgrade) and whatever host a client wrote (an open redirect)."""
        location = response.headers.get("Location")
        if location and "://" in location:
            parts = urlsplit(location)
            if parts.netloc == request.host:
                response.headers["Location"] = urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment))
        return response


def _register_error_handlers(app: Quart) -> None:
    @app.errorhandler(LlamaControllerError)
    async def our_error(exc: LlamaControllerError) -> tuple[dict[str, Any], int, dict[str, str]]:
        # A 401 names its challenge (WWW-Authenticate), a 429 when to come back, as the middleware's do.
        headers = {name.decode(): value.decode() for name, value in auth_headers(exc)}
        return control_error(exc.message, exc.code), exc.status, headers

    @app.errorhandler(RequestEntityTooLarge)
    async def body_too_large(exc: RequestEntityTooLarge) -> tuple[dict[str, Any], int, dict[str, str]]:
        return await our_error(too_large(exc))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> tuple[dict[str, Any], int]:
        status = exc.code or 500
        code = (exc.name or "error").lower().replace(" ", "_")
        return control_error(exc.description or exc.name or "error", code), status

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> tuple[dict[str, Any], int]:
        status, message, code = describe(exc)
        return control_error(message, code), status
