"""Logging set-up and the event bus (state changes, fanned out to SSE subscribers)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from common.logsafe import OneLineFormatter

_SUBSCRIBER_BACKLOG = 256


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: the edge's admin calls every few seconds are not news.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))


class EventBus:
    """Publish never blocks: a subscriber that falls behind loses its oldest events, not the server."""

    def __init__(self) -> None:
        self._subscribers: dict[asyncio.Queue[dict[str, Any]], Callable[[dict[str, Any]], bool]] = {}

    def publish(self, event: dict[str, Any]) -> None:
        for queue, wanted in self._subscribers.items():
            if not wanted(event):
                continue
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    @contextmanager
    def subscription(
        self, wanted: Callable[[dict[str, Any]], bool] = lambda event: True
    ) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue that receives every event published (and ``wanted``) while the block runs."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=_SUBSCRIBER_BACKLOG)
        self._subscribers[queue] = wanted
        try:
            yield queue
        finally:
            self._subscribers.pop(queue, None)
