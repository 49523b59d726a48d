"""The client's address behind the edge: X-Forwarded-For from a trusted proxy (the edge) names the client for
the sign-in throttle, the audit log and the access log; from anyone else it is ignored.

The test client's requests come from ``EDGE`` (the TCP peer, as Caddy's are); ``server.trusted_proxies`` decides
whether that peer is believed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from quart import Quart

from common.peers import TrustedProxies
from controller.auth.admin import Administration
from controller.auth.authenticate import Authenticator
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from tests.support.harness import fake_app, fake_config

EDGE = "127.0.0.1"
AUTH = {"enabled": True, "login_max_failures": 3}


@pytest.fixture
async def make_app(tmp_path: Path, tiny_model: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start the app with these ``server.trusted_proxies``; root's password is root-password."""
    started: list[Any] = []

    async def start(trusted: list[str] | None = None) -> Quart:
        server: dict[str, Any] = {"data_dir": str(tmp_path / "data")}
        if trusted is not None:
            server["trusted_proxies"] = trusted
        app = fake_app(fake_config(tmp_path, tiny_model, {"a": {}}, auth=AUTH, server=server), FakeRuntime())
        context = app.test_app()
        await context.__aenter__()
        started.append(context)
        service: Administration = services_of(app).admin
        await service.add_user("root", "root-password", "admin", "tests")
        return app

    yield start
    for context in started:
        await context.__aexit__(None, None, None)


async def sign_in(app: Quart, password: str, forwarded: str | None, path: str = "/auth/login") -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    client = app.test_client(use_cookies=False)
    scope = {"client": (EDGE, 40000)}
    if path == "/auth/login":
        body = {"username": "root", "password": password}
        response = await client.post(path, json=body, headers=headers, scope_base=scope)
    else:
        form = {"username": "root", "password": password, "next": "/ui/"}
        response = await client.post(path, form=form, headers=headers, scope_base=scope)
    return response.status_code


@pytest.mark.parametrize("path", ["/auth/login", "/ui/login"])
async def test_client_address_one_client_behind_the_edge_does_not_lock_out_another(
    make_app: Callable[..., Any], path: str
) -> None:
    app = await make_app()  # the default: loopback, where the embedded edge connects from
    for _ in range(3):  # the API answers 401; the sign-in form, the form again with the message
        assert await sign_in(app, "wrong-password", "203.0.113.7", path) == {"/auth/login": 401, "/ui/login": 200}[path]
    assert await sign_in(app, "root-password", "203.0.113.7", path) == 429, "the guessing client is throttled"
    # Before: every request through the edge came from 127.0.0.1, so the admin was locked out too.
    assert await sign_in(app, "root-password", "198.51.100.20", path) in (200, 303)


async def test_client_address_is_the_one_the_edge_appended(make_app: Callable[..., Any]) -> None:
    """A proxy in front of the edge may have passed a list on: only the last entry, the edge's own, counts."""
    app = await make_app()
    for spoofed in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert await sign_in(app, "wrong-password", f"{spoofed}, 203.0.113.7") == 401
    assert await sign_in(app, "root-password", "192.0.2.4, 203.0.113.7") == 429


async def test_client_address_forwarded_by_an_untrusted_peer_is_ignored(make_app: Callable[..., Any]) -> None:
    """A client that reaches the app directly (another pod) cannot pick a new address for each guess."""
    app = await make_app(["10.1.2.3"])  # the edge is elsewhere: EDGE is just a client
    for spoofed in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        assert await sign_in(app, "wrong-password", spoofed) == 401
    assert await sign_in(app, "root-password", "203.0.113.4") == 429


async def test_client_address_in_the_audit_log_and_the_access_log(
    make_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llamacontroller.access")
    app = await make_app()
    assert await sign_in(app, "wrong-password", "203.0.113.7") == 401
    service: Administration = services_of(app).admin
    failed = [event for event in await service.store.list_audit() if event.action == "login_failed"]
    assert [event.detail["client"] for event in failed] == ["203.0.113.7"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /auth/login")]
    assert lines and lines[-1].endswith("client=203.0.113.7")


def test_client_address_trusted_proxies_by_address_network_and_name() -> None:
    def scope(peer: str, *forwarded: bytes) -> dict[str, Any]:
        return {"client": (peer, 1234), "headers": [(b"x-forwarded-for", value) for value in forwarded]}

    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1"])
    assert proxies.client(scope("10.9.8.7", b"203.0.113.7")) == "203.0.113.7"
    assert proxies.client(scope("::ffff:127.0.0.1", b"2001:db8::1")) == "2001:db8::1"
    assert proxies.client(scope("11.0.0.1", b"203.0.113.7")) == "11.0.0.1", "not a trusted peer"
    assert proxies.client(scope("127.0.0.1", b"not-an-address")) == "127.0.0.1", "nonsense is not an address"
    assert proxies.client(scope("127.0.0.1", b"203.0.113.1", b"203.0.113.7")) == "203.0.113.7"
    assert proxies.client(scope("127.0.0.1")) == "127.0.0.1", "no header: the peer itself"
    assert proxies.client({"headers": []}) == ""


async def test_client_address_trusted_proxy_names_are_resolved() -> None:
    proxies = TrustedProxies(["localhost"])
    assert not proxies.trusts("127.0.0.1")
    await proxies.resolve()
    assert proxies.trusts("127.0.0.1")


async def test_client_address_guesses_from_many_claimed_addresses_are_bounded_per_user(
    make_app: Callable[..., Any],
) -> None:
    """A local user on the trusted loopback listener can claim any address: the account's own bound holds."""
    app = await make_app()
    service: Authenticator = services_of(app).auth
    service.settings = service.settings.model_copy(update={"login_max_failures_per_user": 6})
    for n in range(6):  # two guesses per claimed address: under the per-address bound of 3
        assert await sign_in(app, "wrong-password", f"203.0.113.{n // 2}") == 401
    assert await sign_in(app, "root-password", "203.0.113.99") == 429, "a fresh address does not reset the account"
