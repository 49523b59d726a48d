"""What the gateway processes report: their in-flight requests per backend, queues and last use (bookkeeping).

Each gateway reports every second (``POST /internal/v1/report``); a report replaces that gateway's previous one.
A gateway silent for ``ttl`` seconds no longer counts: a killed gateway cannot hold a backend forever. Each report
names the directory revision the gateway had applied: a drain ends only once every live gateway has reported from
a revision that shows the backend draining (``behind``), so a request a gateway began before it knew is counted. An
``ensure`` that hands a gateway a backend leaves a *hold* on it until that gateway's next report, which counts
the request itself: without it a backend with ``keep_alive 0`` could stop before the request reached it.
Times on the wire are wall-clock seconds (the processes may be on other hosts); the counts are plain ints.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.durations import parse_keep_alive
from common.errors import BadRequest

MAX_MODELS_PER_REPORT = 10_000
MAX_BACKENDS_PER_MODEL = 64


@dataclass(frozen=True)
class ModelUse:
    """One gateway's use of one model, as its last report said."""

    in_flight: Mapping[str, int] = field(default_factory=dict)  # backend handle → requests running on it
    queued: int = 0  # requests waiting for the model (a load, a restart)
    last_used: float = 0.0  # wall clock of the last request's start or end
    keep_alive: float | None = None  # what the last request that began asked for (None: the model's default)
    keep_alive_at: float = 0.0  # wall clock of that request's start


@dataclass(frozen=True)
class RemoteUse:
    """Every live gateway's use of one model's current backend, summed."""

    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0  # wall clock
    keep_alive: float | None = None
    keep_alive_at: float = 0.0
    behind: int = 0  # live gateways whose last report is older than the drain they were asked to see
    gateways: int = 0  # live gateways (a drain that begins waits for each of them to see it)


NOBODY = RemoteUse()


@dataclass
class _Gateway:
    seq: int
    seen: float  # monotonic
    models: dict[str, ModelUse]
    revision: tuple[str, int] = ("", -1)  # (epoch, revision) of the directory its last report was made from
    holds: list[tuple[int, str, str]] = field(default_factory=list)  # (seq it waits past, model, handle)


def checked_count(value: Any, what: str, below: int = 1 << 31) -> int:
    """``value`` from a gateway's body if it is a whole number from 0 to ``below`` (not included)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < below:
        raise BadRequest(f"{what} must be a whole number")
    return value


def checked_number(value: Any, what: str) -> float:
    """``value`` from a gateway's body if it is a number (a bool is not one)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        raise BadRequest(f"{what} must be a number")
    return float(value)


def parse_models(value: Any) -> dict[str, ModelUse]:
    """A report's ``models`` object, checked: the controller never trusts a shape it did not make."""
    if not isinstance(value, dict) or len(value) > MAX_MODELS_PER_REPORT:
        raise BadRequest("models must be an object of at most 10000 models")
    models: dict[str, ModelUse] = {}
    for name, use in value.items():
        if not isinstance(use, dict):
            raise BadRequest("each model's use must be an object")
        backends = use.get("in_flight", {})
        if not isinstance(backends, dict) or len(backends) > MAX_BACKENDS_PER_MODEL:
            raise BadRequest("in_flight must be an object of backends")
        keep_alive = use.get("keep_alive")
        models[str(name)] = ModelUse(
            in_flight={str(handle): checked_count(n, "in_flight") for handle, n in backends.items()},
            queued=checked_count(use.get("queued", 0), "queued"),
            last_used=checked_number(use.get("last_used", 0.0), "last_used"),
            keep_alive=None if keep_alive is None else parse_keep_alive(checked_number(keep_alive, "keep_alive")),
            keep_alive_at=checked_number(use.get("keep_alive_at", 0.0), "keep_alive_at"),
        )
    return models


class GatewayReports:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._gateways: dict[str, _Gateway] = {}

    def report(self, gateway: str, seq: int, models: dict[str, ModelUse], revision: tuple[str, int] = ("", -1)) -> None:
        """``gateway``'s counts now, made from directory ``revision``; its holds older than this report are in
        its counts."""
        known = self._gateways.get(gateway)
        if known is not None and seq <= known.seq:
            known.seen = self._clock()  # a late or repeated report: alive, but its counts are older
            return
        holds = [hold for hold in known.holds if hold[0] >= seq] if known else []
        self._gateways[gateway] = _Gateway(seq, self._clock(), models, revision, holds)

    def hold(self, gateway: str, seq: int, model: str, handle: str) -> None:
        """A backend was handed to ``gateway`` for a request it will count in its first report after ``seq``."""
        known = self._gateways.get(gateway)
        if known is None:
            known = self._gateways[gateway] = _Gateway(-1, self._clock(), {})
        known.seen = self._clock()
        known.holds.append((seq, model, handle))

    def forget(self, gateway: str) -> None:
        """``gateway`` stops on purpose (its requests have ended): it no longer counts, without waiting its TTL."""
        self._gateways.pop(gateway, None)

    def prune(self) -> bool:
        """Forget gateways silent for the TTL; True when one was forgotten."""
        now = self._clock()
        silent = [name for name, gateway in self._gateways.items() if now - gateway.seen > self.ttl]
        for name in silent:
            del self._gateways[name]
        return bool(silent)

    def live(self) -> int:
        return len(self._gateways)

    def use(self, model: str, handle: str | None, drain: tuple[str, int] | None = None) -> RemoteUse:
        """Every live gateway's use of ``model``; in-flight counts only on ``handle`` (its current backend).
        ``drain``: the (epoch, revision) that published the backend draining; a gateway whose last report was made
        from an older one is ``behind``."""
        in_flight = queued = behind = 0
        last_used = keep_alive_at = 0.0
        keep_alive: float | None = None
        for gateway in self._gateways.values():
            if drain is not None and (gateway.revision[0] != drain[0] or gateway.revision[1] < drain[1]):
                behind += 1
            in_flight += sum(1 for _, name, held in gateway.holds if name == model and held == handle)
            use = gateway.models.get(model)
            if use is None:
                continue
            if handle is not None:
                in_flight += use.in_flight.get(handle, 0)
            queued += use.queued
            last_used = max(last_used, use.last_used)
            if use.keep_alive_at > keep_alive_at:
                keep_alive, keep_alive_at = use.keep_alive, use.keep_alive_at
        if not self._gateways:
            return NOBODY
        return RemoteUse(in_flight, queued, last_used, keep_alive, keep_alive_at, behind, len(self._gateways))

    def per_model(self) -> dict[str, int]:
        """In-flight requests per model across the gateways (the control API's view)."""
        totals: dict[str, int] = defaultdict(int)
        for gateway in self._gateways.values():
            for name, use in gateway.models.items():
                totals[name] += sum(use.in_flight.values())
        return dict(totals)
