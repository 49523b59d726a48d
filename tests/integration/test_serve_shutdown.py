"""`llamacontroller serve` stops on SIGTERM while a client holds an event stream open: the stream ends cleanly
when the shutdown begins, and a stop_timeout under a second (or 0, "now") is a short grace, never "wait forever"."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.server import ServeProcess, real_config, serve_subprocess

DEADLINE = 60.0  # seconds the process gets to exit; the defect was never


def open_events(served: ServeProcess, client: httpx.Client) -> tuple[httpx.Response, Iterator[str]]:
    """The events stream, open (its first comment has arrived), and its lines to come."""
    request = client.build_request("GET", f"{served.url}/control/v1/events", headers=served.headers)
    response = client.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(lines) == ": connected"
    return response, lines


@pytest.mark.parametrize("stop_timeout", [0.5, 0])
def test_serve_sigterm_with_an_open_event_stream_exits(tmp_path: Path, tiny_model: Path, stop_timeout: float) -> None:
    config = real_config(tmp_path, {"tiny": {"path": str(tiny_model)}}, runtime={"stop_timeout": stop_timeout})
    with serve_subprocess(config, tmp_path) as served, httpx.Client(timeout=DEADLINE) as client:
        events, _ = open_events(served, client)
        served.process.send_signal(signal.SIGTERM)
        try:
            served.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {DEADLINE:.0f} s of SIGTERM:\n{served.output()[-3000:]}")
        events.close()
    assert "Application shutdown complete" in served.output()


def test_serve_sigterm_ends_event_streams_cleanly(tmp_path: Path, tiny_model: Path) -> None:
    """A long grace is for answers still running; an event stream ends at once, with a complete answer (not
    cut off when the grace runs out)."""
    config = real_config(tmp_path, {"tiny": {"path": str(tiny_model)}}, runtime={"stop_timeout": "30s"})
    with serve_subprocess(config, tmp_path) as served, httpx.Client(timeout=DEADLINE) as client:
        events, lines = open_events(served, client)
        served.process.send_signal(signal.SIGTERM)
        rest = list(lines)  # raises if the answer is cut off; returns once it ended
        events.close()
        served.process.wait(DEADLINE)
    assert all(line in ("", ": ping") for line in rest), rest
    output = served.output()
    assert "timeout graceful shutdown exceeded" not in output
    assert "Application shutdown complete" in output
