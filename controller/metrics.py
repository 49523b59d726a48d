"""The controller's Prometheus metrics: lifecycle counters from state events, live gauges read at scrape time,
refused requests by reason, and every ready backend's own ``/metrics`` re-exported with a ``model`` label.

Nothing here runs per request except ``auth_refused`` (a counter, on refusals only); the gateway's per-request
metrics are in ``proxy/measure.py``. Labels are model names (bounded by the catalog) and fixed words — never a
user, a token or a path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from common.errors import LlamaControllerError
from common.notes import LATENCY_BUCKETS
from common.upstream import Upstream, bearer
from controller.events import Event, ModelStateChanged, ModelStopFailed
from controller.lifecycle.state import State
from controller.lifecycle.supervisor import Supervisor
from controller.runtime.base import Backend

log = logging.getLogger(__name__)

BACKEND_SCRAPE_TIMEOUT = 2.0  # a backend that does not answer its /metrics in time is left out of this scrape
_BACKEND_LABEL = "model"


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry, supervisor: Supervisor) -> None:
        self.registry = registry
        self.loads = Counter("llamacontroller_model_loads", "backends that became ready", ["model"], registry=registry)
        self.unloads = Counter(
            "llamacontroller_model_unloads", "backends stopped on purpose", ["model"], registry=registry
        )
        self.failures = Counter(
            "llamacontroller_model_failures",
            "failed loads (phase=load) and backends that died while serving (phase=run)",
            ["model", "phase"],
            registry=registry,
        )
        self.restarts = Counter(
            "llamacontroller_model_restarts",
            "starts after a failure (crash recovery, retries)",
            ["model"],
            registry=registry,
        )
        self.stop_failures = Counter(
            "llamacontroller_backend_stop_failures",
            "tries to stop a backend that the runtime could not confirm (each is tried again, with backoff)",
            ["model"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "llamacontroller_model_load_duration_seconds",
            "from start to ready, per load",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.refused = Counter(
            "llamacontroller_auth_refused",
            "requests refused before reaching anything: status 401 (no or bad credentials), 403 (not allowed), "
            "429 (rate limited)",
            ["status"],
            registry=registry,
        )
        registry.register(LiveModels(supervisor))
        self._supervisor = supervisor
        for status in ("401", "403", "429"):
            self.refused.labels(status)

    def start_known_series(self) -> None:
        """Every series that can be known in advance starts at 0, so rate() and increase() see the first
        event. Called before each scrape: the catalog is read at start-up and may grow (models_dir)."""
        for entry in self._supervisor.catalog.entries():
            for counter in (self.loads, self.unloads, self.restarts, self.stop_failures):
                counter.labels(entry.name)
            for phase in ("load", "run"):
                self.failures.labels(entry.name, phase)

    def _name(self, key: str) -> str:
        """Events carry the model's key (``a:latest``); every metric uses the catalog's name (``a``)."""
        entry = self._supervisor.catalog.get(key)
        return entry.name if entry is not None else key

    def on_event(self, event: Event) -> None:
        """Counts the lifecycle from the state events every model publishes."""
        if isinstance(event, ModelStopFailed):
            self.stop_failures.labels(self._name(event.model)).inc()
            return
        if not isinstance(event, ModelStateChanged):
            return
        model, old, new = self._name(event.model), event.old, event.state
        if new == State.READY:
            self.loads.labels(model).inc()
            seconds = event.load_seconds or 0.0
            if seconds > 0:  # 0: adopted from an earlier controller, not loaded here
                self.load_seconds.labels(model).observe(seconds)
        elif new == State.STOPPED and old == State.STOPPING:
            self.unloads.labels(model).inc()
        elif new == State.FAILED:
            self.failures.labels(model, "load" if old == State.STARTING else "run").inc()
        elif new == State.STARTING and old == State.FAILED:
            self.restarts.labels(model).inc()

    def auth_refused(self, status: int) -> None:
        self.refused.labels(str(status)).inc()


class LiveModels(Collector):
    """Gauges read from the supervisor when Prometheus scrapes: no bookkeeping between scrapes."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        supervisor = self._supervisor
        infos = [supervisor.info(entry) for entry in supervisor.catalog.entries()]
        state = GaugeMetricFamily(
            "llamacontroller_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily("llamacontroller_model_in_flight", "requests being served", labels=["model"])
        queued = GaugeMetricFamily(
            "llamacontroller_model_queued", "requests waiting for the model or a slot", labels=["model"]
        )
        failures = GaugeMetricFamily(
            "llamacontroller_model_consecutive_failures", "failed starts or crashes in a row", labels=["model"]
        )
        expires = GaugeMetricFamily(
            "llamacontroller_model_keep_alive_remaining_seconds",
            "seconds until an idle ready model is unloaded (absent: not idle, or kept loaded)",
            labels=["model"],
        )
        last_load = GaugeMetricFamily(
            "llamacontroller_model_last_load_seconds", "duration of the model's last load", labels=["model"]
        )
        now = time.time()
        for info in infos:
            live = info.live
            for each in State:
                state.add_metric([info.name, str(each)], 1.0 if live.state == each else 0.0)
            in_flight.add_metric([info.name], live.in_flight)
            queued.add_metric([info.name], live.queued)
            failures.add_metric([info.name], live.failures)
            last_load.add_metric([info.name], live.load_duration)
            if live.state == State.READY and live.expires_at is not None:
                expires.add_metric([info.name], max(0.0, live.expires_at - now))
        yield from (state, in_flight, queued, failures, expires, last_load)


class LeaderState(Collector):
    """``llamacontroller_leader``: 1 while this controller leads (and may act on the runtime), 0 while it stands
    by or after it lost the lead; read when Prometheus scrapes. Without leader election it leads once started."""

    def __init__(self, leading: Callable[[], bool]) -> None:
        self._leading = leading

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "llamacontroller_leader", "1 while this controller leads (acts on the runtime), 0 while it stands by"
        )
        gauge.add_metric([], 1.0 if self._leading() else 0.0)
        yield gauge


@dataclass(frozen=True)
class BackendFamilies:
    model: str
    text: str


async def scrape_backends(supervisor: Supervisor, upstream: Upstream) -> list[BackendFamilies]:
    """Every ready backend's ``/metrics`` (llama-server runs with ``--metrics``), fetched concurrently."""

    async def one(model: str, backend: Backend) -> BackendFamilies | None:
        try:
            async with asyncio.timeout(BACKEND_SCRAPE_TIMEOUT):
                request = upstream.request("GET", f"{backend.url}/metrics", None, bearer(backend.api_key))
                async with request as response:
                    body = await response.read()
            if response.status != 200:
                return None  # a backend started without --metrics (an older binary) has none to give
            return BackendFamilies(model, body.decode("utf-8", "replace"))
        except (TimeoutError, LlamaControllerError) as exc:
            log.debug("metrics of %s not scraped: %s", model, exc)
            return None

    found = await asyncio.gather(*(one(model, backend) for model, backend in supervisor.ready_backends()))
    return [families for families in found if families is not None]


def relabel(scraped: Sequence[BackendFamilies]) -> str:
    """The backends' families merged into one exposition, each sample with the model it came from."""
    merged: dict[str, Metric] = {}
    for backend in scraped:
        try:
            families = list(text_string_to_metric_families(backend.text))
        except ValueError:
            log.warning("metrics of %s could not be read", backend.model)
            continue
        for family in families:
            target = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                labels = {_BACKEND_LABEL: backend.model, **sample.labels}
                target.add_sample(sample.name, labels, sample.value, sample.timestamp)
    return "".join(_exposition(merged.values()))


def _exposition(families: Iterable[Metric]) -> Iterator[str]:
    for family in families:
        kind = "untyped" if family.type == "unknown" else family.type
        # The text format names a counter by its samples (`x_total`); the parser had dropped the suffix.
        name = f"{family.name}_total" if kind == "counter" else family.name
        yield f"# HELP {name} {_escape_help(family.documentation)}\n# TYPE {name} {kind}\n"
        for sample in family.samples:
            labels = ",".join(f'{key}="{_escape_label(str(value))}"' for key, value in sample.labels.items())
            yield f"{sample.name}{{{labels}}} {_value(sample.value)}\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(value: float) -> str:
    if value != value:  # NaN
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
