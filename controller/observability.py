"""Logging set-up and the event bus (state changes, fanned out to SSE subscribers; the kinds: events.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from common.logsafe import OneLineFormatter
from controller.events import Event

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
    """Publish never blocks: a subscriber that falls behind loses its oldest events, not the server.

    Events travel as the dataclasses of events.py; a subscriber that sends them out serialises them
    (``Event.to_json()``), so what leaves the process is the one wire shape those classes define."""

    def __init__(self) -> None:
        self._subscribers: dict[asyncio.Queue[Event], Callable[[Event], bool]] = {}

    def publish(self, event: Event) -> None:
        for queue, wanted in self._subscribers.items():
            if not wanted(event):
                continue
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    @contextmanager
    def subscription(self, wanted: Callable[[Event], bool] = lambda event: True) -> Iterator[asyncio.Queue[Event]]:
        """A queue that receives every event published (and ``wanted``) while the block runs."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=_SUBSCRIBER_BACKLOG)
        self._subscribers[queue] = wanted
        try:
            yield queue
        finally:
            self._subscribers.pop(queue, None)
