"""Operator probes: ``/healthz`` (the process answers) and ``/readyz`` (start-up, adoption done)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, current_app

from controller.lifecycle.supervisor import Supervisor

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@blueprint.get("/readyz")
async def readyz() -> tuple[dict[str, Any], int]:
    supervisor: Supervisor = current_app.extensions["llamacontroller.supervisor"]
    if not supervisor.ready:
        return {"status": "starting"}, 503
    return {"status": "ready"}, 200
