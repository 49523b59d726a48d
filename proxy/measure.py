"""The gateway's request metrics: a finished request's notes (``common/notes.py``) as Prometheus samples.

The gateway-added time is the time in our code before the backend had the request, less the wait for the model;
for an answer that needed no backend (``/api/tags``), the whole answer. The response side of streaming costs per
chunk, measured in ``tests/bench`` (µs of gateway CPU per chunk), not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics

from common.notes import LATENCY_BUCKETS, RequestTiming

disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series next to every counter and histogram: half the scrape, no use

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
