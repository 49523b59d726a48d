"""Fire-and-forget work that must still be tracked: kept alive, logged when it fails, ended on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

CANCEL_RETRY_SECONDS = 0.5


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` and wait until it has really ended (a cancelled task still runs until it yields).

    The cancellation is repeated while the task runs on: Python 3.11's ``asyncio.wait_for`` swallows one that
    arrives just as what it awaits completes, and the liveness task, so cancelled mid-probe, went on probing
    while the stop that waited for it hung forever (a model stuck in "stopping", its backend left running).
    The caller's own cancellation is never swallowed here."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_RETRY_SECONDS)
    if not task.cancelled():
        task.exception()  # retrieved: an error of a task being stopped is of no interest


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``work`` on its own; a failure is logged (by type only: messages may carry request data)."""
        task = asyncio.create_task(self._quietly(work, name), name=name)
        self._tasks.add(task)  # asyncio keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _quietly(work: Coroutine[Any, Any, Any], name: str) -> None:
        try:
            await work
        except Exception as exc:
            log.warning("%s failed: %s", name, exc.__class__.__name__)

    async def drain(self) -> None:
        """Wait for what is running (e.g. last writes before the store closes)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
