"""The outermost layer: one access-log line for every HTTP request, whoever answered it.

Authentication refusals (401/403/429), the gateway's answers and the control plane's (Quart) all pass through
here, so bad keys and probing leave a trace too. The line names the model the request asked for (also when it
failed), the status, the time, the request id and the client's address (through the edge, see ``common.peers``);
every value a client chose is escaped (``common.logsafe``). The same wrapper of ``send`` records what the
gateway's metrics need (``proxy.measure``), so a streamed chunk passes through one wrapper, not two.
"""

from __future__ import annotations

import logging
import time

from common import notes
from common.asgi import ASGIApp, Message, Receive, Scope, Send
from common.logsafe import loggable_field
from common.peers import PEERS_KEY, TrustedProxies
from common.wire import INTERNAL_PREFIX
from proxy import measure
from proxy.forward import request_id

access_log = logging.getLogger("llamacontroller.access")

ROUTE_KEY = "llamacontroller.route"  # the gateway's name of the route (metrics); absent for the control plane
_MODEL_LIMIT = 128
_PROBES = frozenset({"/healthz", "/readyz"})


class Tracking:
    """Wraps ``send`` to remember the status, to give every answer its request id, to note when the answer's
    pieces leave (metrics), and to drop the body of HEAD responses."""

    def __init__(self, send: Send, head: bool, request_id: str, timing: notes.RequestTiming) -> None:
        self._send = send
        self._head = head
        self._request_id = request_id.encode()
        self._timing = timing

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._timing.status = int(message["status"])
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


class AccessLog:
    def __init__(self, app: ASGIApp, metrics: measure.GatewayMetrics, peers: TrustedProxies) -> None:
        self.app = app
        self.metrics = metrics
        self.peers = peers
        self._probe_answers: dict[str, int | None] = {}  # each probe's last status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = notes.RequestTiming(time.perf_counter())
        notes.current.set(timing)  # this request's task (and the tasks it starts) see it
        scope[PEERS_KEY] = self.peers
        method: str = scope["method"]
        rid = request_id(scope)
        try:
            await self.app(scope, receive, Tracking(send, method == "HEAD", rid, timing))
        finally:
            ended = time.perf_counter()
            route: str | None = scope.get(ROUTE_KEY)
            if route is not None:
                self.metrics.observe(route, timing.model, timing.status, timing, ended)
            self._log(scope, method, rid, timing, ended)

    def _probe_level(self, path: str, status: int | None) -> int:
        """A health probe (kubelet asks every 5 s) is news when it fails for the first time since it last
        answered otherwise: one that passes, or fails again as it did (a standby waiting to lead), is not."""
        repeated = self._probe_answers.get(path) == status
        self._probe_answers[path] = status
        return logging.DEBUG if status == 200 or repeated else logging.INFO

    def _log(self, scope: Scope, method: str, rid: str, timing: notes.RequestTiming, ended: float) -> None:
        path: str = scope["path"]
        if path in _PROBES:
            level = self._probe_level(path, timing.status)
        else:  # a gateway's report (every second) is news only when debugging
            routine = timing.status == 200 and path.startswith(INTERNAL_PREFIX)
            level = logging.DEBUG if routine else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        access_log.log(
            level,
            "%s %s model=%s status=%s %.1fms id=%s client=%s",
            loggable_field(method, 16),
            loggable_field(path),
            loggable_field(timing.asked, _MODEL_LIMIT) if timing.asked else "-",
            timing.status or "-",
            (ended - timing.started) * 1000,
            rid,
            loggable_field(self.peers.client(scope) or "-"),
        )
