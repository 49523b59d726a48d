"""``GET /metrics``: Prometheus text exposition of model state and gateway requests (``metrics`` scope)."""

from __future__ import annotations

from quart import Blueprint, Response, current_app

from controller.api.models import model_json
from controller.lifecycle.state import State
from controller.lifecycle.supervisor import Supervisor
from proxy.app import Gateway

blueprint = Blueprint("metrics", __name__)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(supervisor: Supervisor, gateway: Gateway) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    statuses = [model_json(supervisor.info(entry)) for entry in supervisor.catalog.entries()]
    family("llamacontroller_model_state", "gauge", "1 for the state each model is in")
    for status in statuses:
        for state in State:
            value = 1 if status["state"] == state else 0
            lines.append(f'llamacontroller_model_state{{model="{_label(status["name"])}",state="{state}"}} {value}')
    per_model = (
        ("llamacontroller_model_in_flight", "gauge", "requests being served", "in_flight"),
        ("llamacontroller_model_queued", "gauge", "requests waiting for the model or a slot", "queued"),
        ("llamacontroller_model_starts_total", "counter", "backends started", "starts"),
        ("llamacontroller_model_consecutive_failures", "gauge", "failed starts or crashes in a row", "failures"),
        ("llamacontroller_model_load_seconds", "gauge", "duration of the last load", "load_duration"),
    )
    for name, kind, help_text, field in per_model:
        family(name, kind, help_text)
        lines += [f'{name}{{model="{_label(s["name"])}"}} {s[field]}' for s in statuses]
    family("llamacontroller_requests_total", "counter", "gateway requests by route, model and status")
    for (route, model, code), count in sorted(gateway.stats.count.items()):
        labels = f'route="{_label(route)}",model="{_label(model)}",status="{code}"'
        lines.append(f"llamacontroller_requests_total{{{labels}}} {count}")
    family("llamacontroller_request_seconds_total", "counter", "time spent answering those requests")
    for (route, model, code), seconds in sorted(gateway.stats.seconds.items()):
        labels = f'route="{_label(route)}",model="{_label(model)}",status="{code}"'
        lines.append(f"llamacontroller_request_seconds_total{{{labels}}} {seconds:.6f}")
    return "\n".join(lines) + "\n"


@blueprint.get("/metrics")
async def metrics() -> Response:
    supervisor: Supervisor = current_app.extensions["llamacontroller.supervisor"]
    gateway: Gateway = current_app.extensions["llamacontroller.gateway"]
    return Response(render(supervisor, gateway), content_type="text/plain; version=0.0.4; charset=utf-8")
