"""The events stream's wire shape: each kind of event (controller/events.py) leaves ``/control/v1/events`` as the
JSON its clients read (docs/api.md), key for key, in order, byte for byte."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from quart.testing import connections

from controller.events import EdgeChanged, Event, LeadershipChanged, ModelStateChanged, ModelStopFailed
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from tests.support.harness import fake_app, fake_config

# Each kind, with every optional field present and absent, and the exact line a client has always received.
WIRE: list[tuple[Event, str]] = [
    (
        ModelStateChanged("a:latest", "starting", "ready", None, 1700000000.5, 0.25),
        '{"type": "model_state", "model": "a:latest", "from": "starting", "state": "ready", "error": null, '
        '"time": 1700000000.5, "load_seconds": 0.25}',
    ),
    (
        ModelStateChanged("a:latest", "starting", "ready", None, 1700000000.5, 0.0),  # adopted: 0, still sent
        '{"type": "model_state", "model": "a:latest", "from": "starting", "state": "ready", "error": null, '
        '"time": 1700000000.5, "load_seconds": 0.0}',
    ),
    (
        ModelStateChanged("a:latest", "starting", "failed", "model 'a' failed to load: \"boom\" ✗", 1700000001.0),
        '{"type": "model_state", "model": "a:latest", "from": "starting", "state": "failed", '
        '"error": "model \'a\' failed to load: \\"boom\\" \\u2717", "time": 1700000001.0}',
    ),
    (
        ModelStopFailed("a:latest", "stopping", "pid-7", "did not stop", 2, 1.0, 1700000002.0),
        '{"type": "model_stop_failed", "model": "a:latest", "state": "stopping", "handle": "pid-7", '
        '"error": "did not stop", "failures": 2, "retry_in": 1.0, "time": 1700000002.0}',
    ),
    (
        EdgeChanged("down", "caddy exited", 1700000003.0),
        '{"type": "edge", "state": "down", "error": "caddy exited", "time": 1700000003.0}',
    ),
    (
        EdgeChanged("ok", None, 1700000004.0),
        '{"type": "edge", "state": "ok", "error": null, "time": 1700000004.0}',
    ),
    (
        LeadershipChanged("leading", 7, "host-12-ab12cd34", None, 1700000005.0),
        '{"type": "leadership", "state": "leading", "term": 7, "holder": "host-12-ab12cd34", "error": null, '
        '"time": 1700000005.0}',
    ),
    (
        LeadershipChanged("lost", 7, "host-12-ab12cd34", "another controller holds the lease", 1700000006.0),
        '{"type": "leadership", "state": "lost", "term": 7, "holder": "host-12-ab12cd34", '
        '"error": "another controller holds the lease", "time": 1700000006.0}',
    ),
]

MODEL_STATE_KEYS = ["type", "model", "from", "state", "error", "time"]


def test_event_each_kind_serialises_to_its_wire_shape() -> None:
    for event, wire in WIRE:
        assert event.to_json() == wire
        assert json.dumps(event.as_dict()) == wire
        assert event.as_dict()["type"] == event.type


async def read_until(connection: connections.TestHTTPConnection, received: bytearray, done: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not done():
            received.extend(await connection.receive())


async def test_event_stream_sends_each_kind_byte_for_byte(tmp_path: Path, tiny_model: Path) -> None:
    app = fake_app(fake_config(tmp_path, tiny_model, {"a": {}}), FakeRuntime())
    async with app.test_app():
        received = bytearray()
        async with app.test_client().request("/control/v1/events") as connection:
            await connection.send_complete()
            await read_until(connection, received, lambda: b": connected\n\n" in received)  # subscribed
            for event, _ in WIRE:
                services_of(app).events.publish(event)
            expected = b"".join(f"data: {wire}\n\n".encode() for _, wire in WIRE)
            await read_until(connection, received, lambda: expected in received)
            await connection.disconnect()
        assert bytes(received) == b": connected\n\n" + expected


async def test_event_stream_of_a_load_and_an_unload(tmp_path: Path, tiny_model: Path) -> None:
    """What the lifecycle itself publishes: the fields of each state event, in order, and load_seconds on ready."""
    app = fake_app(fake_config(tmp_path, tiny_model, {"a": {}}), FakeRuntime())
    async with app.test_app():
        client = app.test_client()
        received = bytearray()
        async with client.request("/control/v1/events") as connection:
            await connection.send_complete()
            await read_until(connection, received, lambda: b": connected\n\n" in received)
            assert (await client.post("/control/v1/models/a/load")).status_code == 200
            assert (await client.post("/control/v1/models/a/unload")).status_code == 200
            await read_until(connection, received, lambda: received.count(b"data: ") >= 5)
            await connection.disconnect()
        published = [
            json.loads(line[6:]) for line in bytes(received).decode().splitlines() if line.startswith("data: ")
        ]
        draining = [event for event in published if event["type"] == "model_draining"]
        assert len(draining) == 1 and list(draining[0]) == ["type", "model", "in_flight", "time"]
        assert draining[0]["model"] == "a:latest" and draining[0]["in_flight"] == 0
        events = [event for event in published if event["type"] == "model_state"]
        assert published.index(draining[0]) == 2  # after ready, before the stop begins
        assert [(event["from"], event["state"]) for event in events] == [
            ("stopped", "starting"),
            ("starting", "ready"),
            ("ready", "stopping"),
            ("stopping", "stopped"),
        ]
        for event in events:
            keys = MODEL_STATE_KEYS + (["load_seconds"] if event["state"] == "ready" else [])
            assert list(event) == keys
            assert event["type"] == "model_state" and event["model"] == "a:latest" and event["error"] is None
            assert isinstance(event["time"], float)
        assert isinstance(events[1]["load_seconds"], float)
