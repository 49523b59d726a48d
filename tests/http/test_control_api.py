"""The control API and the gateway's error paths through Quart's test client, over the FakeRuntime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from controller.runtime.fake import FakeBehaviour, FakeRuntime
from controller.services import services_of
from tests.support.harness import fake_app, fake_config


@pytest.fixture
async def app(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Quart]:
    config = fake_config(
        tmp_path,
        tiny_model,
        {"a": {"aliases": ["alpha"]}, "b": {}, "broken": {}},
        server={"data_dir": str(tmp_path / "data"), "max_body_bytes": 4096},
    )
    Path(config.models["broken"].path).write_bytes(b"definitely not gguf")
    runtime = FakeRuntime({"b:latest": FakeBehaviour(fail_start="llama-server exited with code 1")})
    application = fake_app(config, runtime)
    async with application.test_app():
        yield application


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


def no_traceback(body: Any) -> None:
    assert "Traceback" not in str(body) and 'File "' not in str(body)


async def test_http_health_and_ready(client: Client) -> None:
    assert (await (await client.get("/healthz")).get_json()) == {"status": "ok"}
    response = await client.get("/readyz")
    assert response.status_code == 200 and (await response.get_json()) == {"status": "ready"}


async def test_http_ready_fails_when_the_store_file_is_deleted_or_replaced(
    app: Quart, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleted or replaced under a running controller, the store's writes went to a file gone at the next
    start, and nothing said so."""
    path = services_of(app).config.store_path
    moved = path.with_name("moved.db")
    path.rename(moved)
    response = await client.get("/readyz")
    body = await response.get_json()
    assert response.status_code == 503 and body["status"] == "store failed"
    assert body["error"] == "the store file was deleted while running", "where the data dir lies is not said"
    assert f"the store file was deleted while running ({path})" in caplog.text
    await client.get("/readyz")
    assert caplog.text.count("was deleted while running") == 1, "said once, not on every probe"
    path.write_bytes(moved.read_bytes())  # a copy in its place: another file all the same
    response = await client.get("/readyz")
    assert response.status_code == 503 and (await response.get_json())["error"] == "the store file was replaced"
    moved.replace(path)  # the very file back: ready again
    assert (await client.get("/readyz")).status_code == 200


async def test_http_models_list_shows_catalog_and_state(client: Client) -> None:
    body = await (await client.get("/control/v1/models")).get_json()
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"a", "b", "broken"}
    a = by_name["a"]
    assert a["state"] == "stopped" and a["aliases"] == ["alpha"] and a["architecture"] == "llama"
    assert a["context_length"] == 2048 and a["parameter_count"] > 0 and a["quantization"] == "F32"
    assert "not a GGUF file" in by_name["broken"]["file_error"]


async def test_http_load_unload_round_trip(client: Client) -> None:
    response = await client.post("/control/v1/models/alpha/load", json={"keep_alive": "10m"})
    body = await response.get_json()
    assert response.status_code == 200
    assert body["name"] == "a" and body["state"] == "ready" and body["backend_url"].startswith("http://")
    assert body["expires_at"] is not None
    response = await client.post("/control/v1/models/a/unload")
    assert (await response.get_json())["state"] == "stopped"


async def test_http_load_failure_is_a_clean_502(client: Client) -> None:
    response = await client.post("/control/v1/models/b/load")
    body = await response.get_json()
    assert response.status_code == 502
    assert body == {"error": "llama-server exited with code 1", "code": "backend_start_failed"}
    state = await (await client.get("/control/v1/models/b")).get_json()
    assert state["state"] == "failed" and state["error"] == "llama-server exited with code 1"


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/control/v1/models/nope/load", None, 404, "model_not_found"),
        ("/control/v1/models/a;reboot/load", None, 400, "invalid_model_name"),
        ("/control/v1/models/broken/load", None, 400, "invalid_model_file"),
        ("/control/v1/models/a/load", b"{not json", 400, "bad_request"),
        ("/control/v1/models/a/load", b"[1, 2]", 400, "bad_request"),
        ("/control/v1/models/a/load", b'{"exclusive": "yes"}', 400, "bad_request"),
        ("/control/v1/models/a/load", b'{"keep_alive": "5"}', 400, "bad_request"),
    ],
)
async def test_http_control_errors_are_clear_4xx(
    client: Client, path: str, body: bytes | None, status: int, code: str
) -> None:
    response = await client.post(path, data=body or b"", headers={"Content-Type": "application/json"})
    payload = await response.get_json()
    assert response.status_code == status, payload
    assert payload["code"] == code and payload["error"]
    no_traceback(payload)


async def test_http_unknown_route_and_method_are_json(client: Client) -> None:
    response = await client.get("/control/v1/nothing-here")
    assert response.status_code == 404 and (await response.get_json())["code"] == "not_found"
    response = await client.delete("/control/v1/models")
    assert response.status_code == 405 and "error" in (await response.get_json())


async def test_http_logs_tail_returns_lines(app: Quart, client: Client) -> None:
    await client.post("/control/v1/models/a/load")
    supervisor = services_of(app).supervisor
    supervisor.logbook.append("a:latest", "srv  load_model: loading model")
    body = await (await client.get("/control/v1/models/a/logs?tail=5")).get_json()
    assert body == {"model": "a", "lines": ["srv  load_model: loading model"]}
    response = await client.get("/control/v1/models/a/logs?tail=lots")
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "kind"),
    [
        ("POST", "/v1/chat/completions", b"{nope", 400, "invalid_request_error"),
        ("POST", "/v1/chat/completions", b"", 400, "invalid_request_error"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "invalid_request_error"),
        ("POST", "/v1/chat/completions", b'{"model": 42}', 400, "invalid_request_error"),
        ("POST", "/v1/chat/completions", b'{"model": "ghost"}', 404, "not_found_error"),
        ("POST", "/v1/completions", b'{"model": "../../etc/passwd"}', 400, "invalid_request_error"),
        ("POST", "/v1/embeddings", b'{"model": "broken", "input": "x"}', 400, "invalid_request_error"),
        ("GET", "/v1/chat/completions", b"", 405, "invalid_request_error"),
        ("POST", "/v1/does-not-exist", b"{}", 404, "not_found_error"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model": "a", "pad": "' + b"x" * 5000 + b'"}',
            413,
            "invalid_request_error",
        ),
        ("GET", "/v1/models/ghost", b"", 404, "not_found_error"),
    ],
)
async def test_http_openai_errors_are_in_openai_shape(
    client: Client, method: str, path: str, body: bytes, status: int, kind: str
) -> None:
    response = await client.open(path, method=method, data=body, headers={"Content-Type": "application/json"})
    payload = await response.get_json()
    assert response.status_code == status, payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["type"] == kind and payload["error"]["message"]
    no_traceback(payload)


async def test_http_openai_models_lists_the_catalog(client: Client) -> None:
    body = await (await client.get("/v1/models")).get_json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == {"a", "b", "broken"}
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])
    single = await (await client.get("/v1/models/alpha")).get_json()
    assert single["id"] == "a"


async def test_http_native_passthrough_errors(client: Client) -> None:
    response = await client.get("/llama/ghost/health")
    assert response.status_code == 404
    response = await client.get("/llama/")
    assert response.status_code == 404


async def test_http_metrics_follow_the_lifecycle(client: Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert (await client.post("/control/v1/models/a/load", json={"keep_alive": "10m"})).status_code == 200
    assert (await client.post("/control/v1/models/b/load")).status_code == 502  # fails to start
    assert (await client.post("/control/v1/models/a/unload")).status_code == 200
    await client.post("/control/v1/models/a/load", json={"keep_alive": "10m"})
    response = await client.get("/metrics")
    text = await response.get_data(as_text=True)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("llamacontroller_model_loads_total", (("model", "a"),))] == 2
    assert samples[("llamacontroller_model_unloads_total", (("model", "a"),))] == 1
    assert samples[("llamacontroller_model_failures_total", (("model", "b"), ("phase", "load")))] == 1
    assert samples[("llamacontroller_model_state", (("model", "a"), ("state", "ready")))] == 1
    assert samples[("llamacontroller_model_state", (("model", "b"), ("state", "failed")))] == 1
    assert 590 < samples[("llamacontroller_model_keep_alive_remaining_seconds", (("model", "a"),))] <= 600
    assert samples[("llamacontroller_model_load_duration_seconds_count", (("model", "a"),))] == 2
