"""What the gateway measures per request, for ``/metrics``: cheap on the hot path, read at scrape time.

One ``RequestTiming`` per request lives in a context variable set by the gateway, so code deep in a route (the
upstream client, a lease, the Ollama stream converter) can note a moment without it being passed down:

- ``waited``: seconds spent waiting for the model (loading, a free slot) — not the gateway's time;
- ``backend_at``: when the backend was first asked (the request is written to it);
- ``first_body_at`` and ``bodies``: when the first piece of the answer left, and how many pieces did;
- ``timings``: llama-server's own ``timings`` object (prompt and generated tokens, generation speed), taken
  from the answer: the Ollama converter reads it anyway; a passed-through answer is searched for it only in
  a piece that contains the word, so a streamed chunk costs one substring search.

``GatewayMetrics.observe`` turns a finished request into Prometheus samples. The gateway-added time is the
time in our code before the backend had the request, less the wait for the model; for an answer that needed
no backend (``/api/tags``), the whole answer. The response side of streaming costs per chunk, measured in
``tests/bench`` (µs of gateway CPU per chunk), not here.
"""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series next to every counter and histogram: half the scrape, no use

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
ADDED_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
SPEED_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)


class GatewayMetrics:
    """Per-model request metrics. ``model`` is the catalog name (bounded by the catalog), never a user or
    a token; a request that named no model (or no known one) has ``model=""``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        by_request = ["model", "endpoint", "status"]
        self.requests = Counter(
            "llamacontroller_requests", "gateway requests by model, endpoint and status", by_request, registry=registry
        )
        self.duration = Histogram(
            "llamacontroller_request_duration_seconds",
            "time to answer a gateway request, to its last byte",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_token = Histogram(
            "llamacontroller_time_to_first_token_seconds",
            "streamed answers: time from the request to the first piece of the answer (the first token)",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.added = Histogram(
            "llamacontroller_gateway_added_seconds",
            "time in the gateway before the backend had the request, without waiting for the model or a slot",
            ["endpoint"],
            buckets=ADDED_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "llamacontroller_prompt_tokens",
            "prompt tokens evaluated (llama-server's timings)",
            ["model"],
            registry=registry,
        )
        self.generated_tokens = Counter(
            "llamacontroller_generated_tokens",
            "tokens generated (llama-server's timings)",
            ["model"],
            registry=registry,
        )
        self.speed = Histogram(
            "llamacontroller_generation_tokens_per_second",
            "generation speed of each answer (llama-server's timings)",
            ["model"],
            buckets=SPEED_BUCKETS,
            registry=registry,
        )
        self._series: dict[tuple[str, str, int], _Series] = {}
        self._tokens: dict[str, _Tokens] = {}

    def observe(self, endpoint: str, model: str | None, status: int, timing: RequestTiming, ended: float) -> None:
        name = model or ""
        key = (name, endpoint, status)
        series = self._series.get(key)
        if series is None:  # labels() costs more than the observations: each series is looked up once
            series = self._series[key] = _Series(
                self.requests.labels(name, endpoint, str(status)),
                self.duration.labels(name, endpoint),
                self.first_token.labels(name, endpoint),
                self.added.labels(endpoint),
            )
        series.requests.inc()
        series.duration.observe(ended - timing.started)
        series.added.observe(timing.added(ended))
        if timing.bodies > 1 and timing.first_body_at is not None:
            series.first_token.observe(timing.first_body_at - timing.started)
        timings = timing.timings
        if timings and name:
            tokens = self._tokens.get(name)
            if tokens is None:
                tokens = self._tokens[name] = _Tokens(
                    self.prompt_tokens.labels(name), self.generated_tokens.labels(name), self.speed.labels(name)
                )
            prompt = _number(timings.get("prompt_n"))
            generated = _number(timings.get("predicted_n"))
            if prompt > 0:
                tokens.prompt.inc(prompt)
            if generated > 0:
                tokens.generated.inc(generated)
            speed = _number(timings.get("predicted_per_second"))
            if generated > 1 and speed > 0:
                tokens.speed.observe(speed)


@dataclass(frozen=True)
class _Series:
    requests: Counter
    duration: Histogram
    first_token: Histogram
    added: Histogram


@dataclass(frozen=True)
class _Tokens:
    prompt: Counter
    generated: Counter
    speed: Histogram


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
