"""Requests on one model: the bounded queue, the concurrency slots, and the idle expiry (plain bookkeeping).

keep_alive follows Ollama: the last request *scheduled* onto the backend (``begin``) decides how long the
model stays loaded once the last request has ended (``end``), whatever order they finish in.

Requests that gateway processes run are counted apart (``remote``, from their reports: lifecycle/gateways.py):
the backend is busy while either count is, and a remote request's keep_alive counts as a local one's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping

from common.errors import QueueFull
from controller.catalog.requirements import ModelPolicy
from controller.lifecycle.gateways import NOBODY, RemoteUse

KEEP_ALIVE_LABEL = "keep_alive"  # kept with the backend (Runtime.keep_labels), read back on adoption


def keep_alive_label(seconds: float) -> str:
    return repr(float(seconds))  # "inf" for forever


def kept_keep_alive(labels: Mapping[str, str]) -> float | None:
    """The keep_alive in force when an adopted backend's last controller left it; None when not kept (a
    backend started before it was kept) or unreadable."""
    try:
        seconds = float(labels[KEEP_ALIVE_LABEL])
    except (KeyError, ValueError):
        return None
    return seconds if seconds >= 0 else None


class Usage:
    def __init__(self, label: str, policy: ModelPolicy) -> None:
        self._label = label
        self._policy = policy
        self.in_flight = 0
        self.queued = 0
        self.last_used = 0.0  # monotonic
        self.expires_at: float | None = None  # monotonic; None = never (or busy)
        self._keep_alive = policy.keep_alive
        self._slots = asyncio.Semaphore(policy.max_concurrent)
        self.remote: RemoteUse = NOBODY
        self.remote_counts = True  # False once a drain has waited for the gateways past its timeout
        self._wall: tuple[float, float] | None = None  # (expires_at, its wall clock) as first worked out

    @property
    def remote_in_flight(self) -> int:
        return self.remote.in_flight if self.remote_counts else 0

    @property
    def drained(self) -> bool:
        remote = self.remote_in_flight == 0 and (self.remote.behind == 0 or not self.remote_counts)
        return self.in_flight == 0 and remote

    @property
    def waiting(self) -> int:
        """Requests waiting for the model, here and in the gateways."""
        return self.queued + self.remote.queued

    def set_remote(self, use: RemoteUse) -> bool:
        """The gateways' counts now; True when the owner has something to do (the keep_alive or the expiry)."""
        before, self.remote = self.remote, use
        changed = False
        if use.last_used > before.last_used:
            at = time.monotonic() - max(0.0, time.time() - use.last_used)
            if at > self.last_used:
                self.last_used, changed = at, True
        if use.keep_alive_at > before.keep_alive_at and use.keep_alive_at:
            wanted = self._policy.keep_alive if use.keep_alive is None else use.keep_alive
            changed = changed or wanted != self._keep_alive
            self._keep_alive = wanted
        if not self.drained:
            self.expires_at = None
        elif changed or before.in_flight:
            self._arm(self._keep_alive)
            changed = True
        return changed

    def enter_queue(self) -> None:
        """Count a new request; refuse it (503) past ``max_concurrent + queue_depth``."""
        policy = self._policy
        if self.in_flight + self.queued >= policy.max_concurrent + policy.queue_depth:
            raise QueueFull(
                f"server busy: model '{self._label}' has {self.in_flight} requests running and "
                f"{self.queued} queued (max_concurrent {policy.max_concurrent}, "
                f"queue_depth {policy.queue_depth}); try again later"
            )
        self.queued += 1

    def leave_queue(self) -> None:
        self.queued -= 1

    async def acquire_slot(self) -> None:
        await self._slots.acquire()

    def release_slot(self) -> None:
        self._slots.release()

    @property
    def keep_alive(self) -> float:
        """Seconds idle before the expiry, as the last scheduled request (or an adoption) set it."""
        return self._keep_alive

    def begin(self, keep_alive: float | None) -> bool:
        """A request starts on the backend (its slot already acquired); True when it changed the keep_alive."""
        self.in_flight += 1
        self.last_used = time.monotonic()
        self.expires_at = None
        before = self._keep_alive
        self._keep_alive = self._policy.keep_alive if keep_alive is None else keep_alive
        return self._keep_alive != before

    def end(self) -> None:
        """A request ended: its slot is free; the last one out arms the expiry."""
        self.in_flight -= 1
        self._slots.release()
        self.last_used = time.monotonic()
        if self.drained:
            self._arm(self._keep_alive)

    def ready(self, keep_alive: float | None = None) -> None:
        """A backend became ready: it expires even if every waiter went away during the load. ``keep_alive``:
        the one an adopted backend's last controller had in force (its idle time counts from the adoption)."""
        self.last_used = time.monotonic()
        self._keep_alive = self._policy.keep_alive if keep_alive is None else keep_alive
        self._arm(self._keep_alive)

    def stopped(self) -> None:
        self.expires_at = None
        self.remote_counts = True

    def _arm(self, seconds: float) -> None:
        self.expires_at = None if math.isinf(seconds) else self.last_used + seconds

    def wall_expiry(self) -> float | None:
        """The expiry as wall-clock seconds since the epoch, for the APIs."""
        if self.expires_at is None:
            return None
        # Worked out once per expiry: read again, the two clocks' difference drifts in the last digits, and
        # the directory would publish a new revision of an idle model every second.
        if self._wall is None or self._wall[0] != self.expires_at:
            self._wall = (self.expires_at, time.time() + (self.expires_at - time.monotonic()))
        return self._wall[1]
