"""The control plane's app: its services built once (``build_services``) and the Quart app that serves them
(``create_control_app``): the control API, the web page, health, metrics, errors in JSON, and the lifespan that
starts and stops it all. The embedded shape composes the gateway in front of it (llamacontroller/app.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from common.background import cancel_and_wait
from common.dialects import control_error, describe
from common.errors import BackendStartFailed, LlamaControllerError
from common.peers import TrustedProxies
from common.upstream import Upstream
from controller import __version__, web
from controller.api import admin, health, internal, metrics, models, system
from controller.api.sse import EventStreams
from controller.auth import views as auth_views
from controller.auth.admin import INITIAL_PASSWORD_FILE, Administration
from controller.auth.asgi import auth_headers
from controller.auth.authenticate import Authenticator
from controller.auth.secrets import internal_secret, write_private
from controller.bodies import BoundedRequest, too_large
from controller.catalog.entries import Catalog
from controller.config import Config
from controller.edge.edge import Edge
from controller.events import Event
from controller.leadership import make_leadership
from controller.leadership.fence import FencedRuntime
from controller.leadership.office import Office
from controller.lifecycle.gateways import GatewayReports
from controller.lifecycle.health import HttpProbe
from controller.lifecycle.model import Probe
from controller.lifecycle.publisher import DirectoryPublisher
from controller.lifecycle.supervisor import Supervisor
from controller.metrics import ControllerMetrics, LeaderState
from controller.observability import EventBus
from controller.runtime import make_runtime
from controller.runtime.base import Runtime
from controller.runtime.keys import BackendKeys
from controller.runtime.logs import LogBook
from controller.services import Ending, Services
from controller.settings import find_llama_server, supported_flags
from controller.store import make_store

log = logging.getLogger(__name__)

CONTROLLER_PID_FILE = "controller.pid"  # in <data_dir>/run


def build_services(
    config: Config,
    *,
    runtime: Runtime | None = None,
    probe: Probe | None = None,
    binary: Callable[[], str] | None = None,
    caddy_apart: bool = False,
) -> Services:
    """Everything the control plane runs on, wired once; ``runtime``/``probe``/``binary`` are for tests.
    ``caddy_apart``: the embedded Caddy is the ``serve`` supervisor's child, which outlives this controller."""
    logbook = LogBook()
    events = EventBus()
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    find_binary = binary or cache(lambda: find_llama_server(config.llama_server.binary))
    runtime = runtime or make_runtime(config, logbook, find_binary)
    upstream = Upstream(config.upstream.timeouts)
    registry = CollectorRegistry(auto_describe=True)  # one per app: tests build many apps in one process
    counted: ControllerMetrics | None = None
    publisher: DirectoryPublisher | None = None

    def publish(event: Event) -> None:
        if counted is not None:
            counted.on_event(event)
        if publisher is not None:
            publisher.nudge()
        events.publish(event)

    http_probe = HttpProbe(upstream)
    leadership = make_leadership(config)
    supervisor = Supervisor(
        config,
        FencedRuntime(runtime, lambda: leadership.leading),  # only the leader acts on the runtime
        Catalog(config),
        logbook,
        probe or http_probe,
        publish,
        keys=BackendKeys.from_secrets_dir(config.secrets_dir),
        key_check=None if probe else http_probe.key_accepted,  # a test's stand-in probe knows no keys
        standby=True,  # admits nothing until the lifespan starts it, as the leader
    )
    counted = ControllerMetrics(registry, supervisor)
    registry.register(LeaderState(lambda: leadership.leading))
    streams = EventStreams()
    publisher = DirectoryPublisher(supervisor, GatewayReports(config.gateway.report_ttl), ending=streams.closing)
    edge = Edge(config, events.publish, spawn_caddy=not caddy_apart) if config.edge.enabled else None
    if edge is not None:
        registry.register(health.EdgeState(edge))
    store, ephemeral = make_store(config)
    authenticator = Authenticator.from_config(config, store, ephemeral)
    return Services(
        config=config,
        supervisor=supervisor,
        auth=authenticator,
        admin=Administration(store, authenticator),
        store=store,
        ephemeral=ephemeral,
        events=events,
        metrics=counted,
        registry=registry,
        upstream=upstream,
        peers=TrustedProxies(config.server.trusted_proxies),
        streams=streams,
        edge=edge,
        find_binary=find_binary,
        publisher=publisher,
        internal_secret=internal_secret(config.secrets_dir),
        leadership=leadership,
        ending=Ending(),
    )


def create_control_app(services: Services, on_ready: Callable[[Quart], None] | None = None) -> Quart:
    """The Quart app over ``services``: blueprints, error handlers, and the lifespan."""
    config = services.config
    app = Quart("controller")
    app.request_class = BoundedRequest
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    services.install(app)
    for module in (health, models, admin, metrics, system, web, auth_views, internal):
        app.register_blueprint(module.blueprint)
    _register_error_handlers(app)
    _relative_redirects(app)

    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        async with _serving(services):
            if on_ready is not None:
                on_ready(app)
            yield

    return app


@asynccontextmanager
async def _serving(services: Services) -> AsyncIterator[None]:
    """Start the control plane; at the end (also when start-up failed half-way) stop what started: nothing
    started may outlive the controller."""
    config = services.config
    if config.runtime.kind == "process":  # a container runtime's llama-server is in its image
        try:
            binary_path = await asyncio.to_thread(services.find_binary)
            services.supervisor.set_flags(await asyncio.to_thread(supported_flags, binary_path))
        except BackendStartFailed as exc:
            log.error("%s", exc.message)
    await services.store.open()
    pid_file = write_pid_file(config.data_dir / "run" / CONTROLLER_PID_FILE)
    resolving = asyncio.create_task(services.peers.keep_resolved(), name="trusted-proxies")
    office = Office(services, lambda: _take_office(services))
    try:
        await office.begin()  # leads at once (always, without leader election), or stands by and campaigns
        yield
    finally:
        await office.end()
        await cancel_and_wait(resolving)
        await services.publisher.close()
        if services.edge is not None:
            await services.edge.close()
        await services.supervisor.close()
        await services.leadership.release()  # after the supervisor: the next leader starts once this one stopped
        await services.upstream.close()  # the probes' pool (and, embedded, the gateway's)
        await services.auth.close()
        await services.ephemeral.close()
        await services.store.close()
        with contextlib.suppress(OSError):
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()


def write_pid_file(path: Path) -> Path:
    """This process's pid in ``path``: how an operator (or a test) finds the controller among ``serve``'s
    processes, to signal it or see that it restarted."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(f"{os.getpid()}\n")
    return path


async def _take_office(services: Services) -> None:
    """What the leader alone does: the first admin (in the shared store), adoption of what runs, the edge."""
    await _first_admin(services)
    await services.supervisor.start()
    await services.publisher.start()  # the gateways follow the leader's directory
    if services.edge is not None:
        await services.edge.start()
    count = len(services.supervisor.catalog.entries())
    log.info("LlamaController %s ready: %d model(s) in the catalog", __version__, count)


async def _first_admin(services: Services) -> None:
    if not services.config.auth.enabled:
        log.warning("authentication is DISABLED (auth.enabled: false): anyone who can connect is admin")
        return
    password = await services.admin.ensure_first_admin()
    if password is None:
        return
    # Never logged. Kept in a private file of the data dir (a container's log is kept by log pipelines, and lost
    # with the container); shown as well only on a terminal, where nobody else keeps it.
    kept = services.config.data_dir / INITIAL_PASSWORD_FILE
    write_private(kept, password + "\n")
    if sys.stdout.isatty():
        said = f"created user 'admin' with password: {password}\n  (kept in {kept}, readable by this user only)"
    else:
        said = f"created user 'admin'; its password is in {kept} (readable by this user only)"
    print(f"\n  {said}\n  change it with: llamacontroller user passwd admin (which deletes that file)\n", flush=True)


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
