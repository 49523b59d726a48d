"""The gateways' reports as the controller keeps them (controller/lifecycle/gateways.py): pure bookkeeping."""

from __future__ import annotations

import pytest

from common.errors import BadRequest
from controller.lifecycle.gateways import NOBODY, GatewayReports, ModelUse, parse_models


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reports_add_up_the_gateways_on_the_current_backend_only() -> None:
    reports = GatewayReports(ttl=10)
    reports.report("g1", 1, {"a": ModelUse({"b1": 2, "old": 5}, queued=1, last_used=50.0)})
    reports.report("g2", 1, {"a": ModelUse({"b1": 1}, last_used=60.0)})
    use = reports.use("a", "b1")
    assert (use.in_flight, use.queued, use.last_used, use.gateways) == (3, 1, 60.0, 2)
    assert reports.use("a", None).in_flight == 0  # no backend: nothing runs on one


def test_a_report_replaces_the_last_and_older_ones_are_ignored() -> None:
    reports = GatewayReports(ttl=10)
    reports.report("g1", 5, {"a": ModelUse({"b1": 2})})
    reports.report("g1", 4, {"a": ModelUse({"b1": 9})})  # late: it was sent before the one above
    assert reports.use("a", "b1").in_flight == 2
    reports.report("g1", 6, {})
    assert reports.use("a", "b1").in_flight == 0


def test_a_hold_counts_until_a_report_made_after_it() -> None:
    reports = GatewayReports(ttl=10)
    reports.report("g1", 3, {})
    reports.hold("g1", 3, "a", "b1")  # ensure answered while the gateway's last report was seq 3
    assert reports.use("a", "b1").in_flight == 1
    reports.report("g1", 3, {})  # a repeat of seq 3: made before the request, the hold stays
    assert reports.use("a", "b1").in_flight == 1
    reports.report("g1", 4, {"a": ModelUse({"b1": 1})})  # made after: the request is in its counts
    assert reports.use("a", "b1").in_flight == 1
    reports.report("g1", 5, {})
    assert reports.use("a", "b1").in_flight == 0


def test_a_silent_gateway_is_forgotten_after_its_ttl() -> None:
    clock = Clock()
    reports = GatewayReports(ttl=10, clock=clock)
    reports.report("g1", 1, {"a": ModelUse({"b1": 4})})
    clock.now += 9
    assert not reports.prune() and reports.use("a", "b1").in_flight == 4
    clock.now += 2
    assert reports.prune() and reports.use("a", "b1") is NOBODY and reports.live() == 0


def test_a_gateway_is_behind_a_drain_until_it_reports_from_its_revision() -> None:
    reports = GatewayReports(ttl=10)
    reports.report("g1", 1, {}, ("e1", 7))
    reports.report("g2", 1, {}, ("e1", 9))
    assert reports.use("a", "b1", ("e1", 8)).behind == 1
    assert reports.use("a", "b1", ("e2", 1)).behind == 2  # another controller's run: nobody has seen it
    reports.report("g1", 2, {}, ("e1", 8))
    assert reports.use("a", "b1", ("e1", 8)).behind == 0


def test_the_latest_keep_alive_asked_wins() -> None:
    reports = GatewayReports(ttl=10)
    reports.report("g1", 1, {"a": ModelUse(keep_alive=0.0, keep_alive_at=20.0)})
    reports.report("g2", 1, {"a": ModelUse(keep_alive=None, keep_alive_at=30.0)})
    use = reports.use("a", "b1")
    assert (use.keep_alive, use.keep_alive_at) == (None, 30.0)


def test_parse_models_refuses_what_the_controller_did_not_make() -> None:
    assert parse_models({"a": {"in_flight": {"b1": 1}, "keep_alive": -1}})["a"].keep_alive == float("inf")
    for bad in (
        [],
        {"a": []},
        {"a": {"in_flight": {"b1": -1}}},
        {"a": {"in_flight": {"b1": True}}},
        {"a": {"queued": 1.5}},
        {"a": {"last_used": "now"}},
        {"a": {"in_flight": {str(n): 1 for n in range(65)}}},
    ):
        with pytest.raises(BadRequest):
            parse_models(bad)
