"""Requests on one model: the bounded queue, the concurrency slots, and the idle expiry (plain bookkeeping).

keep_alive follows Ollama: the last request *scheduled* onto the backend (``begin``) decides how long the
model stays loaded once the last request has ended (``end``), whatever order they finish in.
"""

from __future__ import annotations

import asyncio
import math
import time

from controller.errors import QueueFull
from controller.lifecycle.requirements import ModelPolicy


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

    @property
    def drained(self) -> bool:
        return self.in_flight == 0

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

    def begin(self, keep_alive: float | None) -> None:
        """A request starts on the backend (its slot already acquired)."""
        self.in_flight += 1
        self.last_used = time.monotonic()
        self.expires_at = None
        self._keep_alive = self._policy.keep_alive if keep_alive is None else keep_alive

    def end(self) -> None:
        """A request ended: its slot is free; the last one out arms the expiry."""
        self.in_flight -= 1
        self._slots.release()
        self.last_used = time.monotonic()
        if self.in_flight == 0:
            self._arm(self._keep_alive)

    def ready(self) -> None:
        """A backend became ready: it expires even if every waiter went away during the load."""
        self.last_used = time.monotonic()
        self._arm(self._policy.keep_alive)

    def stopped(self) -> None:
        self.expires_at = None

    def _arm(self, seconds: float) -> None:
        self.expires_at = None if math.isinf(seconds) else self.last_used + seconds

    def wall_expiry(self) -> float | None:
        """The expiry as wall-clock seconds since the epoch, for the APIs."""
        if self.expires_at is None:
            return None
        return time.time() + (self.expires_at - time.monotonic())
