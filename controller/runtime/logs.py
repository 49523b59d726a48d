"""Per-model ring buffers of backend log lines, with live followers (for ``logs?follow=1`` and the UI)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_CAPACITY = 2000
START_MARKER = "[llamacontroller] started"  # written before each backend start, so its own lines can be told apart
_FOLLOWER_BACKLOG = 1000


class LogBook:
    """Keeps the last lines of each model's backend, across restarts, so a failed model shows its cause."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._capacity = capacity
        self._lines: dict[str, deque[str]] = {}
        self._followers: dict[str, set[asyncio.Queue[str]]] = {}

    def append(self, model: str, line: str) -> None:
        self._lines.setdefault(model, deque(maxlen=self._capacity)).append(line)
        for queue in self._followers.get(model, ()):
            if queue.qsize() < _FOLLOWER_BACKLOG:  # a slow follower loses lines, never stalls the backend
                queue.put_nowait(line)

    def tail(self, model: str, count: int) -> list[str]:
        lines = self._lines.get(model)
        if not lines or count <= 0:
            return []
        return list(lines)[-count:]

    @contextmanager
    def subscription(self, model: str) -> Iterator[asyncio.Queue[str]]:
        """A queue that receives each new line of ``model`` while the block runs."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        followers = self._followers.setdefault(model, set())
        followers.add(queue)
        try:
            yield queue
        finally:
            followers.discard(queue)
