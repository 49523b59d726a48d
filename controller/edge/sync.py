"""Keeps Caddy's configuration equal to what ``render`` says, and says loudly when it cannot.

A push happens when the set of ready models changes (``changed()``, called on every model state event), when
a supervised Caddy restarts, and every ``interval`` seconds in any case — so a Caddy that restarted on its own
(or an edge container that was recreated) gets its routes back within seconds. A Caddy that is down or that
refuses the document is reported in the status (``/readyz``, the system status, the events stream, the log)
and retried with backoff; never ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from controller.edge.admin import CaddyAdmin, EdgeError
from controller.edge.render import EdgeSettings, ModelRoute, render
from controller.runtime.base import Backend

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
UPSTREAMS_CACHE = 0.25  # seconds a reading of Caddy's in-flight counts is reused


@dataclass(frozen=True)
class EdgeStatus:
    state: str  # starting | ok | down | rejected
    error: str | None
    since: float  # wall clock of the last change of state
    pushed_at: float | None  # wall clock of the last accepted push
    routes: int  # models with a direct /llama route in the pushed config

    def public(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "error": self.error,
            "since": self.since,
            "pushed_at": self.pushed_at,
            "routes": self.routes,
        }


def backend_address(backend: Backend) -> str:
    return backend.url.removeprefix("http://").removeprefix("https://").rstrip("/")


class EdgeSync:
    def __init__(
        self,
        settings: EdgeSettings,
        admin: CaddyAdmin,
        routes: Callable[[], Sequence[ModelRoute]],
        publish: Callable[[dict[str, Any]], None],
        interval: float = 5.0,
    ) -> None:
        self.settings = settings
        self.admin = admin
        self._routes = routes
        self._publish = publish
        self._interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: tuple[float, dict[str, int]] = (0.0, {})
        self.status = EdgeStatus("starting", None, time.time(), None, 0)

    def desired(self) -> dict[str, Any]:
        return render(self.settings, self._routes())

    def down(self, reason: str) -> None:
        """The edge is known to be down (a supervised Caddy exited): say so now, not at the next push."""
        self._set_status("down", reason)

    def changed(self) -> None:
        """Something the config depends on may have changed: push soon."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="edge-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.admin.close()

    async def push(self) -> None:
        """Push the desired config now (raises EdgeError; the status says it too)."""
        models = self._routes()
        config = render(self.settings, models)
        try:
            await self.admin.load(config)
        except EdgeError as exc:
            self._set_status("rejected" if "rejected" in exc.message else "down", exc.message)
            raise
        self._set_status("ok", None, pushed=True, routes=len(models))

    def _set_status(self, state: str, error: str | None, pushed: bool = False, routes: int | None = None) -> None:
        old = self.status
        now = time.time()
        self.status = EdgeStatus(
            state,
            error,
            now if state != old.state or error != old.error else old.since,
            now if pushed else old.pushed_at,
            old.routes if routes is None else routes,
        )
        if state != old.state or error != old.error:
            if state == "ok":
                log.info("edge: Caddy has the configuration (%s)", self.admin.address)
            else:
                log.error("edge: %s", error)
            self._publish({"type": "edge", "state": state, "error": error, "time": now})

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.push()
                failures = 0
                delay = self._interval
            except EdgeError:
                delay = min(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)], self._interval)
                failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def busy_elsewhere(self, backend: Backend) -> bool:
        """Whether Caddy has requests in flight to ``backend`` (its direct /llama route bypasses the gateway).

        When Caddy cannot be asked, the answer is "no": the edge being down must not keep models loaded."""
        address = backend_address(backend)
        if not any(route.dial == address for route in self._routes()):
            return False
        read_at, counts = self._in_flight
        if time.monotonic() - read_at > UPSTREAMS_CACHE:
            try:
                counts = await self.admin.upstreams()
            except EdgeError:
                counts = {}
            self._in_flight = (time.monotonic(), counts)
        return counts.get(address, 0) > 0
