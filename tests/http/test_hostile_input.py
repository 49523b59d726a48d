"""Hostile input at every route: JSON bodies, query strings and form fields a client should never send.

Each answer must be below 500 and, when it is an error, in the caller's dialect (``common.dialects``
decides the shape per path; the web page answers HTML). The routes come from the apps' own tables (the
gateway's and Quart's), so a new route is covered without touching this file. Backends are a scripted
server that refuses every request with a 400 of its own: a request the gateway accepts and forwards gets
that answer relayed, which is below 500 too.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart import Quart
from quart.typing import TestClientProtocol as Client

from common.dialects import error_body
from controller.auth.admin import Administration
from controller.auth.authenticate import SESSION_COOKIE, Authenticator
from controller.runtime.fake import FakeRuntime
from controller.services import services_of
from llamacontroller.app import GATEWAY_KEY
from proxy.app import Gateway
from proxy.native import PREFIX as NATIVE_PREFIX
from proxy.ollama.options import _KNOWN as OLLAMA_OPTIONS
from tests.support.harness import fake_app, fake_config
from tests.support.scripted_http import Exchange, ScriptedServer, response

ROOT = Path(__file__).resolve().parents[2]
REFUSAL = json.dumps(
    {"error": {"code": 400, "message": "refused by the test backend", "type": "invalid_request_error"}}
).encode()
# Paths the gateway answers by prefix (not in its table): one example of each.
PREFIX_EXAMPLES = (
    "/v1/models/a",
    f"{NATIVE_PREFIX}a/v1/chat/completions",
    "/api/blobs/sha256-0",
    "/api/nope",
    "/v1/nope",
)
ACTIONS = ("load", "switch", "unload", "disable", "enable", "password", "models")  # <action> in web routes
SKIPPED_ENDPOINTS = ("static",)


async def _refuse(exchange: Exchange) -> None:
    await exchange.send(response(REFUSAL, "400 Bad Request", "Content-Type: application/json\r\n"))


def _names_in_source(pattern: str) -> list[str]:
    """Names the control plane reads (query parameters, form fields), found in its source."""
    found = set()
    for path in (ROOT / "controller").rglob("*.py"):
        found.update(re.findall(pattern, path.read_text()))
    return sorted(found)


QUERY_NAMES = _names_in_source(r"request\.args\.get\(\s*\"(\w+)\"")
FORM_NAMES = _names_in_source(r"form\.get(?:list)?\(\s*\"(\w+)\"")
# Fields the gateway's and the control API's JSON readers look at, and every Ollama option.
JSON_FIELDS = sorted(
    {
        *OLLAMA_OPTIONS,
        *_names_in_source(r"(?:data|body)\.get\(\s*\"(\w+)\""),
        *re.findall(r"\.get\(\s*\"(\w+)\"", (ROOT / "proxy" / "ollama" / "requests.py").read_text()),
        *_names_in_source(r"data\[\"(\w+)\"\]"),
    }
)


@dataclass(frozen=True)
class Target:
    method: str
    path: str


@dataclass
class World:
    app: Quart
    client: Client
    service: Administration
    auth: Authenticator
    bearer: str
    session: dict[str, str] | None = None
    targets: list[Target] = field(default_factory=list)


def _gateway_targets(gateway: Gateway) -> Iterator[Target]:
    for path, route in gateway.routes.items():
        for method in sorted(route.methods - {"HEAD"}) or ["POST"]:
            yield Target(method, path)
    for path in PREFIX_EXAMPLES:
        yield Target("POST", path)
        yield Target("GET", path)
    yield Target("GET", "/auth/verify")  # the edge's forward-auth check, answered by the auth middleware


def _quart_targets(app: Quart, token_id: str) -> Iterator[Target]:
    for rule in app.url_map.iter_rules():
        if rule.endpoint.rsplit(".", 1)[-1] in SKIPPED_ENDPOINTS:
            continue
        values: dict[str, list[str]] = {"name": ["a"], "token_id": [token_id], "action": list(ACTIONS)}
        paths = [""]
        for literal, variable in re.findall(r"([^<]*)(?:<(?:\w+:)?(\w+)>)?", rule.rule):
            paths = [p + literal + quote(v, safe="") for p in paths for v in (values[variable] if variable else [""])]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield from (Target(method, path) for path in paths)


@pytest.fixture
async def world(tmp_path: Path, tiny_model: Path) -> AsyncIterator[World]:
    async with ScriptedServer(_refuse) as backend:
        config = fake_config(
            tmp_path,
            tiny_model,
            {"a": {}},
            server={"data_dir": str(tmp_path / "data"), "max_body_bytes": 1 << 20},
            auth={"enabled": True, "login_max_failures": 1000},
        )
        app = fake_app(config, FakeRuntime(backend_url=backend.url))
        async with app.test_app():
            service: Administration = services_of(app).admin
            await service.add_user("root", "root-password", "admin", "tests")
            await service.add_user("a", "a-password", "user", "tests")
            bearer, _ = await service.create_token("root", "admin", ["admin"], [], None, None, "tests")
            _, victim = await service.create_token("a", "victim", ["inference"], [], None, None, "tests")
            world = World(app, app.test_client(use_cookies=False), service, services_of(app).auth, bearer)
            world.targets = [*_gateway_targets(app.extensions[GATEWAY_KEY])]
            world.targets += _quart_targets(app, victim.id)
            yield world


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    return type(value).__name__


async def _credentials(world: World, target: Target) -> dict[str, str]:
    """A bearer token for the APIs; a session (cookie and CSRF token) for the web page, signed in again
    after a request that may have signed it out (argon2 makes each sign-in cost a third of a second)."""
    if not target.path.startswith("/ui"):
        return {"Authorization": f"Bearer {world.bearer}"}
    if world.session is None:
        cookie, _ = await world.auth.login("root", "root-password", "127.0.0.1")
        world.session = {"Cookie": f"{SESSION_COOKIE}={cookie}", "X-CSRF-Token": world.auth.csrf_token(cookie)}
    session = world.session
    if target.path.endswith("/logout"):
        world.session = None
    return session


async def _send(
    world: World, target: Target, body: bytes, content_type: str, query: str = ""
) -> tuple[int, str, bytes]:
    headers = {"Content-Type": content_type, **await _credentials(world, target)}
    path = f"{target.path}?{query}" if query else target.path
    async with world.client.request(path, method=target.method, headers=headers) as connection:
        await connection.send(body)
        await connection.send_complete()
        first = await connection.receive()
        answered_type = connection.headers.get("Content-Type", "") if connection.headers else ""
        if answered_type.startswith("text/event-stream"):  # never complete: its start says enough
            await connection.disconnect()
    # Leaving the block waited for the rest of the answer.
    return connection.status_code or 0, answered_type, first + bytes(connection.response_data)


async def _check(world: World, target: Target, body: bytes, content_type: str, query: str = "") -> None:
    status, answered_type, answer = await _send(world, target, body, content_type, query)
    where = f"{target.method} {target.path}?{query} with {body[:300]!r}"
    assert status < 500, f"{where} -> {status} {answer[:300]!r}"
    if status < 400 or answer == REFUSAL:  # a success, or the backend's own answer relayed
        return
    if target.path.startswith("/ui"):
        assert answered_type.startswith(("text/html", "text/plain")), f"{where} -> {answered_type}"
        assert b"Traceback" not in answer
        return
    assert _shape(json.loads(answer)) == _shape(error_body(target.path, status, "m", "c")), f"{where} -> {answer!r}"


# ---------------------------------------------------------------------- strategies: JSON text, not values
# Built as text because json.dumps cannot write what these tests need to send (5,000 digits, lone surrogates).

SCALARS = (
    st.sampled_from(
        [
            "1e400",
            "-1e400",
            "NaN",
            "Infinity",
            "-Infinity",
            "9" * 400,
            "-" + "9" * 400,
            "9" * 5000,
            '"\\ud800"',
            '"x\\udfff"',
            '"\\ud83d\\ude00"',
            '"²"',
            '"9999999999999999999999"',
            '"-1"',
            '"1e400"',
            "1.5",
            "-1",
            "0",
            "true",
            "null",
            '""',
            "[]",
            "{}",
        ]
    )
    | st.integers().map(str)
    | st.text(max_size=8).map(json.dumps)
)
KEYS = st.sampled_from(JSON_FIELDS) | st.text(max_size=4)


def _object(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in pairs.items()) + "}"


VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]")
        | st.dictionaries(KEYS, inner, max_size=3).map(_object)
    ),
    max_leaves=6,
)


def _deep(depth: int) -> str:
    return '{"model":"a","messages":' + "[" * depth + "]" * depth + "}"


def _chat(content: str, arguments: str) -> str:
    call = _object({"function": _object({"name": '"f"', "arguments": arguments})})
    message = _object({"role": '"assistant"', "content": content, "tool_calls": f"[{call}]"})
    return _object({"model": '"a"', "messages": f"[{message}]", "stream": "false"})


BODIES = (
    VALUES  # anything at all, lists and strings included
    | st.dictionaries(KEYS, VALUES, max_size=4).map(lambda pairs: _object({"model": '"a"', **pairs}))
    | st.builds(_chat, VALUES, VALUES | VALUES.map(json.dumps))  # arguments as an object or as a JSON string
    | st.sampled_from([100_000, 200]).map(_deep)
    | st.sampled_from(["", " ", "{", '{"model":"a"', "[" * 100_000]).map(str)
).map(str.encode) | st.sampled_from(
    [b"\xff\xfe{}", b'{"model":"\xe9"}', b'{"model":"\xed\xa0\x80"}', b"\xef\xbb\xbf{}"]
)

# Query and form values: what str.isdigit() accepts and int() does not, huge numbers, controls, surrogates.
TEXTS = st.sampled_from(
    ["²", "٣", "9" * 5000, "9" * 400, "-1", "1e400", "NaN", "inf", "", " ", "\x00", "%ED%A0%80", "1" * 19]
) | st.text(max_size=6)

# Every example sends to every route (about a hundred requests): few examples, each of them wide.
FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEWER = settings(FAST, max_examples=5)


@FAST
@given(body=BODIES)
async def test_hostile_json_at_every_route_is_never_a_5xx(world: World, body: bytes) -> None:
    for target in world.targets:
        await _check(world, target, body, "application/json")


@FEWER
@given(values=st.lists(TEXTS, min_size=len(QUERY_NAMES), max_size=len(QUERY_NAMES)))
async def test_hostile_query_strings_at_every_route_are_never_a_5xx(world: World, values: list[str]) -> None:
    query = urlencode(dict(zip(QUERY_NAMES, values, strict=True)))
    for target in world.targets:
        await _check(world, target, b"", "application/json", query)


@FEWER
@given(values=st.lists(TEXTS, min_size=len(FORM_NAMES), max_size=len(FORM_NAMES)))
async def test_hostile_form_fields_at_every_form_are_never_a_5xx(world: World, values: list[str]) -> None:
    form = urlencode(dict(zip(FORM_NAMES, values, strict=True))).encode()
    for target in world.targets:
        if target.method == "POST" and target.path.startswith(("/ui", "/auth")):
            await _check(world, target, form, "application/x-www-form-urlencoded")


def test_hostile_routes_come_from_the_route_tables() -> None:
    """The field and parameter lists this file builds from the source are not empty (a rename would
    silently empty them)."""
    assert {"tail", "limit"} <= set(QUERY_NAMES)
    assert {"rpm", "expires", "username", "password"} <= set(FORM_NAMES)
    assert {"model", "messages", "keep_alive", "temperature", "expires", "rpm"} <= set(JSON_FIELDS)


# ---------------------------------------------------------------------- the inputs that once answered 500

HUGE = "9" * 5000
CHAT = '{"model":"a","messages":[{"role":"user","content":%s}]%s}'
DEEP_ARGUMENTS = json.dumps("[" * 5000 + "]" * 5000)
KNOWN_500S = [
    ("POST", "/auth/login", "[]", ""),
    ("POST", "/auth/login", '"x"', ""),
    ("POST", "/auth/login", "[" * 5000 + "]" * 5000, ""),  # within the sign-in form's 16 KiB
    ("POST", "/control/v1/tokens", "[]", ""),
    ("POST", "/control/v1/tokens", '"x"', ""),
    ("POST", "/control/v1/tokens", '{"name":' + "[" * 100_000 + "]" * 100_000 + "}", ""),
    ("POST", "/api/chat", CHAT % ('"hi"', f',"seed":{HUGE}'), ""),
    ("POST", "/v1/chat/completions", CHAT % ('"hi"', f',"max_tokens":{HUGE}'), ""),
    ("POST", "/v1/messages", CHAT % ('"hi"', f',"max_tokens":{HUGE}'), ""),
    ("POST", "/control/v1/models/a/load", f'{{"keep_alive":{HUGE}}}', ""),
    ("POST", "/api/chat", CHAT % ('"hi"', f',"keep_alive":{"9" * 400}'), ""),
    ("POST", "/api/chat", CHAT % ('"hi"', f',"options":{{"temperature":{"9" * 400}}}'), ""),
    (
        "POST",
        "/api/chat",
        '{"model":"a","messages":[{"role":"assistant","content":"",'
        f'"tool_calls":[{{"function":{{"name":"f","arguments":{DEEP_ARGUMENTS}}}}}]}}]}}',
        "",
    ),
    ("POST", "/api/chat", CHAT % ('"\\ud800"', ""), ""),
    ("POST", "/control/v1/users/a/password", json.dumps({"password": "x" * 5000}), ""),
    ("GET", "/control/v1/models/a/logs", "", "tail=%C2%B2"),
    ("GET", "/control/v1/audit", "", "limit=%C2%B2"),
]


async def test_hostile_known_inputs_are_a_400_in_the_callers_dialect(world: World) -> None:
    """Each of these once answered 500 (one app for all: each request is independent of the others)."""
    wrong = []
    for method, path, body, query in KNOWN_500S:
        status, _, answer = await _send(world, Target(method, path), body.encode(), "application/json", query)
        expected = _shape(error_body(path, 400, "m", "c"))
        if status != 400 or _shape(json.loads(answer)) != expected:
            wrong.append(f"{method} {path}?{query} {body[:60]!r} -> {status} {answer[:200]!r}")
    assert not wrong, "\n".join(wrong)


async def test_hostile_rpm_in_the_token_form_is_refused_on_the_page(world: World) -> None:
    target = Target("POST", "/ui/tokens")
    status, content_type, answer = await _send(
        world, target, urlencode({"name": "t", "rpm": "²"}).encode(), "application/x-www-form-urlencoded"
    )
    assert status == 400 and content_type.startswith("text/html")
    assert b"must be a whole number" in answer
