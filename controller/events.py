"""The events published on the bus (observability.EventBus): one frozen dataclass per kind.

Publishers construct these; the edges serialise them with ``as_dict()`` / ``to_json()``: the control API's
``/control/v1/events`` stream sends ``to_json()`` as each ``data:`` line, the dashboard's stream reads the
model name, the metrics read the fields. ``as_dict()`` is the wire shape, key for key and in order, that
clients of ``/control/v1/events`` see (docs/api.md); tests/http/test_event_wire.py pins each kind's bytes.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


class _Wire(ABC):
    type: ClassVar[str]

    @abstractmethod
    def as_dict(self) -> dict[str, Any]:
        """The event as its wire shape, key for key and in order."""

    def to_json(self) -> str:
        return json.dumps(self.as_dict())


@dataclass(frozen=True)
class ModelStateChanged(_Wire):
    """A model moved from one state to another (lifecycle/state.py); published by its owner task."""

    type: ClassVar[str] = "model_state"

    model: str  # the model's key (``a:latest``)
    old: str  # ``from`` on the wire
    state: str
    error: str | None  # the error that caused the move (to ``failed``), else None
    time: float  # seconds since the epoch
    load_seconds: float | None = None  # only on a move to ``ready``: 0 for an adopted backend

    def as_dict(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": self.type,
            "model": self.model,
            "from": self.old,
            "state": self.state,
            "error": self.error,
            "time": self.time,
        }
        if self.load_seconds is not None:
            event["load_seconds"] = self.load_seconds
        return event


@dataclass(frozen=True)
class ModelStopFailed(_Wire):
    """A try to stop a model's backend failed; the lifecycle tries again in ``retry_in`` seconds."""

    type: ClassVar[str] = "model_stop_failed"

    model: str
    state: str
    handle: str
    error: str
    failures: int  # failed tries of this stop so far
    retry_in: float
    time: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "model": self.model,
            "state": self.state,
            "handle": self.handle,
            "error": self.error,
            "failures": self.failures,
            "retry_in": self.retry_in,
            "time": self.time,
        }


@dataclass(frozen=True)
class ModelDraining(_Wire):
    """A ready model is about to stop (unload, eviction, expiry, a restart with other flags): its backend takes
    nothing new, and stops once the requests on it, here and in the gateways, have ended."""

    type: ClassVar[str] = "model_draining"

    model: str
    in_flight: int  # requests still running on it, when the drain began
    time: float

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "model": self.model, "in_flight": self.in_flight, "time": self.time}


@dataclass(frozen=True)
class EdgeChanged(_Wire):
    """The HTTPS edge's state changed (edge/sync.py): ``ok``, ``down`` or ``rejected``, with the error."""

    type: ClassVar[str] = "edge"

    state: str
    error: str | None
    time: float

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "state": self.state, "error": self.error, "time": self.time}


@dataclass(frozen=True)
class LeadershipChanged(_Wire):
    """This controller took the lead (``leading``) or lost it (``lost``, with the reason) under leader election;
    ``term`` is the fencing token of the term, ``holder`` this controller's identity in the lease."""

    type: ClassVar[str] = "leadership"

    state: str
    term: int | None
    holder: str
    error: str | None
    time: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "state": self.state,
            "term": self.term,
            "holder": self.holder,
            "error": self.error,
            "time": self.time,
        }


Event = ModelStateChanged | ModelStopFailed | ModelDraining | EdgeChanged | LeadershipChanged


def event_model(event: Event) -> str:
    """The model an event is about, "" for one about no model (the edge, leadership): what a model allow-list is
    asked."""
    return event.model if isinstance(event, ModelStateChanged | ModelStopFailed | ModelDraining) else ""
