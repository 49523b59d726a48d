"""Fire-and-forget work that must still be tracked: kept alive, logged when it fails, ended on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


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
