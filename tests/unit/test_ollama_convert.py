"""Golden tests of the pure Ollama converters: request in → llama-server request out; chunks in → NDJSON out."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from common.asgi import compact_json
from common.errors import BadRequest, ModelNotFound
from proxy.ollama.convert import chat_body, generate_chat_body, native_body, sniff_image_type
from proxy.ollama.options import SAMPLING_DEFAULTS, map_options
from proxy.ollama.requests import parse_chat, parse_embed, parse_generate
from proxy.ollama.stream import DONE, Accumulator, SSEParser

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8


def test_convert_chat_request_golden() -> None:
    request = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "System", "content": "be brief"},
                {"role": "user", "content": "what is this?", "images": [base64.b64encode(PNG).decode()]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "look", "arguments": {"at": "image"}}},
                    ],
                },
                {"role": "tool", "tool_name": "look", "content": "a cat"},
            ],
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
            "format": {"type": "object"},
            "options": {
                "temperature": 0.2,
                "num_predict": 64,
                "stop": ["\n\n"],
                "seed": 7,
                "num_ctx": 8192,
                "unknown_option": "ignored",
            },
            "think": False,
            "logprobs": True,
            "top_logprobs": 3,
        }
    )
    assert request.options.num_ctx == 8192
    assert chat_body(request) == {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_2_0",
                        "type": "function",
                        "function": {"name": "look", "arguments": '{"at": "image"}'},
                    },
                ],
            },
            {"role": "tool", "content": "a cat", "name": "look", "tool_call_id": "call_2_0"},
        ],
        "stream": True,
        "cache_prompt": True,
        **SAMPLING_DEFAULTS,
        "temperature": 0.2,
        "stop": ["\n\n"],
        "seed": 7,
        "max_tokens": 64,
        "response_format": {"type": "json_schema", "json_schema": {"name": "schema", "schema": {"type": "object"}}},
        "chat_template_kwargs": {"enable_thinking": False},
        "logprobs": True,
        "top_logprobs": 3,
        "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
    }


def test_convert_sends_ollama_sampling_defaults_explicitly() -> None:
    body = chat_body(parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    assert {k: body[k] for k in SAMPLING_DEFAULTS} == SAMPLING_DEFAULTS
    assert body["top_p"] == 0.9 and body["min_p"] == 0.0  # llama-server would use 0.95 and 0.05
    assert "max_tokens" not in body and "seed" not in body


def test_convert_generate_templated_raw_and_suffix() -> None:
    templated = generate_chat_body(parse_generate({"model": "m", "prompt": "hi", "system": "sys", "format": "json"}))
    assert templated["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert templated["response_format"] == {"type": "json_object"}
    path, raw = native_body(
        parse_generate({"model": "m", "prompt": "<s>x", "raw": True, "options": {"num_predict": 5}})
    )
    assert path == "/completion" and raw["prompt"] == "<s>x" and raw["n_predict"] == 5
    path, infill = native_body(parse_generate({"model": "m", "prompt": "def f(", "suffix": "return x"}))
    assert path == "/infill" and infill["input_prefix"] == "def f(" and infill["input_suffix"] == "return x"


def test_convert_think_levels() -> None:
    body = chat_body(parse_chat({"model": "m", "messages": [], "think": "high"}))
    assert body["chat_template_kwargs"] == {"enable_thinking": True, "reasoning_effort": "high"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": []}, "model is required"),
        ({"model": 5}, "model must be a string"),
        ({"model": "m", "messages": "hi"}, "messages must be a list"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role must be a non-empty string"),
        ({"model": "m", "stream": "yes"}, "stream must be true or false"),
        ({"model": "m", "keep_alive": "10"}, 'time: missing unit in duration "10"'),
        ({"model": "m", "keep_alive": [1]}, 'keep_alive must be a number of seconds or a duration string like "5m"'),
        ({"model": "m", "think": "very"}, "invalid think value"),
        ({"model": "m", "format": "xml"}, 'invalid format: expected "json" or a valid JSON Schema object'),
        ({"model": "m", "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
        ({"model": "m", "options": {"temperature": "hot"}}, 'option "temperature" must be of type float32'),
        ({"model": "m", "options": {"top_k": True}}, 'option "top_k" must be of type int'),
        ({"model": "m", "options": {"stop": "x"}}, 'option "stop" must be of type []string'),
        ({"model": "m", "options": []}, "options must be an object"),
        (
            {"model": "m", "messages": [{"role": "user", "images": ["%%%"]}]},
            "messages[0].images[0] is not valid base64 (send raw base64, without a data: prefix)",
        ),
        (
            {
                "model": "m",
                "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            },
            "messages[0].tool_calls[0].function.arguments is not valid JSON",
        ),
    ],
)
def test_convert_chat_requests_are_validated_with_ollama_messages(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_chat(body)
    assert caught.value.message == message


def test_convert_generate_validation() -> None:
    with pytest.raises(ModelNotFound, match="model '' not found"):
        parse_generate({"prompt": "x"})
    with pytest.raises(BadRequest, match="raw mode does not support template, system, or context"):
        parse_generate({"model": "m", "raw": True, "system": "s"})
    with pytest.raises(BadRequest, match="template overrides are not supported"):
        parse_generate({"model": "m", "template": "{{ .Prompt }}"})


def test_convert_embed_input_types() -> None:
    assert parse_embed({"model": "m", "input": "a"}).inputs == ("a",)
    assert parse_embed({"model": "m", "input": ["a", "b"]}).inputs == ("a", "b")
    assert parse_embed({"model": "m"}).inputs == ()
    for bad in (5, [1], {"a": 1}):
        with pytest.raises(BadRequest, match="invalid input type"):
            parse_embed({"model": "m", "input": bad})


def test_convert_tool_call_arguments_accept_strings_too() -> None:
    request = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "assistant", "tool_calls": [{"id": "x1", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
            ],
        }
    )
    assert request.messages[0].tool_calls[0].arguments == {"a": 1}
    assert chat_body(request)["messages"][0]["tool_calls"][0]["id"] == "x1"


def test_convert_options_unknown_ignored_and_ints_truncated() -> None:
    mapped = map_options({"num_predict": 10.7, "whatever": {"x": 1}, "num_keep": 5, "mirostat": 2, "seed": -1})
    assert mapped.num_predict == 10 and mapped.sampling["n_keep"] == 5 and mapped.sampling["mirostat"] == 2
    assert "seed" not in mapped.sampling and "whatever" not in mapped.sampling
    assert map_options({"num_predict": -1}).num_predict is None


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (PNG, "image/png"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"GIF89a..", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"??", "application/octet-stream"),
    ],
)
def test_convert_sniffs_image_types(data: bytes, mime: str) -> None:
    assert sniff_image_type(data) == mime


# ---------------------------------------------------------------- responses

CHAT_STREAM = (
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hel"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"reasoning_content":"hmm"}}]}\n\n'
    b": ping\n\n"
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"lo"}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1",'
    b'"type":"function","function":{"name":"get_weather","arguments":"{\\"ci"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"ty\\": \\"Paris\\"}"}}]}}]}\n\n'
    b'data: {"choices":[{"finish_reason":"tool_calls","index":0,"delta":{}}],"timings":{"cache_n":2,'
    b'"prompt_n":10,"prompt_ms":12.5,"predicted_n":3,"predicted_ms":30.25}}\n\n'
    b"data: [DONE]\n\n"
)


def feed_in_pieces(raw: bytes, size: int) -> list[Any]:
    parser = SSEParser()
    events: list[Any] = []
    for start in range(0, len(raw), size):
        events += parser.feed(raw[start : start + size])
    return events + parser.close()


@pytest.mark.parametrize("piece", [1, 7, 64, 10_000])
def test_stream_parser_is_independent_of_chunk_boundaries(piece: int) -> None:
    events = feed_in_pieces(CHAT_STREAM, piece)
    assert len(events) == 8 and events[-1] is DONE


def test_stream_chat_chunks_and_final_golden() -> None:
    accumulator = Accumulator(model="m:latest", kind="chat", streaming=True)
    lines = [line for event in feed_in_pieces(CHAT_STREAM, 13) for line in accumulator.feed(event)]
    assert [(line["message"].get("content"), line["message"].get("thinking")) for line in lines] == [
        ("Hel", None),
        ("", "hmm"),
        ("lo", None),
    ]
    assert all(line["done"] is False and line["model"] == "m:latest" for line in lines)
    final = accumulator.final(load_duration_ns=5, total_duration_ns=100)
    del final["created_at"]
    assert final == {
        "model": "m:latest",
        "message": {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}, "id": "c1"}
            ],
        },
        "done": True,
        "done_reason": "stop",
        "total_duration": 100,
        "load_duration": 5,
        "prompt_eval_count": 12,
        "prompt_eval_duration": 12_500_000,
        "eval_count": 3,
        "eval_duration": 30_250_000,
    }


def test_stream_aggregates_when_not_streaming() -> None:
    accumulator = Accumulator(model="m", kind="generate", streaming=False)
    assert [line for event in feed_in_pieces(CHAT_STREAM, 64) for line in accumulator.feed(event)] == []
    final = accumulator.final(0, 1)
    assert final["response"] == "Hello" and final["thinking"] == "hmm" and "load_duration" not in final


def test_stream_native_completion_length_reason() -> None:
    raw = (
        b'data: {"content":"a","stop":false}\n\n'
        b'data: {"content":"b","stop":false}\n\n'
        b'data: {"content":"","stop":true,"stop_type":"limit","timings":{"prompt_n":1,"predicted_n":2,'
        b'"prompt_ms":1,"predicted_ms":2}}\n\n'
    )
    accumulator = Accumulator(model="m", kind="generate", streaming=True)
    lines = [line for event in feed_in_pieces(raw, 5) for line in accumulator.feed(event)]
    assert [line["response"] for line in lines] == ["a", "b"]
    assert accumulator.final(0, 1)["done_reason"] == "length"


def test_stream_error_event_is_recorded() -> None:
    accumulator = Accumulator(model="m", kind="chat", streaming=True)
    events = feed_in_pieces(b'data: {"error":{"code":500,"message":"boom","type":"server_error"}}\n\n', 4)
    assert [accumulator.feed(event) for event in events] == [[]]
    assert accumulator.error == "boom" and not accumulator.finished


def test_stream_output_is_json_per_line() -> None:
    accumulator = Accumulator(model="m", kind="chat", streaming=True)
    for event in feed_in_pieces(CHAT_STREAM, 9):
        for line in accumulator.feed(event):
            assert "\n" not in json.dumps(line)


def test_created_at_is_rfc3339_utc_now_with_microseconds() -> None:
    from datetime import UTC, datetime

    from proxy.ollama.stream import created_at

    stamps = [created_at() for _ in range(3)]
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - moment).total_seconds()) < 5
    assert stamps == sorted(stamps)


@pytest.mark.parametrize(
    "arguments",
    ["[" * 5000 + "]" * 5000, '{"n": ' + "9" * 5000 + "}", '{"a": "\\ud800"}', '{"a": NaN}', "{"],
    ids=["deep", "5000-digits", "lone-surrogate", "nan", "broken"],
)
def test_stream_tool_call_arguments_a_model_wrote_badly_become_an_empty_object(arguments: str) -> None:
    """The arguments are the model's text (a prompt can steer it): what the gateway cannot pass on as JSON
    is dropped with a warning instead of failing the answer (RecursionError, ValueError, or a lone surrogate
    that fails when the answer is encoded)."""
    accumulator = Accumulator(model="m:latest", kind="chat", streaming=False)
    call = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": arguments}}
    accumulator.feed({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]})
    accumulator.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    final = accumulator.final(load_duration_ns=0, total_duration_ns=0)
    assert final["message"]["tool_calls"] == [{"function": {"index": 0, "name": "f", "arguments": {}}, "id": "c1"}]
    compact_json(final)  # encodable as an answer
