"""Operator probes: ``/healthz`` (the process answers) and ``/readyz`` (start-up done, edge configured)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, current_app

from controller.auth.service import AuthService
from controller.edge.edge import Edge
from controller.lifecycle.supervisor import Supervisor

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@blueprint.get("/readyz")
async def readyz() -> tuple[dict[str, Any], int]:
    """200 once start-up and adoption are done, the edge (when enabled) has its configuration and the store
    is the one opened."""
    supervisor: Supervisor = current_app.extensions["llamacontroller.supervisor"]
    if not supervisor.ready:
        return {"status": "starting"}, 503
    auth: AuthService = current_app.extensions["llamacontroller.auth"]
    problem = await auth.store.problem()
    if problem is not None:
        return {"status": "store failed", "error": problem}, 503
    edge: Edge | None = current_app.extensions.get("llamacontroller.edge")
    if edge is not None and edge.status.state != "ok":
        return {"status": f"edge {edge.status.state}", "edge": edge.public()}, 503
    return {"status": "ready"}, 200
