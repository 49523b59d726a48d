"""The security suite: each case a test, against the app with authentication on (FakeRuntime backends)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from common.errors import ConfigError
from controller.auth import secrets as auth_secrets
from controller.auth.admin import Administration
from controller.auth.authenticate import Authenticator
from controller.auth.secrets import digest, new_token, sign_claims
from controller.config import validate_config
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from controller.store.base import TokenRecord
from controller.store.ephemeral_sqlite import SqliteEphemeral
from tests.support.harness import fake_app, fake_config


@dataclass
class World:
    app: Quart
    client: Client
    service: Administration
    tokens: dict[str, str]
    auth: Authenticator


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path) -> AsyncIterator[World]:
    config = fake_config(
        tmp_path,
        tiny_model,
        {"a": {}, "b": {}},
        auth={"enabled": True, "token_cache_ttl": 0.2, "login_max_failures": 3, "identity_ttl": 1},
    )
    runtime = FakeRuntime()
    app = fake_app(config, runtime)
    async with app.test_app():
        service: Administration = services_of(app).admin
        await service.add_user("root", "root-password", "admin", "tests")
        await service.add_user("alice", "alice-password", "user", "tests")
        tokens: dict[str, str] = {}
        for name, owner, scopes, models, rpm in (
            ("admin", "root", ["admin"], [], None),
            ("inference", "alice", ["inference"], [], None),
            ("only-a", "alice", ["inference"], ["a"], None),
            ("manage", "root", ["models:manage"], [], None),
            ("limited", "alice", ["inference"], [], 120),
            ("metrics", "root", ["metrics"], [], None),
        ):
            tokens[name], _ = await service.create_token(owner, name, scopes, models, None, rpm, "tests")
        # No cookie jar: each test sends exactly the cookies it means to.
        yield World(app, app.test_client(use_cookies=False), service, tokens, services_of(app).auth)


async def get(world: World, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    response = await world.client.get(path, headers=headers or {})
    return response.status_code, await response.get_json(), response.headers


async def test_security_missing_token_is_401_in_each_dialect(world: World) -> None:
    status, body, headers = await get(world, "/api/tags")
    assert status == 401 and body == {"error": "authentication required: send 'Authorization: Bearer <API token>'"}
    assert headers["WWW-Authenticate"] == 'Bearer realm="llamacontroller"'
    status, body, _ = await get(world, "/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body, _ = await get(world, "/control/v1/models")
    assert status == 401 and body["code"] == "unauthenticated"


async def test_security_open_paths_need_no_token(world: World) -> None:
    for path in ("/", "/healthz", "/readyz"):
        assert (await world.client.get(path)).status_code == 200


async def test_security_malformed_token(world: World) -> None:
    status, body, _ = await get(world, "/api/tags", bearer("not-a-token"))
    assert status == 401 and body["error"].startswith("malformed API token")
    status, body, _ = await get(world, "/api/tags", {"Authorization": "Digest abc"})
    assert status == 401 and "unsupported Authorization scheme" in body["error"]


async def test_security_unknown_token_and_wrong_secret(world: World) -> None:
    unknown, _, _ = new_token()
    status, body, _ = await get(world, "/api/tags", bearer(unknown))
    assert (status, body) == (401, {"error": "invalid API token"})
    token_id = world.tokens["inference"].split("_")[1]  # the id never contains "_"; the secret may
    forged = f"lc_{token_id}_" + "A" * 43
    status, body, _ = await get(world, "/api/tags", bearer(forged))
    assert (status, body) == (401, {"error": "invalid API token"})


async def test_security_expired_token(world: World) -> None:
    token, token_id, secret_hash = new_token()
    await world.service.store.add_token(
        TokenRecord(
            id=token_id,
            name="old",
            owner="alice",
            secret_hash=secret_hash,
            scopes=("inference",),
            expires_at=time.time() - 1,
            created_at=time.time() - 100,
        )
    )
    status, body, _ = await get(world, "/api/tags", bearer(token))
    assert (status, body) == (401, {"error": "this API token has expired"})


async def test_security_revoked_token_stops_within_the_cache_ttl(world: World) -> None:
    token = world.tokens["inference"]
    assert (await get(world, "/api/tags", bearer(token)))[0] == 200
    token_id = token.split("_")[1]
    response = await world.client.delete(f"/control/v1/tokens/{token_id}", headers=bearer(world.tokens["admin"]))
    assert response.status_code == 200 and (await response.get_json())["revoked"] is True
    await asyncio.sleep(0.25)
    status, body, _ = await get(world, "/api/tags", bearer(token))
    assert (status, body) == (401, {"error": "this API token has been revoked"})


async def test_security_disabled_owner(world: World) -> None:
    await world.service.set_disabled("alice", True, "tests")
    status, body, _ = await get(world, "/api/tags", bearer(world.tokens["inference"]))
    assert (status, body) == (401, {"error": "the owner of this API token is disabled"})


@pytest.mark.parametrize(
    ("token", "path", "scope"),
    [
        ("inference", "/control/v1/models", "models:manage"),
        ("inference", "/control/v1/audit", "admin"),
        ("manage", "/api/tags", "inference"),
        ("manage", "/control/v1/users", "admin"),
    ],
)
async def test_security_token_without_the_scope_is_403(world: World, token: str, path: str, scope: str) -> None:
    status, body, _ = await get(world, path, bearer(world.tokens[token]))
    assert status == 403
    message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
    assert message == f"this token lacks the '{scope}' scope"


async def test_security_model_allow_list_on_ollama_and_openai(world: World) -> None:
    headers = bearer(world.tokens["only-a"])
    chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    response = await world.client.post("/api/chat", json=chat, headers=headers)
    assert response.status_code == 403
    assert await response.get_json() == {"error": "these credentials may not use model 'b'"}
    response = await world.client.post("/v1/chat/completions", json=chat, headers=headers)
    assert response.status_code == 403 and (await response.get_json())["error"]["type"] == "permission_error"
    response = await world.client.post("/api/chat", json={**chat, "model": "a"}, headers=headers)
    assert response.status_code == 502  # allowed: it reaches the (unreachable, fake) backend
    tags = (await get(world, "/api/tags", headers))[1]
    assert [m["name"] for m in tags["models"]] == ["a:latest"]
    assert [m["id"] for m in (await get(world, "/v1/models", headers))[1]["data"]] == ["a"]
    assert (await world.client.post("/api/show", json={"model": "b"}, headers=headers)).status_code == 403


async def test_security_other_credential_forms(world: World) -> None:
    token = world.tokens["inference"]
    basic = base64.b64encode(f"anyone:{token}".encode()).decode()
    assert (await get(world, "/api/tags", {"Authorization": f"Basic {basic}"}))[0] == 200
    assert (await get(world, "/api/tags", {"x-api-key": token}))[0] == 200


async def verify(world: World, method: str, uri: str, headers: dict[str, str]) -> Any:
    return await world.client.get(
        "/auth/verify", headers={**headers, "X-Forwarded-Method": method, "X-Forwarded-Uri": uri}
    )


async def test_security_forward_auth_contract(world: World) -> None:
    ok = await verify(world, "GET", "/api/tags?x=1", bearer(world.tokens["inference"]))
    assert ok.status_code == 200
    identity = ok.headers["X-LlamaController-Identity"]
    assert identity.startswith("v1.")
    response = await world.client.get("/api/tags", headers={"X-LlamaController-Identity": identity})
    assert response.status_code == 200, "the edge's signed identity is accepted once"
    missing = await verify(world, "GET", "/api/tags", {})
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(await missing.get_json()) == {"error"}
    forbidden = await verify(world, "GET", "/control/v1/users", bearer(world.tokens["inference"]))
    assert forbidden.status_code == 403 and set(await forbidden.get_json()) == {"error", "code"}  # its dialect
    openai_refusal = await verify(world, "POST", "/v1/chat/completions", {})
    assert (
        openai_refusal.status_code == 401
        and (await openai_refusal.get_json())["error"]["type"] == "authentication_error"
    )
    open_path = await verify(world, "GET", "/", {})
    assert open_path.status_code == 200 and "X-LlamaController-Identity" not in open_path.headers


async def test_security_forward_auth_ignores_a_client_supplied_identity(world: World) -> None:
    stolen = sign_claims(
        b"x" * 32, {"sub": "root", "scp": ["admin"], "exp": time.time() + 60, "m": "GET", "p": "/api/tags"}
    )
    response = await verify(world, "GET", "/api/tags", {"X-LlamaController-Identity": stolen})
    assert response.status_code == 401


async def signed(world: World, path: str = "/api/tags", method: str = "GET") -> str:
    response = await verify(world, method, path, bearer(world.tokens["inference"]))
    value: str = response.headers["X-LlamaController-Identity"]
    return value


async def test_security_identity_header_forged(world: World) -> None:
    forged = sign_claims(
        b"not-our-key-not-our-key-not-ours",
        {"sub": "root", "scp": ["admin"], "exp": time.time() + 60, "m": "GET", "p": "/api/tags"},
    )
    status, body, _ = await get(world, "/api/tags", {"X-LlamaController-Identity": forged})
    assert (status, body) == (401, {"error": "invalid identity header"})


async def test_security_identity_header_tampered(world: World) -> None:
    version, payload, mac = (await signed(world)).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["scp"] = ["admin"]
    tampered_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    status, body, _ = await get(
        world, "/api/tags", {"X-LlamaController-Identity": f"{version}.{tampered_payload}.{mac}"}
    )
    assert (status, body) == (401, {"error": "invalid identity header"})


async def test_security_identity_header_expired(world: World) -> None:
    value = await signed(world)
    await asyncio.sleep(1.1)  # identity_ttl is 1 s here
    status, body, _ = await get(world, "/api/tags", {"X-LlamaController-Identity": value})
    assert (status, body) == (401, {"error": "expired identity header"})


async def test_security_identity_header_replayed(world: World) -> None:
    value = await signed(world)
    assert (await get(world, "/api/tags", {"X-LlamaController-Identity": value}))[0] == 200
    status, body, _ = await get(world, "/api/tags", {"X-LlamaController-Identity": value})
    assert (status, body) == (401, {"error": "identity header was already used"})


async def test_security_identity_header_for_another_request(world: World) -> None:
    value = await signed(world, "/api/tags")
    status, body, _ = await get(world, "/api/ps", {"X-LlamaController-Identity": value})
    assert (status, body) == (401, {"error": "identity header was issued for another request"})


async def test_security_client_supplied_identity_header_directly(world: World) -> None:
    # No edge in front: a client inventing the header gets nowhere, even with a valid token beside it.
    invented = "v1.eyJzdWIiOiJyb290In0.AAAA"
    status, body, _ = await get(
        world, "/api/tags", {"X-LlamaController-Identity": invented, **bearer(world.tokens["inference"])}
    )
    assert (status, body) == (401, {"error": "invalid identity header"})


async def test_security_rate_limit_then_recovery(world: World) -> None:
    headers = bearer(world.tokens["limited"])  # 120 requests per minute: a bucket of 120, 2 more per second
    statuses = [(await get(world, "/api/version", headers))[0] for _ in range(120)]
    assert statuses == [200] * 120
    # The bucket refills while we send, so the refusal comes within a few more requests, not at once.
    for _ in range(10):
        status, body, response_headers = await get(world, "/api/version", headers)
        if status == 429:
            break
    assert status == 429 and body == {"error": "rate limit of 120 requests per minute reached"}
    assert 1 <= int(response_headers["Retry-After"]) <= 2
    await asyncio.sleep(0.6)
    assert (await get(world, "/api/version", headers))[0] == 200


async def login(world: World, username: str, password: str, cookie: str | None = None) -> Any:
    headers = {"Cookie": f"lc_session={cookie}"} if cookie else {}
    return await world.client.post("/auth/login", json={"username": username, "password": password}, headers=headers)


def session_cookie(response: Any) -> str:
    header = response.headers["Set-Cookie"]
    assert "HttpOnly" in header and "Secure" in header and "SameSite=Strict" in header
    value: str = header.split(";", 1)[0].split("=", 1)[1]
    return value


async def test_security_login_brute_force_is_throttled(world: World) -> None:
    for _ in range(3):
        response = await login(world, "alice", "wrong-password")
        assert response.status_code == 401
        assert await response.get_json() == {"error": "invalid user name or password", "code": "unauthenticated"}
    response = await login(world, "alice", "alice-password")  # even the right password now waits
    assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
    assert (await login(world, "root", "root-password")).status_code == 200, "other users are not locked out"


async def test_security_unknown_user_and_wrong_password_look_the_same(world: World) -> None:
    unknown = await login(world, "mallory", "whatever-password")
    wrong = await login(world, "root", "whatever-password")
    assert unknown.status_code == wrong.status_code == 401
    assert await unknown.get_json() == await wrong.get_json()


async def test_security_session_and_csrf(world: World) -> None:
    response = await login(world, "root", "root-password")
    cookie, csrf = session_cookie(response), (await response.get_json())["csrf_token"]
    headers = {"Cookie": f"lc_session={cookie}"}
    assert (await world.client.get("/control/v1/models", headers=headers)).status_code == 200
    no_csrf = await world.client.post("/control/v1/models/a/unload", headers=headers)
    assert no_csrf.status_code == 403
    assert await no_csrf.get_json() == {"error": "missing or wrong CSRF token (X-CSRF-Token)", "code": "forbidden"}
    wrong = await world.client.post("/control/v1/models/a/unload", headers={**headers, "X-CSRF-Token": "0" * 64})
    assert wrong.status_code == 403
    ok = await world.client.post("/control/v1/models/a/unload", headers={**headers, "X-CSRF-Token": csrf})
    assert ok.status_code == 200


async def test_security_session_fixation_is_impossible(world: World) -> None:
    planted = "attacker-chosen-session-id"
    response = await login(world, "root", "root-password", cookie=planted)
    issued = session_cookie(response)
    assert issued != planted
    status, _, _ = await get(world, "/auth/session", {"Cookie": f"lc_session={planted}"})
    assert status == 401
    again = session_cookie(await login(world, "root", "root-password", cookie=issued))
    assert again != issued, "every sign-in rotates the session"


async def test_security_logout_really_ends_the_session(world: World) -> None:
    response = await login(world, "alice", "alice-password")
    cookie, csrf = session_cookie(response), (await response.get_json())["csrf_token"]
    headers = {"Cookie": f"lc_session={cookie}"}
    assert (await get(world, "/auth/session", headers))[1]["user"] == "alice"
    out = await world.client.post("/auth/logout", headers={**headers, "X-CSRF-Token": csrf})
    assert out.status_code == 200 and "lc_session=;" in out.headers["Set-Cookie"]
    status, body, _ = await get(world, "/auth/session", headers)
    assert status == 401 and body["error"] == "session expired or signed out: sign in again"


async def test_security_secrets_never_reach_logs_or_later_responses(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = bearer(world.tokens["admin"])
    created = await world.client.post("/control/v1/tokens", json={"name": "ci", "scopes": ["inference"]}, headers=admin)
    assert created.status_code == 201
    secret = (await created.get_json())["token"]
    user = await world.client.post(
        "/control/v1/users", json={"name": "carol", "password": "carol-password-1"}, headers=admin
    )
    assert user.status_code == 201
    await get(world, "/api/tags", bearer(secret))
    await get(world, "/api/tags", bearer(secret[:-1] + "x"))
    await login(world, "carol", "carol-password-1")
    await login(world, "carol", "wrong-password-1")
    listing = await (await world.client.get("/control/v1/tokens", headers=admin)).get_data(as_text=True)
    users = await (await world.client.get("/control/v1/users", headers=admin)).get_data(as_text=True)
    audit = await (await world.client.get("/control/v1/audit", headers=admin)).get_data(as_text=True)
    secret_part = secret.split("_", 2)[2]
    for text in (caplog.text, listing, users, audit):
        for needle in (secret_part, digest(secret_part), "carol-password-1", "wrong-password-1", "root-password"):
            assert needle not in text
    stored = await world.service.store.get_user("carol")
    assert stored is not None and stored.password_hash.startswith("$argon2id$")


async def test_security_comparisons_are_constant_time(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append(1)
        return original(a, b)

    monkeypatch.setattr(auth_secrets.hmac, "compare_digest", recording)
    world.auth._cache.clear()
    assert (await get(world, "/api/tags", bearer(world.tokens["inference"])))[0] == 200
    assert calls, "token secrets are compared with hmac.compare_digest"
    calls.clear()
    assert (await get(world, "/api/tags", {"X-LlamaController-Identity": "v1.abc.def"}))[0] == 401
    assert calls, "identity signatures are compared with hmac.compare_digest"


async def test_security_users_cannot_mint_admin_tokens(world: World) -> None:
    with pytest.raises(Exception, match="only admins may own tokens with the admin scope"):
        await world.service.create_token("alice", "x", ["admin"], [], None, None, "tests")


async def test_security_first_start_creates_admin_once(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = fake_config(tmp_path, tiny_model, {"a": {}}, auth={"enabled": True})
    runtime = FakeRuntime()
    for run in range(2):
        app = fake_app(config, runtime)
        async with app.test_app():
            pass
        out = capsys.readouterr().out
        if run == 0:
            kept = config.data_dir / "initial-admin-password"
            password = kept.read_text().strip()
            assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and f"its password is in {kept}" in out
            # Not a terminal (a container's log, a pipe): the password is in the file only, never in a log.
            assert len(password) >= 16 and password not in out and password not in caplog.text
        else:
            assert "password" not in out, "said once only"
    service_app = fake_app(config, runtime)
    async with service_app.test_app():
        response = await service_app.test_client(use_cookies=False).post(
            "/auth/login", json={"username": "admin", "password": password}
        )
        assert response.status_code == 200


async def test_security_first_start_on_a_terminal_shows_the_password_too(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    config = fake_config(tmp_path, tiny_model, {"a": {}}, auth={"enabled": True})
    async with fake_app(config, FakeRuntime()).test_app():
        pass
    password = (config.data_dir / "initial-admin-password").read_text().strip()
    assert f"created user 'admin' with password: {password}\n" in capsys.readouterr().out


def test_security_auth_can_only_be_off_on_loopback() -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config({"server": {"listen": "0.0.0.0:11434"}, "auth": {"enabled": False}})
    assert caught.value.problems[0].startswith("auth.enabled: authentication may only be turned off on a loopback")


async def test_security_secrets_are_generated_with_0600(world: World) -> None:
    config = services_of(world.app).config
    for name in ("identity.key", "session.key"):
        path = config.secrets_dir / name
        assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    assert config.secrets_dir.stat().st_mode & 0o777 == 0o700
    assert config.store_path.stat().st_mode & 0o777 == 0o600


async def test_security_metrics_need_the_metrics_scope(world: World) -> None:
    assert (await world.client.get("/metrics")).status_code == 401
    assert (await world.client.get("/metrics", headers=bearer(world.tokens["inference"]))).status_code == 403
    await get(world, "/api/tags", bearer(world.tokens["inference"]))
    response = await world.client.get("/metrics", headers=bearer(world.tokens["metrics"]))
    text = await response.get_data(as_text=True)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    assert 'llamacontroller_model_state{model="a",state="stopped"} 1.0' in text
    assert 'llamacontroller_requests_total{endpoint="tags",model="",status="200"} 1.0' in text
    assert "llamacontroller_model_in_flight" in text and "lc_" not in text
    # the two refusals above, counted by status only: no token, no user
    assert 'llamacontroller_auth_refused_total{status="401"} 1.0' in text
    assert 'llamacontroller_auth_refused_total{status="403"} 1.0' in text
    assert world.tokens["inference"] not in text and "tester" not in text


async def test_security_users_manage_only_their_own_tokens(world: World) -> None:
    alice = bearer(world.tokens["inference"])  # alice is a user with the inference scope
    made = await world.client.post("/control/v1/tokens", json={"name": "mine"}, headers=alice)
    assert made.status_code == 201 and (await made.get_json())["owner"] == "alice"
    for body, expected in (
        ({"name": "x", "scopes": ["models:manage"]}, "you cannot give a token scopes you do not have: models:manage"),
        ({"name": "x", "owner": "root"}, "you can create tokens only for yourself"),
    ):
        refused = await world.client.post("/control/v1/tokens", json=body, headers=alice)
        assert refused.status_code == 403 and (await refused.get_json())["error"] == expected
    listed = await (await world.client.get("/control/v1/tokens", headers=alice)).get_json()
    assert {t["owner"] for t in listed["tokens"]} == {"alice"}
    everyone = await (await world.client.get("/control/v1/tokens", headers=bearer(world.tokens["admin"]))).get_json()
    assert {t["owner"] for t in everyone["tokens"]} == {"alice", "root"}
    roots = [t["id"] for t in everyone["tokens"] if t["owner"] == "root"]
    revoke = await world.client.delete(f"/control/v1/tokens/{roots[0]}", headers=alice)
    assert revoke.status_code == 404, "another user's token is as if it did not exist"
    own = (await made.get_json())["id"]
    assert (await world.client.delete(f"/control/v1/tokens/{own}", headers=alice)).status_code == 200


async def test_security_a_users_allow_list_binds_its_tokens(world: World) -> None:
    admin = bearer(world.tokens["admin"])
    limited = await world.client.put("/control/v1/users/alice/models", json={"models": ["a"]}, headers=admin)
    assert limited.status_code == 200 and (await limited.get_json())["models"] == ["a"]
    headers = bearer(world.tokens["inference"])  # a token of alice's with no list of its own
    await asyncio.sleep(0.25)  # past the token cache
    tags = await (await world.client.get("/api/tags", headers=headers)).get_json()
    assert [m["name"] for m in tags["models"]] == ["a:latest"]
    refused = await world.client.post("/api/show", json={"model": "b"}, headers=headers)
    assert refused.status_code == 403


async def test_security_sign_in_with_an_impossible_name_stores_nothing(world: World) -> None:
    """A sign-in with a huge name once grew the process and the store file by the name's size per try."""
    store, ephemeral = world.auth.store, world.auth.ephemeral
    before = await store.list_audit(1000)
    huge = "x" * 10_000  # under the sign-in form's own 16 KiB bound (past it: 413, nothing read)
    for username in (huge, "alice\n", "../alice", "alice bob", ""):
        response = await login(world, username, "whatever-password")
        assert response.status_code == 401, username[:20]
        assert await response.get_json() == {"error": "invalid user name or password", "code": "unauthenticated"}
        web = await world.client.post("/ui/login", form={"username": username, "password": "whatever-password"})
        assert web.status_code == 200 and "Wrong user name or password." in await web.get_data(as_text=True)
    assert await store.list_audit(1000) == before, "nothing audited for a name no account can have"
    assert isinstance(ephemeral, SqliteEphemeral)
    await ephemeral.failures("")  # opens the counters' file, if nothing has yet
    with sqlite3.connect(ephemeral.path) as db:
        assert db.execute("SELECT count(*) FROM failures").fetchone()[0] == 0, "nothing counted either"
    for _ in range(3):  # a possible name is still counted and throttled as before
        await login(world, "alice", "wrong-password")
    assert (await login(world, "alice", "alice-password")).status_code == 429


async def restricted(world: World, models: list[str], rpm: int | None, expires: str | None) -> str:
    token, _ = await world.service.create_token("alice", "restricted", ["inference"], models, expires, rpm, "tests")
    return token


async def make(world: World, headers: dict[str, str], **body: Any) -> tuple[int, Any]:
    response = await world.client.post("/control/v1/tokens", json={"name": "child", **body}, headers=headers)
    return response.status_code, await response.get_json()


async def test_security_a_token_made_with_a_token_inherits_its_bounds(world: World) -> None:
    """A token limited to one model, 5 rpm and 1 h once made a token with no list, no rate and no expiry."""
    maker = bearer(await restricted(world, ["a"], 5, "1h"))
    maker_expiry = (await world.service.store.list_tokens())[-1].expires_at
    status, child = await make(world, maker)
    assert status == 201
    assert (child["models"], child["rpm"], child["expires_at"]) == (["a"], 5, maker_expiry)
    refused = await world.client.post("/api/show", json={"model": "b"}, headers=bearer(child["token"]))
    assert refused.status_code == 403, "the inherited list is enforced"


async def test_security_revoking_a_token_revokes_the_tokens_it_made(world: World) -> None:
    """A leaked token's children once outlived its revocation, and nothing recorded which token made them."""
    maker = bearer(await restricted(world, ["a"], None, None))
    maker_id = (await world.service.store.list_tokens())[-1].id
    _, child = await make(world, bearer(world.tokens["inference"]))  # another token's child stays
    _, first = await make(world, maker)
    _, second = await make(world, bearer(first["token"]))  # made in turn
    assert (first["made_by"], second["made_by"]) == (maker_id, first["id"])
    audited = [e for e in await world.service.store.list_audit(100) if e.action == "token_created"]
    assert [e.detail["made_by"] for e in audited if e.target == second["id"]] == [first["id"]]
    admin = bearer(world.tokens["admin"])
    assert (await world.client.delete(f"/control/v1/tokens/{maker_id}", headers=admin)).status_code == 200
    await asyncio.sleep(0.25)  # past the token cache
    for made in (first, second):
        refused = await world.client.get("/api/tags", headers=bearer(made["token"]))
        assert refused.status_code == 401, made
    assert (await world.client.get("/api/tags", headers=bearer(child["token"]))).status_code == 200


async def test_security_a_token_cannot_give_models_beyond_its_own(world: World) -> None:
    maker = bearer(await restricted(world, ["a", "gemma3*"], None, None))
    for models in (["b"], ["*"], ["a", "b"], ["gemma*"], ["a*"]):
        status, body = await make(world, maker, models=models)
        assert status == 403 and "beyond its own" in body["error"], models
    for models in (["a"], ["A:latest"], ["gemma3:1b*"], ["gemma3:270m"], ["gemma3*", "a"]):
        status, body = await make(world, maker, models=models)
        assert status == 201 and body["models"] == models, models
    unlisted = bearer(await restricted(world, [], None, None))
    assert (await make(world, unlisted, models=["b"]))[0] == 201, "a maker without a list gives any"


async def test_security_a_token_cannot_give_a_higher_rate_than_its_own(world: World) -> None:
    maker = bearer(await restricted(world, [], 5, None))
    status, body = await make(world, maker, rpm=6)
    assert status == 403 and body["error"] == "a token cannot give a higher rate than its own 5 requests per minute"
    assert (await make(world, maker, rpm=1))[1]["rpm"] == 1
    assert (await make(world, maker, rpm=5))[1]["rpm"] == 5


async def test_security_a_token_cannot_outlive_its_maker(world: World) -> None:
    maker = bearer(await restricted(world, [], None, "1h"))
    for expires in ("2h", "never", 7200):
        status, body = await make(world, maker, expires=expires)
        assert status == 403 and body["error"] == "a token cannot give an expiry later than its own", expires
    status, body = await make(world, maker, expires="30m")
    assert status == 201 and body["expires_at"] < time.time() + 1801


async def test_security_token_bounds_hold_through_the_edge(world: World) -> None:
    """The edge's signed identity carries the maker's rate and expiry, so the bounds hold behind Caddy too."""
    maker = bearer(await restricted(world, ["a"], 5, "1h"))
    checked = await verify(world, "POST", "/control/v1/tokens", maker)
    assert checked.status_code == 200
    identity = {"X-LlamaController-Identity": checked.headers["X-LlamaController-Identity"]}
    status, child = await make(world, identity)
    assert status == 201 and (child["models"], child["rpm"]) == (["a"], 5) and child["expires_at"] is not None


async def test_security_sessions_and_admin_tokens_without_bounds_still_make_any_token(world: World) -> None:
    status, body = await make(world, bearer(world.tokens["admin"]), models=["b"], rpm=1000, expires="never")
    assert status == 201 and body["expires_at"] is None
    response = await login(world, "alice", "alice-password")
    session = {
        "Cookie": f"lc_session={session_cookie(response)}",
        "X-CSRF-Token": (await response.get_json())["csrf_token"],
    }
    status, body = await make(world, session, models=["b"], rpm=1000)
    assert status == 201 and body["models"] == ["b"]


def strict_json(text: str) -> Any:
    """JSON as the RFC has it: NaN and Infinity are not JSON (Python's json module accepts them)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "x", "expires": Infinity}',
        '{"name": "x", "expires": -Infinity}',
        '{"name": "x", "expires": NaN}',
        '{"name": "x", "expires": 1e400}',
        '{"name": "x", "expires": ' + "9" * 400 + "}",
        '{"name": "x", "expires": "' + "9" * 400 + 'd"}',
        '{"name": "x", "expires": "99999999999w"}',
        '{"name": "x", "expires": 0}',
        '{"name": "x", "expires": -60}',
        '{"name": "x", "expires": true}',
        '{"name": "x", "rpm": ' + "9" * 400 + "}",
        '{"name": "x", "rpm": 0}',
        '{"name": "x", "rpm": 1e3}',
        '{"name": "' + "x" * 101 + '"}',
        '{"name": "x", "models": [' + ",".join(['"a"'] * 65) + "]}",
    ],
)
async def test_security_token_numbers_are_finite_and_bounded(world: World, body: str) -> None:
    """`expires: Infinity` was once stored, and every later listing answered invalid JSON; a 400-digit number
    was a 500."""
    admin = bearer(world.tokens["admin"])
    response = await world.client.post(
        "/control/v1/tokens", data=body, headers={**admin, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, await response.get_data(as_text=True)
    listing = await world.client.get("/control/v1/tokens", headers=admin)
    assert listing.status_code == 200 and len(strict_json(await listing.get_data(as_text=True))["tokens"]) == 6


async def test_security_token_listing_is_json_whatever_was_stored_before(world: World) -> None:
    token, token_id, secret_hash = new_token()
    await world.service.store.add_token(
        TokenRecord(token_id, "old", "alice", secret_hash, ("inference",), expires_at=float("inf"), created_at=1.0)
    )
    listing = await world.client.get("/control/v1/tokens", headers=bearer(world.tokens["admin"]))
    listed = {t["id"]: t for t in strict_json(await listing.get_data(as_text=True))["tokens"]}
    assert listed[token_id]["expires_at"] is None, "an infinite expiry reads as never, which it meant"
    assert (await get(world, "/api/tags", bearer(token)))[0] == 200


async def test_security_user_names_ignore_case(world: World) -> None:
    """`Root` could be added beside `root`, and `ROOT` could not sign in as root."""
    response = await login(world, "ROOT", "root-password")
    assert response.status_code == 200 and (await response.get_json())["user"] == "root"
    admin = bearer(world.tokens["admin"])
    added = await world.client.post("/control/v1/users", json={"name": "Root", "password": "x" * 12}, headers=admin)
    assert added.status_code == 409
    assert (await added.get_json())["error"] == "user 'Root' exists already (user names ignore case)"
    for spelling in ("alice", "ALICE", "Alice"):  # one throttle, whatever the spelling
        assert (await login(world, spelling, "wrong-password")).status_code == 401
    assert (await login(world, "aLiCe", "alice-password")).status_code == 429
    status, made = await make(world, admin, owner="ALICE")
    assert status == 201 and made["owner"] == "alice"
    alice = bearer(world.tokens["inference"])
    assert (await make(world, alice, owner="Alice"))[0] == 201, "a user's own name, in any case, is its own"
    disabled = await world.client.post("/control/v1/users/ALICE/disable", headers=admin)
    assert disabled.status_code == 200 and (await disabled.get_json())["name"] == "alice"


async def test_security_audit_limit_takes_ascii_digits_only(world: World) -> None:
    admin = bearer(world.tokens["admin"])
    for limit in ("²", "٣", "9" * 400, "-1", "1.5"):
        response = await world.client.get("/control/v1/audit", query_string={"limit": limit}, headers=admin)
        assert response.status_code == 400, limit
        assert await response.get_json() == {"error": "'limit' must be a whole number", "code": "bad_request"}
    assert len((await get(world, "/control/v1/audit?limit=2", admin))[1]["events"]) == 2


async def test_security_password_checks_leave_the_event_loop_free_and_are_bounded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bogus sign-ins with a new name each once ran argon2 on the event loop: 100 at once stalled every request."""
    from controller.auth import authenticate as auth_service
    from controller.auth.password_work import PasswordWork

    release = threading.Event()
    threads: list[int] = []
    real = auth_service.verify_password

    def slow_verify(password: str, hashed: str | None) -> bool:
        threads.append(threading.get_ident())
        release.wait(10)
        return real(password, hashed)

    monkeypatch.setattr(auth_service, "verify_password", slow_verify)
    world.auth.password_work = PasswordWork(parallel=1, waiting=2)
    guesses = [asyncio.create_task(login(world, f"ghost{n}", "whatever-password")) for n in range(4)]
    while len(threads) < 1:
        await asyncio.sleep(0.01)  # the loop runs while a check is under way: it is not on this thread
    assert threading.get_ident() not in threads
    ready = await world.client.get("/healthz")
    assert ready.status_code == 200, "other requests are answered meanwhile"
    done, _ = await asyncio.wait(guesses, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    refused = [task.result() for task in done]
    assert refused and all(r.status_code == 429 for r in refused), "past the queue: refused at once"
    release.set()
    statuses = sorted(r.status_code for r in await asyncio.gather(*guesses))
    assert statuses == [401, 401, 429, 429], statuses
