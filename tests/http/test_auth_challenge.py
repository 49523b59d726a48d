"""Every 401 names its challenge (RFC 9110: ``WWW-Authenticate``), whichever part of the API gave it — the
authentication layer, the sign-in call, the edge's forward-auth check — and the web page gives none (a failed
sign-in is the form again; a form sent without a session goes to the sign-in page)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from quart import Quart

from controller.auth.admin import Administration
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from tests.support.harness import fake_app, fake_config

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/api/tags", {}),
    ("POST", "/api/chat", {"json": CHAT}),
    ("GET", "/v1/models", {}),
    ("POST", "/v1/chat/completions", {"json": CHAT}),
    ("GET", "/llama/a/health", {}),
    ("GET", "/control/v1/models", {}),
    ("GET", "/control/v1/events", {}),
    ("GET", "/control/v1/system", {}),
    ("GET", "/control/v1/tokens", {}),
    ("GET", "/metrics", {}),
    ("GET", "/auth/session", {}),
    ("POST", "/auth/logout", {}),
    ("POST", "/auth/login", {"json": {"username": "root", "password": "wrong-password"}}),
    ("GET", "/auth/verify", {"headers": {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/tags"}}),
]


@pytest.fixture
async def app(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Quart]:
    config = fake_config(tmp_path, tiny_model, {"a": {}}, auth={"enabled": True})
    app = fake_app(config, FakeRuntime())
    async with app.test_app():
        service: Administration = services_of(app).admin
        await service.add_user("root", "root-password", "admin", "tests")
        yield app


@pytest.mark.parametrize("credentials", [{}, {"Authorization": "Bearer lc_0123456789abcdef_wrong"}])
@pytest.mark.parametrize(("method", "path", "options"), REQUESTS)
async def test_challenge_every_401_of_the_api_names_its_scheme(
    app: Quart, method: str, path: str, options: dict[str, Any], credentials: dict[str, str]
) -> None:
    headers = {**options.get("headers", {}), **credentials}
    sent = {key: value for key, value in options.items() if key != "headers"}
    response = await app.test_client().open(path, method=method, headers=headers, **sent)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="llamacontroller"'


async def test_challenge_the_web_page_answers_no_401(app: Quart) -> None:
    client = app.test_client()
    wrong = await client.post("/ui/login", form={"username": "root", "password": "wrong-password"})
    assert wrong.status_code == 200 and "Wrong user name or password." in await wrong.get_data(as_text=True)
    for path in ("/ui/models/a/load", "/ui/tokens", "/ui/logout"):
        sent = await client.post(path, form={"csrf_token": "x"})
        assert sent.status_code == 303 and sent.headers["Location"].startswith("/ui/login"), path
