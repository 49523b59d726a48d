"""What the control plane's pages and API use, typed: one ``Services`` on the app instead of string keys.

Built once per app by ``controller.app.build_services``; read with ``services()`` inside a request (or the app's
context) and ``services_of(app)`` outside one. The imports are for the type checker only: the API and the pages
import this module, and the services are built from theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from quart import Quart, current_app

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from common.peers import TrustedProxies
    from common.upstream import Upstream
    from controller.api.sse import EventStreams
    from controller.auth.admin import Administration
    from controller.auth.authenticate import Authenticator
    from controller.config import Config
    from controller.edge.edge import Edge
    from controller.leadership import Leadership
    from controller.lifecycle.publisher import DirectoryPublisher
    from controller.lifecycle.supervisor import Supervisor
    from controller.metrics import ControllerMetrics
    from controller.observability import EventBus
    from controller.store.base import Ephemeral, Store

SERVICES_KEY = "llamacontroller.services"


@dataclass
class Ending:
    """How the control plane asks the server around it to end the process, and with which exit status: the server
    (llamacontroller/server.py) sets ``stop``; under a test client there is none, and the request is only kept."""

    code: int | None = None
    reason: str | None = None
    stop: Callable[[int], None] | None = None

    def request(self, code: int, reason: str) -> None:
        if self.code is None:
            self.code, self.reason = code, reason
        if self.stop is not None:
            self.stop(code)


@dataclass(frozen=True)
class Services:
    config: Config
    supervisor: Supervisor
    auth: Authenticator  # who is asking: tokens, sessions, sign-in
    admin: Administration  # users and tokens, changed
    store: Store
    ephemeral: Ephemeral  # rate-limit counters and other short-lived state
    events: EventBus
    metrics: ControllerMetrics
    registry: CollectorRegistry  # the controller's metrics; the gateway's join them in the embedded shape
    upstream: Upstream  # one keep-alive pool: the gateway's requests, the probes, the backends' /metrics
    peers: TrustedProxies
    streams: EventStreams  # the server ends them when it begins to shut down
    edge: Edge | None
    find_binary: Callable[[], str]  # the llama-server binary (process runtime)
    publisher: DirectoryPublisher  # the directory the gateway processes follow, and their reports
    internal_secret: str  # what the gateway processes show on the internal routes
    leadership: Leadership  # whether this controller leads (server.leader_election); only the leader acts
    ending: Ending  # how to end the process (after the lead is lost)

    def install(self, app: Quart) -> None:
        app.extensions[SERVICES_KEY] = self


def services() -> Services:
    """The services of the app handling the current request."""
    return cast("Services", current_app.extensions[SERVICES_KEY])


def services_of(app: Quart) -> Services:
    return cast("Services", app.extensions[SERVICES_KEY])
