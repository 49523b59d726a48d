"""The Grafana dashboard in docs/ uses only metrics the controller exports (a renamed metric fails here, not
silently on someone's wall). The llama-server families it uses are checked against a real scrape in
tests/integration/test_metrics_real.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from controller.metrics import ControllerMetrics
from proxy.measure import GatewayMetrics
from tests.unit.test_metrics import NoModels

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "llamacontroller.json"
METRIC = re.compile(r"\b(llamacontroller_[a-z_]+|llamacpp:[a-z_]+)\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def used_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {name for expr in expressions(dashboard) for name in METRIC.findall(expr)}


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    ControllerMetrics(registry, NoModels())  # type: ignore[arg-type]
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def test_grafana_dashboard_uses_only_exported_controller_metrics() -> None:
    used = {name for name in used_metrics() if name.startswith("llamacontroller_")}
    assert len(used) >= 12, "the dashboard covers requests, tokens and models"
    assert used <= exported_names(), sorted(used - exported_names())


def test_grafana_dashboard_filters_by_the_model_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    per_model = [e for e in expressions(dashboard) if "model" in e and "llamacontroller_auth" not in e]
    assert all('model=~"$model"' in e for e in per_model if "gateway_added" not in e)
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "model"]
