"""What an inference token may ask of a shared model: max_ctx and max_predict, clamped or refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.runtime.fake import FakeRuntime
from tests.support.harness import fake_app, fake_config
from tests.support.standin import Recorded, StandIn

MESSAGES = [{"role": "user", "content": "x"}]
CHAT = {"model": "tiny", "messages": MESSAGES, "stream": False}


@dataclass
class Outcome:
    status: int
    body: Any
    runtime: FakeRuntime
    sent: list[Recorded]  # what reached the backend


async def post(
    tmp_path: Path, tiny_model: Path, path: str, body: Any, model: dict[str, Any] | None = None, **defaults: Any
) -> Outcome:
    model = {"ctx_size": 256, "max_ctx": 512} if model is None else model
    config = fake_config(tmp_path, tiny_model, {"tiny": model}, defaults=defaults)
    async with StandIn() as standin:
        runtime = FakeRuntime(backend_url=standin.url)
        app = fake_app(config, runtime)
        async with app.test_app():
            response = await app.test_client().post(path, json=body)
            sent = [r for r in standin.requests if r.target != "/health"]
            return Outcome(response.status_code, await response.get_json(), runtime, sent)


def ctx_of(runtime: FakeRuntime) -> int:
    args = runtime.starts[-1].args
    return int(args[args.index("--ctx-size") + 1]) // int(args[args.index("--parallel") + 1])


async def test_by_default_no_request_generates_without_bound(tmp_path: Path, tiny_model: Path) -> None:
    openai = {"model": "tiny", "messages": MESSAGES, "max_tokens": 10**9}
    outcome = await post(tmp_path, tiny_model, "/v1/chat/completions", openai, model={})
    assert outcome.status == 200 and outcome.sent[-1].body["max_tokens"] == 16384
    args = outcome.runtime.starts[-1].args
    assert args[args.index("--n-predict") + 1] == "16384"  # for a request that names no limit, or -1


async def test_a_num_ctx_above_max_ctx_is_clamped_by_default(tmp_path: Path, tiny_model: Path) -> None:
    outcome = await post(tmp_path, tiny_model, "/api/chat", {**CHAT, "options": {"num_ctx": 1_000_000}})
    assert outcome.status == 200 and outcome.body["done"] is True
    assert ctx_of(outcome.runtime) == 512  # was the trained context (2048) before max_ctx


async def test_over_limit_refuse_answers_400_naming_the_limit(tmp_path: Path, tiny_model: Path) -> None:
    body = {**CHAT, "options": {"num_ctx": 1_000_000}}
    outcome = await post(tmp_path, tiny_model, "/api/chat", body, over_limit="refuse")
    assert outcome.status == 400 and "max_ctx" in outcome.body["error"] and "512" in outcome.body["error"]
    assert outcome.runtime.starts == []  # refused before anything was started or restarted
    body = {**CHAT, "options": {"num_predict": 50}}
    outcome = await post(tmp_path, tiny_model, "/api/chat", body, over_limit="refuse", max_predict=40)
    assert outcome.status == 400 and outcome.body["error"].startswith("num_predict 50 is above")
    assert "40" in outcome.body["error"] and outcome.sent == []
    openai = {"model": "tiny", "messages": MESSAGES, "max_tokens": 41}
    outcome = await post(tmp_path, tiny_model, "/v1/chat/completions", openai, over_limit="refuse", max_predict=40)
    assert outcome.status == 400 and "max_predict" in outcome.body["error"]["message"] and outcome.sent == []


async def test_every_backend_is_started_with_max_predict_as_its_default(tmp_path: Path, tiny_model: Path) -> None:
    outcome = await post(tmp_path, tiny_model, "/api/chat", {**CHAT, "options": {"num_predict": -1}}, max_predict=64)
    assert outcome.status == 200
    args = outcome.runtime.starts[-1].args
    assert args[args.index("--n-predict") + 1] == "64"  # llama-server's default for -1 (and no limit at all)
    assert "max_tokens" not in outcome.sent[-1].body


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/chat", {**CHAT, "options": {"num_predict": 10**9}}, "max_tokens"),
        (
            "/api/generate",
            {"model": "tiny", "prompt": "x", "raw": True, "options": {"num_predict": 10**9}},
            "n_predict",
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 10**9}, "max_tokens"),
        ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": 1e300}, None),
        ("/llama/tiny/completion", {"prompt": "x", "n_predict": 10**9}, "n_predict"),
        ("/llama/tiny/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**9}, "max_tokens"),
    ],
)
async def test_a_larger_request_is_lowered_to_max_predict_on_every_route(
    tmp_path: Path, tiny_model: Path, path: str, body: dict[str, Any], field: str | None
) -> None:
    outcome = await post(tmp_path, tiny_model, path, body, max_predict=64)
    assert outcome.status == 200, outcome.body
    sent = outcome.sent[-1].body
    assert sent[field or "max_completion_tokens"] == 64  # llama-server would have served 10**9 as asked


async def test_a_native_generation_body_the_gateway_cannot_read_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    config = fake_config(tmp_path, tiny_model, {"tiny": {}})
    async with StandIn() as standin:
        app = fake_app(config, FakeRuntime(backend_url=standin.url))
        async with app.test_app():
            nested = b'{"prompt": "x", "n_predict": 1000000000, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            response = await app.test_client().post(
                "/llama/tiny/completion", data=nested, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400
            assert not any(r.target == "/completion" for r in standin.requests)
            tokenized = await app.test_client().post("/llama/tiny/tokenize", json={"content": "x"})
            assert tokenized.status_code == 200  # other paths pass as they are


def test_asked_and_clamped_fields() -> None:
    from proxy.limits import asked_predict, clamp_predict

    assert asked_predict({"max_tokens": 5, "n_predict": 9}) == 9 and asked_predict({"max_tokens": True}) is None
    assert asked_predict({"max_tokens": float("inf")}) == 1 << 62 and asked_predict({}) is None
    assert clamp_predict({"max_tokens": 5, "n_predict": -1}, 4) == {"max_tokens": 4, "n_predict": -1}
    assert clamp_predict({"max_tokens": 4}, 4) is None and clamp_predict({"max_tokens": 9}, None) is None
