"""What everything that watches a process it does not block on shares: the runtimes watching their backends,
the edge watching Caddy and its admin API.

- ``Backoff``: the delays between tries of something that keeps failing (a lost event stream, a stop the engine
  refused, a Caddy that keeps dying), growing to a ceiling and starting over after a success.
- ``ExitBook``: one future per backend for "it has exited", created *before* the backend starts (an exit right
  after the start is never dropped) and kept once answered (one per model) for a ``wait_exit`` that comes later.
- ``answer_when_drained``: an exit is reported only once the backend's last log lines are in (or a bound has
  passed), so the error a caller sees quotes llama-server's own reason rather than a bare exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any

from controller.runtime.base import ExitInfo

RECONNECT_DELAYS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
DRAIN_BOUND = 2.0  # seconds an exit waits for the backend's last log lines: a stuck log stream delays no failure


class Backoff:
    """``next_delay()`` for each failure in a row: through ``delays``, then the last one; ``reset()`` on success."""

    def __init__(self, delays: Sequence[float] = RECONNECT_DELAYS) -> None:
        if not delays:
            raise ValueError("a backoff needs at least one delay")
        self._delays = tuple(delays)
        self.failures = 0

    def next_delay(self) -> float:
        delay = self._delays[min(self.failures, len(self._delays) - 1)]
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class ExitBook:
    """Exit futures by backend handle, answered at most once each (``answer`` is idempotent).

    ``watch`` is called before the backend starts. A handle reused for a new start (Kubernetes names a backend
    after its model) gets a fresh future once the old one is answered. An answered exit stays until the same
    model's next backend is watched: a late ``wait_exit`` still gets it, and the book never grows per crash."""

    def __init__(self) -> None:
        self._exits: dict[str, asyncio.Future[ExitInfo]] = {}
        self._latest: dict[str, str] = {}  # model → the handle of its last watched backend
        self._drains: set[asyncio.Task[None]] = set()

    def watch(self, handle: str, model: str, *, new_start: bool = False) -> asyncio.Future[ExitInfo]:
        """The exit future of ``handle``: the one already there (answered or not), or a new one; with
        ``new_start`` a new one in place of an answered one (a new backend under a handle used before)."""
        future = self._exits.get(handle)
        if future is None or (new_start and future.done()):
            future = self._exits[handle] = asyncio.get_running_loop().create_future()
        previous = self._latest.get(model)
        if previous is not None and previous != handle:
            answered = self._exits.get(previous)
            if answered is not None and answered.done():
                del self._exits[previous]
        self._latest[model] = handle
        return future

    def get(self, handle: str) -> asyncio.Future[ExitInfo] | None:
        return self._exits.get(handle)

    def __contains__(self, handle: object) -> bool:
        return handle in self._exits

    def waiting(self) -> Iterator[str]:
        """The handles whose exit has not been answered (what a reconnected watch must look at again)."""
        return iter([handle for handle, future in self._exits.items() if not future.done()])

    def answer(self, handle: str, info: ExitInfo) -> None:
        future = self._exits.get(handle)
        if future is not None and not future.done():
            future.set_result(info)

    def answer_when_drained(self, handle: str, info: ExitInfo, drained: Awaitable[Any] | None) -> None:
        """Answer once ``drained`` (the log follower's end) is done, or after DRAIN_BOUND seconds."""
        if drained is None:
            self.answer(handle, info)
            return

        async def later() -> None:
            try:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(DRAIN_BOUND):
                        await asyncio.shield(asyncio.ensure_future(drained))
            finally:
                self.answer(handle, info)

        task = asyncio.get_running_loop().create_task(later(), name=f"exit-drain:{handle[:12]}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    def forget(self, handle: str) -> None:
        self._exits.pop(handle, None)
        for model, latest in list(self._latest.items()):
            if latest == handle:
                del self._latest[model]

    async def close(self) -> None:
        """Answer at once what is still draining (shutdown does not wait for log lines)."""
        for task in list(self._drains):
            task.cancel()
        if self._drains:
            await asyncio.gather(*self._drains, return_exceptions=True)
