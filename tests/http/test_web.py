"""The web page without a browser: plain forms and redirects (what works without JavaScript), access rules,
CSRF, security headers, secrets never shown. The browser tier (tests/browser) drives the same pages in Chromium."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from controller.auth.admin import Administration
from controller.auth.authenticate import SESSION_COOKIE
from controller.runtime.fake import FakeBehaviour, FakeRuntime
from controller.services import services_of
from controller.web.present import redact, safe_next, size, until
from tests.support.harness import fake_app, fake_config
from tests.support.standin import StandIn


@dataclass
class World:
    app: Quart
    client: Client
    runtime: FakeRuntime


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path) -> AsyncIterator[World]:
    config = fake_config(
        tmp_path,
        tiny_model,
        {"a": {}, "b": {}},
        auth={"enabled": True},
        store={"redis_url": "redis://:hunter2@redis.internal:6379/0"},
        llama_server={"env": {"HF_TOKEN": "hf_secret_value"}},
    )
    async with StandIn() as standin:
        runtime = FakeRuntime(backend_url=standin.url)
        app = fake_app(config, runtime)
        async with app.test_app():
            service: Administration = services_of(app).admin
            await service.add_user("root", "root-password", "admin", "tests")
            await service.add_user("bob", "bob-password", "user", "tests", ("a",))
            yield World(app, app.test_client(), runtime)


async def sign_in(world: World, user: str, password: str) -> str:
    """Signs the client in (its cookie jar keeps the session); returns the page's CSRF token."""
    answer = await world.client.post("/ui/login", form={"username": user, "password": password, "next": "/ui/"})
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/"
    page = await (await world.client.get("/ui/")).get_data(as_text=True)
    found = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page)
    assert found
    return found.group(1)


async def test_web_pages_need_a_session(world: World) -> None:
    for path in ("/ui/", "/ui/tokens", "/ui/users", "/ui/system", "/ui/models/a/logs"):
        answer = await world.client.get(path)
        assert answer.status_code == 302 and answer.headers["location"] == f"/ui/login?next={path}"


async def test_web_wrong_password_and_throttling_say_so(world: World) -> None:
    """The form again with the message, as a page: not a 401, which is HTTP authentication's answer and needs a
    WWW-Authenticate challenge a sign-in form has none of (browsers log it as an error)."""
    for _ in range(5):
        wrong = await world.client.post("/ui/login", form={"username": "root", "password": "nope"})
        assert wrong.status_code == 200 and "WWW-Authenticate" not in wrong.headers
        page = await wrong.get_data(as_text=True)
        assert "Wrong user name or password." in page and 'action="/ui/login"' in page
        assert SESSION_COOKIE not in wrong.headers.get("Set-Cookie", "")
    throttled = await world.client.post("/ui/login", form={"username": "root", "password": "nope"})
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
    assert "Too many failed sign-ins" in await throttled.get_data(as_text=True)


async def test_web_a_form_sent_without_a_session_goes_to_the_sign_in_page(world: World) -> None:
    """A session that ended under an open page: its next form goes to the sign-in page, never a 401 page."""
    plain = await world.client.post("/ui/models/a/load", form={"csrf_token": "x"})
    assert plain.status_code == 303 and plain.headers["Location"] == "/ui/login?next=/ui/"
    fragment = await world.client.post("/ui/models/a/load", form={"csrf_token": "x"}, headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and fragment.headers["HX-Redirect"] == "/ui/login?next=/ui/"


def test_web_next_stays_on_this_site() -> None:
    assert safe_next("/ui/tokens") == "/ui/tokens"
    for hostile in ("//evil.example/x", "https://evil.example", "/\\evil", "", None, "/ui/\r\nx"):
        assert safe_next(hostile) == "/ui/"


async def test_web_dashboard_lists_models_and_loads_without_javascript(world: World) -> None:
    csrf = await sign_in(world, "root", "root-password")
    page = await (await world.client.get("/ui/")).get_data(as_text=True)
    assert 'id="model-a-latest"' in page and 'id="model-b-latest"' in page
    loaded = await world.client.post("/ui/models/a/load", form={"csrf_token": csrf})
    assert loaded.status_code == 303 and loaded.headers["location"] == "/ui/"
    page = await (await world.client.get("/ui/")).get_data(as_text=True)
    assert re.search(r'id="model-a-latest" data-state="ready"', page)
    fragment = await world.client.post("/ui/models/a/unload", form={"csrf_token": csrf}, headers={"HX-Request": "true"})
    row = await fragment.get_data(as_text=True)
    assert fragment.status_code == 200 and row.lstrip().startswith('<tr id="model-a-latest" data-state="stopped"')


async def test_web_a_failed_load_without_javascript_says_why_on_the_dashboard(world: World) -> None:
    world.runtime.behaviours["b:latest"] = FakeBehaviour(fail_start="llama-server exited with code 1")
    csrf = await sign_in(world, "root", "root-password")
    failed = await world.client.post("/ui/models/b/load", form={"csrf_token": csrf})
    page = await failed.get_data(as_text=True)
    assert failed.status_code == 502 and failed.headers["content-type"].startswith("text/html")
    assert 'role="alert"' in page and "llama-server exited with code 1" in page
    assert re.search(r'id="model-b-latest" data-state="failed"', page)
    shown = await (await world.client.get("/ui/?notice=Your+session+expired,+sign+in+at+evil.example")).get_data(
        as_text=True
    )
    assert "evil.example" not in shown, "a message is never taken from the URL"


async def test_web_forms_without_the_csrf_token_are_refused(world: World) -> None:
    await sign_in(world, "root", "root-password")
    for path in ("/ui/models/a/load", "/ui/tokens", "/ui/users", "/ui/logout"):
        refused = await world.client.post(path, form={"name": "x", "csrf_token": "f" * 64})
        assert refused.status_code == 403, path
        assert "CSRF" in await refused.get_data(as_text=True)


async def test_web_tokens_are_made_shown_once_and_revoked(world: World) -> None:
    csrf = await sign_in(world, "bob", "bob-password")
    made = await world.client.post("/ui/tokens", form={"csrf_token": csrf, "name": "laptop", "scopes": "inference"})
    page = await made.get_data(as_text=True)
    secret = re.search(r'id="new-token" readonly value="(lc_[^"]+)"', page)
    assert made.status_code == 201 and secret
    listing = await (await world.client.get("/ui/tokens")).get_data(as_text=True)
    assert secret.group(1) not in listing and "laptop" in listing
    beyond = await world.client.post("/ui/tokens", form={"csrf_token": csrf, "name": "x", "scopes": "admin"})
    assert beyond.status_code == 403 and "scopes you do not have" in await beyond.get_data(as_text=True)
    token_id = secret.group(1).split("_")[1]
    revoked = await world.client.post(f"/ui/tokens/{token_id}/revoke", form={"csrf_token": csrf})
    assert revoked.status_code == 303
    assert "revoked" in await (await world.client.get("/ui/tokens")).get_data(as_text=True)


async def test_web_token_form_numbers_are_checked(world: World) -> None:
    """'²' passes str.isdigit() and then fails int(): the form once answered 500 for it."""
    csrf = await sign_in(world, "bob", "bob-password")
    for rpm, expires in (("²", ""), ("9" * 400, ""), ("0", ""), ("-5", ""), ("", "9" * 400 + "d"), ("", "0d")):
        form = {"csrf_token": csrf, "name": "x", "scopes": "inference", "rpm": rpm, "expires": expires}
        refused = await world.client.post("/ui/tokens", form=form)
        assert refused.status_code == 400, (rpm[:5], expires[:5])
        assert 'role="alert"' in await refused.get_data(as_text=True)
    made = await world.client.post("/ui/tokens", form={"csrf_token": csrf, "name": "x", "rpm": " 30 ", "expires": "2w"})
    assert made.status_code == 201
    bogus = await world.client.post("/ui/tokens", form={"csrf_token": csrf, "name": "x", "scopes": "bogus"})
    assert bogus.status_code == 400, "an unknown scope is refused, not dropped for a token of another kind"


async def test_web_a_user_sees_only_allowed_models_and_no_admin_pages(world: World) -> None:
    await sign_in(world, "bob", "bob-password")
    page = await (await world.client.get("/ui/")).get_data(as_text=True)
    assert 'id="model-a-latest"' in page and "model-b-latest" not in page
    assert "/ui/models/a/load" not in page  # no models:manage: no buttons
    for path in ("/ui/users", "/ui/system", "/ui/models/a/logs"):
        refused = await world.client.get(path)
        assert refused.status_code == 403
        assert "Not allowed" in await refused.get_data(as_text=True)


async def test_web_admin_adds_and_disables_a_user(world: World) -> None:
    csrf = await sign_in(world, "root", "root-password")
    added = await world.client.post(
        "/ui/users", form={"csrf_token": csrf, "name": "carol", "password": "carol-password", "models": "b*"}
    )
    assert added.status_code == 201 and "Added user carol." in await added.get_data(as_text=True)
    disabled = await world.client.post("/ui/users/carol/disable", form={"csrf_token": csrf})
    assert "carol is disabled." in await disabled.get_data(as_text=True)
    own = await world.client.post("/ui/users/root/disable", form={"csrf_token": csrf})
    assert own.status_code == 400 and "cannot disable your own account" in await own.get_data(as_text=True)


async def test_web_system_page_never_shows_secrets(world: World) -> None:
    await sign_in(world, "root", "root-password")
    page = await (await world.client.get("/ui/system")).get_data(as_text=True)
    assert "hunter2" not in page and "hf_secret_value" not in page
    assert "redis://:••••••@redis.internal" in page and "HF_TOKEN: ••••••" in page


async def test_web_security_headers_on_every_page(world: World) -> None:
    answer = await world.client.get("/ui/login")
    assert answer.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'")
    assert answer.headers["X-Frame-Options"] == "DENY" and answer.headers["Cache-Control"] == "no-store"
    assert "<script>" not in await answer.get_data(as_text=True)  # no inline scripts anywhere


async def test_web_sign_out_ends_the_session(world: World) -> None:
    csrf = await sign_in(world, "root", "root-password")
    out = await world.client.post("/ui/logout", form={"csrf_token": csrf})
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert f"{SESSION_COOKIE}=;" in out.headers["Set-Cookie"]
    assert (await world.client.get("/ui/")).status_code == 302


def test_web_presentation_helpers() -> None:
    assert size(253113024) == "253.1 MB" and size(None) == "—"
    assert until(160.0, now=100.0) == "in 1 min" and until(None) == "—"
    shown = redact({"store": {"redis_url": "redis://user:pw@h:1/0"}, "env": {"API_KEY": "x", "PATH": "/bin"}})
    assert shown == {"store": {"redis_url": "redis://user:••••••@h:1/0"}, "env": {"API_KEY": "••••••", "PATH": "/bin"}}
