"""What is noted about one request as it goes, for its metrics and its access-log line: cheap on the hot path.

One ``RequestTiming`` per request lives in a context variable set by the gateway, so code deep in a route (the
upstream client, a lease, the Ollama stream converter) — and the model directory behind it, which names the
model a request was allowed (``note_model``) — can note a moment without it being passed down:

- ``waited``: seconds spent waiting for the model (loading, a free slot) — not the gateway's time;
- ``backend_at``: when the backend was first asked (the request is written to it);
- ``first_body_at`` and ``bodies``: when the first piece of the answer left, and how many pieces did;
- ``timings``: llama-server's own ``timings`` object (prompt and generated tokens, generation speed), taken
  from the answer: the Ollama converter reads it anyway; a passed-through answer is searched for it only in
  a piece that contains the word, so a streamed chunk costs one substring search.

The gateway's ``GatewayMetrics`` (proxy/measure.py) turns a finished request into Prometheus samples.
"""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

_TIMINGS_KEY = b'"timings"'
_MAX_CARRY = 64 * 1024  # an SSE event with timings split across reads is kept this far, no further


@dataclass
class RequestTiming:
    started: float
    waited: float = 0.0
    backend_at: float | None = None
    first_body_at: float | None = None
    bodies: int = 0
    timings: dict[str, Any] | None = None
    status: int = 0  # the answer's status, once it began
    asked: str | None = None  # the model the request named, as it spelled it (the access log)
    model: str | None = None  # the catalog's name of that model, once it was found and allowed (metrics)
    _carry: bytes = field(default=b"", repr=False)

    def added(self, ended: float) -> float:
        """Seconds the gateway itself took before the backend had the request (see the module docstring)."""
        until = self.backend_at if self.backend_at is not None else ended
        return max(0.0, until - self.started - self.waited)


current: ContextVar[RequestTiming | None] = ContextVar("llamacontroller_request_timing", default=None)


def note_backend_contact() -> None:
    timing = current.get()
    if timing is not None and timing.backend_at is None:
        timing.backend_at = time.perf_counter()


def note_wait(seconds: float) -> None:
    timing = current.get()
    if timing is not None:
        timing.waited += seconds


def note_asked(name: Any) -> None:
    """The model a request names, as soon as its body is read (so a request that fails still names it)."""
    timing = current.get()
    if timing is not None and isinstance(name, str) and timing.asked is None:
        timing.asked = name


def note_model(name: str) -> None:
    """The catalog's name of the model the request was allowed to use: the only model label of its metrics
    (a client's spelling of it is not one: each spelling would be a new series)."""
    timing = current.get()
    if timing is not None:
        timing.model = name


def note_timings(timings: Any) -> None:
    timing = current.get()
    if timing is not None and isinstance(timings, dict):
        timing.timings = timings


def sniff_timings(piece: bytes) -> None:
    """Find llama-server's ``timings`` in a piece of a passed-through answer (whole JSON or SSE events)."""
    timing = current.get()
    if timing is None or (_TIMINGS_KEY not in piece and not timing._carry):
        return
    data = timing._carry + piece
    timing._carry = b""
    if data.lstrip().startswith(b"{"):  # a whole JSON answer
        try:
            found = json.loads(data).get("timings")
        except (ValueError, AttributeError):
            return
        note_timings(found)
        return
    start = data.rfind(b"data: ", 0, data.rfind(_TIMINGS_KEY) + 1)
    if start < 0:
        return
    event, sep, _ = data[start + 6 :].partition(b"\n")
    try:
        note_timings(json.loads(event).get("timings"))
    except (ValueError, AttributeError):
        if not sep and len(data) - start < _MAX_CARRY:
            timing._carry = data[start:]  # the event goes on in the next piece


# Buckets in seconds: first tokens and whole answers of a local model (tens of ms to minutes); the gateway's
# own time (tens of µs to a few ms); loads (a small model in a second, a large one in minutes).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
