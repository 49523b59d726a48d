"""The serve log as an operator reads it: `llamacontroller serve` for real, its stderr in a file."""

from __future__ import annotations

from pathlib import Path

import httpx

from controller.runtime.process import free_port
from tests.support.server import real_config, serve_subprocess

FORGED = "2026-01-01 00:00:00,000 INFO llamacontroller.access: POST /auth/login model=- status=200"


def test_serve_log_a_path_cannot_write_a_forged_line(tmp_path: Path, tiny_model: Path) -> None:
    config = real_config(tmp_path, {"tiny": {"path": str(tiny_model)}})
    config["server"]["listen"] = f"127.0.0.1:{free_port()}"
    with serve_subprocess(config, tmp_path) as served:
        encoded = "/api/x%0a" + FORGED.replace(" ", "%20").replace(":", "%3A")
        assert served.http.get(encoded).status_code == 404
        chat = {"model": "tiny\n" + FORGED, "messages": [{"role": "user", "content": "hi"}]}
        assert served.http.post("/api/chat", json=chat).status_code == 400
        unauthenticated = httpx.get(f"{served.url}/api/tags", headers={"X-Request-Id": "probe-7"})
        assert unauthenticated.status_code == 401
    lines = served.output().splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:10])], "a line began with the forged text"
    assert any("/api/x\\n2026-01-01" in line and " status=404 " in line for line in lines)
    assert any("model=tiny\\n2026-01-01" in line and " status=400 " in line for line in lines)
    assert any("GET /api/tags model=- status=401 " in line and " id=probe-7 " in line for line in lines)
