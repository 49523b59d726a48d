"""Operator probes: ``/healthz`` (the process answers) and ``/readyz`` (the controller can serve).

Readiness is the controller's own: leading (leader election: a standby is not ready, so that a Service sends
control traffic to the leader), start-up and adoption done, the store the one opened. The edge (Caddy) is a
separate program with its own probes; its state is reported here (in ``/readyz``'s answer and as
``llamacontroller_edge_state``) but never fails readiness: in Kubernetes ``/readyz`` is the controller's
readiness probe, and an edge problem would take the control plane, the one thing that can report and repair
it, out of its Service.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from quart import Blueprint

from controller.edge.edge import Edge
from controller.lifecycle.supervisor import Supervisor
from controller.services import services

blueprint = Blueprint("health", __name__)

EDGE_STATES = ("starting", "ok", "down", "rejected")


@blueprint.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@blueprint.get("/readyz")
async def readyz() -> tuple[dict[str, Any], int]:
    """200 once this controller leads, start-up and adoption are done and the store is the one opened; with the
    edge enabled, the answer also says how the edge is (``"edge": {"state", "error"}``), whatever it is."""
    supervisor: Supervisor = services().supervisor
    edge = services().edge
    leadership = services().leadership
    shown = {"edge": {"state": edge.status.state, "error": edge.status.error}} if edge is not None else {}
    if leadership.lost.is_set():
        return {"status": "lost leadership", "error": f"lost the lead: {leadership.reason}; ending", **shown}, 503
    if not leadership.leading:  # so a Service sends control traffic to the leader only
        return {"status": "standby", "error": "standby: another controller leads", **shown}, 503
    if not supervisor.ready:
        return {"status": "starting", **shown}, 503
    problem = await services().store.problem()
    if problem is not None:
        return {"status": "store failed", "error": problem, **shown}, 503
    return {"status": "ready", **shown}, 200


class EdgeState(Collector):
    """``llamacontroller_edge_state{state}``: 1 for the edge's current state, read when Prometheus scrapes."""

    def __init__(self, edge: Edge) -> None:
        self._edge = edge

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "llamacontroller_edge_state",
            "1 for the HTTPS edge's current state (ok: Caddy serves the current configuration)",
            labels=["state"],
        )
        current = self._edge.status.state
        for state in EDGE_STATES:
            gauge.add_metric([state], 1.0 if state == current else 0.0)
        yield gauge
