"""render(): a golden file for each TLS mode; each one passes `caddy validate`.

Rewrite the golden files after an intended change with ``UPDATE_GOLDEN=1 pytest tests/unit/test_edge_render.py``
and read the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.errors import LlamaControllerError
from controller.config import validate_config
from controller.edge.child import find_caddy
from controller.edge.edge import edge_settings
from controller.edge.render import EdgeSettings, render
from tests.support.server import require

GOLDEN = Path(__file__).parent / "golden" / "edge"
BASE = {"listen": "127.0.0.1:11443", "admin_listen": "127.0.0.1:11445", "app": "127.0.0.1:11434"}
EMBEDDED = "/var/lib/llamacontroller/caddy"
SETTINGS = {
    "internal": EdgeSettings(  # the embedded shape: admin API on a private socket, metrics alone on loopback
        **{**BASE, "admin_listen": f"unix/{EMBEDDED}/admin.sock|0600"},
        storage=f"{EMBEDDED}/data",
        log_file=f"{EMBEDDED}/caddy.log",
        metrics_listen="127.0.0.1:11445",
    ),
    "files": EdgeSettings(
        **{**BASE, "listen": "0.0.0.0:443"},
        tls_mode="files",
        hostname="llm.example.com",
        cert_file="/etc/llamacontroller/tls.crt",
        key_file="/etc/llamacontroller/tls.key",
        http_redirect="0.0.0.0:80",
    ),
    "acme": EdgeSettings(
        **{**BASE, "listen": "0.0.0.0:443", "admin_listen": "0.0.0.0:2019", "app": "controller:11434"},
        tls_mode="acme",
        hostname="llm.example.com",
        email="ops@example.com",
        http_redirect="0.0.0.0:80",
    ),
}


@pytest.mark.parametrize("mode", SETTINGS)
def test_edge_render_matches_its_golden_file(mode: str) -> None:
    path = GOLDEN / f"{mode}.json"
    text = json.dumps(render(SETTINGS[mode]), indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path.name} differs: rerun with UPDATE_GOLDEN=1 if the change is intended"


@pytest.mark.parametrize("mode", SETTINGS)
def test_edge_render_passes_caddy_validate(mode: str, tmp_path: Path) -> None:
    try:
        caddy = find_caddy(None)
    except LlamaControllerError as exc:
        require(False, exc.message)
        raise
    config = render(SETTINGS[mode])
    if mode == "files":  # validate loads the certificate files: give it a real pair
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llm.example.com"]
        subprocess.run(
            ["openssl", *request, "-keyout", key, "-out", cert],
            check=True,
            capture_output=True,
        )
        files = config["apps"]["tls"]["certificates"]["load_files"][0]
        files.update(certificate=str(cert), key=str(key))
    path = tmp_path / "caddy.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([caddy, "validate", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_edge_render_keeps_the_admin_block_and_sends_llama_paths_to_the_app() -> None:
    """No per-model routes: a model loading or unloading must never make Caddy reload (see render's docstring)."""
    config = render(SETTINGS["internal"])
    assert config["admin"] == {"listen": f"unix/{EMBEDDED}/admin.sock|0600", "config": {"persist": False}}
    text = json.dumps(config)
    assert text.count('"dial"') == 1 and '"dial": "127.0.0.1:11434"' in text, "the app is the only upstream"
    last = config["apps"]["http"]["servers"]["edge"]["routes"][-1]
    assert "match" not in last and last["handle"][-1]["upstreams"] == [{"dial": "127.0.0.1:11434"}]


@pytest.mark.parametrize("mode", sorted(SETTINGS))
def test_edge_render_lets_caddy_replace_a_client_x_forwarded_for(mode: str) -> None:
    """The app takes the client's address from the edge's X-Forwarded-For: Caddy writes it afresh unless a
    server trusts the peer in front of it (trusted_proxies), and no handler may pass a client's copy on."""
    text = json.dumps(render(SETTINGS[mode]))
    assert "trusted_proxies" not in text and "client_ip_headers" not in text
    assert "X-Forwarded-For" not in text


def test_edge_render_hsts_only_for_a_real_hostname() -> None:
    def common_headers(mode: str) -> dict[str, Any]:
        routes = render(SETTINGS[mode])["apps"]["http"]["servers"]["edge"]["routes"]
        response: dict[str, Any] = routes[0]["handle"][0]["response"]["set"]
        return response

    assert "Strict-Transport-Security" not in common_headers("internal")
    assert common_headers("acme")["Strict-Transport-Security"] == ["max-age=31536000"]
    assert common_headers("files")["Strict-Transport-Security"] == ["max-age=31536000"]


def test_edge_render_internal_certificates_cover_loopback_names() -> None:
    tls = render(SETTINGS["internal"])["apps"]["tls"]
    assert tls["certificates"]["automate"] == ["localhost", "127.0.0.1", "::1"]
    assert tls["automation"]["policies"][0]["issuers"] == [{"module": "internal"}]


def test_edge_image_bootstraps_agree() -> None:
    """The registry Dockerfile's bootstrap file and the local image's are the same document."""
    from llamacontroller.images import EDGE_BOOTSTRAP

    committed = (Path(__file__).resolve().parents[2] / "images" / "edge" / "bootstrap.json").read_text()
    assert json.loads(committed) == json.loads(EDGE_BOOTSTRAP)


def test_edge_settings_embedded_admin_api_is_a_private_socket(tmp_path: Path) -> None:
    """Supervised, Caddy's admin API (no authentication) is a unix socket of mode 0600 in the data dir, never a
    TCP port another local user could reach; edge.admin then serves Caddy's metrics and nothing else."""
    raw = {"server": {"data_dir": str(tmp_path)}, "edge": {"admin": "127.0.0.1:11999"}}
    settings = edge_settings(validate_config(raw))
    assert settings.admin_listen == f"unix/{tmp_path}/caddy/admin.sock|0600"
    assert settings.metrics_listen == "127.0.0.1:11999" and settings.log_file == f"{tmp_path}/caddy/caddy.log"
    metrics = render(settings)["apps"]["http"]["servers"]["metrics"]
    assert metrics["listen"] == ["127.0.0.1:11999"]
    assert [route["handle"][0]["handler"] for route in metrics["routes"]] == ["metrics", "static_response"]


def test_edge_settings_unsupervised_admin_api_is_where_the_config_says(tmp_path: Path) -> None:
    raw = {"server": {"data_dir": str(tmp_path)}, "edge": {"supervise": False, "admin": "edge:2019"}}
    settings = edge_settings(validate_config({**raw, "edge": {**raw["edge"], "admin_listen": "0.0.0.0:2019"}}))
    assert settings.admin_listen == "0.0.0.0:2019"
    assert settings.metrics_listen is None and settings.log_file is None and settings.storage is None


def test_edge_errors_tell_an_unreachable_app_from_an_unreadable_request() -> None:
    """Caddy answers 502 for a refused dial and for a malformed chunked body alike: only the first is "not
    reachable" (503); the second is the client's 400 — each in the dialect of the path."""
    routes = render(SETTINGS["internal"])["apps"]["http"]["servers"]["edge"]["errors"]["routes"]
    by_status = {  # the Ollama paths' answers, by status
        route["handle"][0]["status_code"]: (route["match"][0]["expression"], json.loads(route["handle"][0]["body"]))
        for route in routes
        if "/api/*" in route["match"][0]["path"]
    }
    assert "startsWith('dial ')" in by_status[503][0] and "not reachable" in by_status[503][1]["error"]
    assert "chunk" in by_status[400][0] and "could not be read" in by_status[400][1]["error"]
    assert "not reachable" not in by_status[502][1]["error"]
