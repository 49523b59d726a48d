"""Keeps Caddy's configuration equal to what ``render`` says, and says loudly when it cannot.

Every ``interval`` seconds the sync reads Caddy's configuration (``GET /config/``) and pushes the document only
when Caddy does not have it — so a Caddy that restarted on its own (or an edge container that was recreated)
gets its routes back within seconds, and an unchanged document costs no ``/load`` (Caddy logs a line for each,
17,000 a day at 5 s). When a supervised Caddy (re)starts (``changed()``), its admin API is polled every
``ADMIN_POLL`` seconds and the document goes in the moment it answers: no failed push, no retry backoff to
wait out. A Caddy that is down or that refuses the document is reported in the status (``/readyz``, the
system status, the events stream, the log) and retried with backoff; never ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.background import cancel_and_wait
from controller.edge.admin import CaddyAdmin, EdgeError
from controller.edge.render import EdgeSettings, render
from controller.events import EdgeChanged
from controller.runtime.watching import Backoff

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
ADMIN_POLL = 0.05  # a Caddy that just started opens its admin API within a few hundred ms
ADMIN_START_WAIT = 10.0


@dataclass(frozen=True)
class EdgeStatus:
    state: str  # starting | ok | down | rejected
    error: str | None
    since: float  # wall clock of the last change of state
    pushed_at: float | None  # wall clock of the last accepted push

    def public(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "since": self.since, "pushed_at": self.pushed_at}


class EdgeSync:
    def __init__(
        self,
        settings: EdgeSettings,
        admin: CaddyAdmin,
        publish: Callable[[EdgeChanged], None],
        interval: float = 5.0,
    ) -> None:
        self.settings = settings
        self.admin = admin
        self._publish = publish
        self._interval = interval
        self._wake = asyncio.Event()
        self._caddy_started = False
        self._task: asyncio.Task[None] | None = None
        self.status = EdgeStatus("starting", None, time.time(), None)

    def desired(self) -> dict[str, Any]:
        return render(self.settings)

    def down(self, reason: str) -> None:
        """The edge is known to be down (a supervised Caddy exited): say so now, not at the next push."""
        self._set_status("down", reason)

    def changed(self) -> None:
        """A supervised Caddy (re)started and has only its bootstrap: push as soon as its admin API answers."""
        self._caddy_started = True
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="edge-sync")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        await self.admin.close()

    async def reconcile(self) -> None:
        """Push the desired config unless Caddy already runs exactly it (raises EdgeError, like push)."""
        desired = self.desired()
        with contextlib.suppress(EdgeError):  # unreadable: the push says why, in the status too
            if await self.admin.config() == desired:
                self._set_status("ok", None)
                return
        await self.push()

    async def _wait_for_admin(self) -> None:
        deadline = time.monotonic() + ADMIN_START_WAIT
        while not await self.admin.alive() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(ADMIN_POLL)  # nothing to wait on but the socket: poll

    async def push(self) -> None:
        """Push the desired config now (raises EdgeError; the status says it too)."""
        try:
            await self.admin.load(self.desired())
        except EdgeError as exc:
            self._set_status("rejected" if "rejected" in exc.message else "down", exc.message)
            raise
        self._set_status("ok", None, pushed=True)

    def _set_status(self, state: str, error: str | None, pushed: bool = False) -> None:
        old = self.status
        now = time.time()
        self.status = EdgeStatus(
            state,
            error,
            now if state != old.state or error != old.error else old.since,
            now if pushed else old.pushed_at,
        )
        if state != old.state or error != old.error:
            if state == "ok":
                log.info("edge: Caddy has the configuration (%s)", self.admin.address)
            else:
                log.error("edge: %s", error)
            self._publish(EdgeChanged(state, error, now))

    async def _run(self) -> None:
        backoff = Backoff(RETRY_DELAYS)
        while True:
            self._wake.clear()
            if self._caddy_started:
                self._caddy_started = False
                await self._wait_for_admin()
            try:
                await self.reconcile()
                backoff.reset()
                delay = self._interval
            except EdgeError:
                delay = min(backoff.next_delay(), self._interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
