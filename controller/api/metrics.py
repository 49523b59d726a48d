"""``GET /metrics`` (``metrics`` scope): the controller's and the gateway's metrics, then every ready backend's
own llama-server metrics with a ``model`` label — one scrape target for the whole machine."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response

from common.upstream import Upstream
from controller.lifecycle.supervisor import Supervisor
from controller.metrics import ControllerMetrics, relabel, scrape_backends
from controller.services import services

blueprint = Blueprint("metrics", __name__)


@blueprint.get("/metrics")
async def metrics() -> Response:
    supervisor: Supervisor = services().supervisor
    upstream: Upstream = services().upstream
    controller: ControllerMetrics = services().metrics
    backends = relabel(await scrape_backends(supervisor, upstream))
    controller.start_known_series()
    body = generate_latest(controller.registry) + backends.encode()
    return Response(body, content_type=CONTENT_TYPE_LATEST)
