"""argon2 off the event loop, a few at a time.

Each check costs about 0.2 s of CPU and 64 MiB (argon2id, m=64 MiB). Sign-in needs no credentials, so a burst
of bogus sign-ins, each with a new name (the throttle counts per name), once ran them on the event loop one
after another: every other request, inference included, waited behind them (100 at once: 14 s for
``/api/tags``). Here they run in threads (argon2 releases the GIL), at most ``parallel`` at once so that memory
stays bounded, and past ``waiting`` queued checks a sign-in is refused at once with 429.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from common.errors import RateLimited

T = TypeVar("T")


class PasswordWork:
    def __init__(self, parallel: int = 2, waiting: int = 32) -> None:
        self._slots = asyncio.Semaphore(parallel)
        self._queued = 0
        self._max_queued = waiting

    async def run(self, check: Callable[..., T], *args: object) -> T:
        if self._queued >= self._max_queued:
            raise RateLimited("too many sign-ins at once: try again in a moment", 1.0)
        self._queued += 1
        try:
            async with self._slots:
                return await asyncio.to_thread(check, *args)
        finally:
            self._queued -= 1
