"""Ollama requests → llama-server requests (pure). The field mapping follows Ollama's own runner.

- /api/chat and /api/generate (not raw) → ``POST /v1/chat/completions`` with the model's own template.
- /api/generate with ``raw`` → ``POST /completion`` (prompt verbatim); with ``suffix`` → ``POST /infill``.
- Upstream is always streamed; a ``stream: false`` request is aggregated by the gateway.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from proxy.ollama.requests import ChatRequest, Common, GenerateRequest, Message

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def sniff_image_type(data: bytes) -> str:
    """The MIME type of an image from its first bytes (clients send bare base64 without a type)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return "application/octet-stream"


def _data_uri(image: bytes) -> str:
    return f"data:{sniff_image_type(image)};base64,{base64.b64encode(image).decode()}"


def openai_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """Ollama messages → OpenAI messages: images as content parts, tool-call arguments as JSON strings."""
    converted: list[dict[str, Any]] = []
    call_ids: dict[str, str] = {}  # tool name → id of the latest call, for tool results without an id
    for index, message in enumerate(messages):
        out: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.thinking:
            out["reasoning_content"] = message.thinking  # llama-server's name for an assistant's reasoning
        if message.images:
            out["content"] = [{"type": "text", "text": message.content}] + [
                {"type": "image_url", "image_url": {"url": _data_uri(image)}} for image in message.images
            ]
        if message.tool_calls:
            calls = []
            for position, call in enumerate(message.tool_calls):
                call_id = call.id or f"call_{index}_{position}"
                call_ids[call.name] = call_id
                arguments = json.dumps(call.arguments, ensure_ascii=False)
                calls.append(
                    {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
                )
            out["tool_calls"] = calls
        if message.role == "tool":
            if message.tool_name:
                out["name"] = message.tool_name
            tool_call_id = message.tool_call_id or call_ids.get(message.tool_name or "")
            if tool_call_id:
                out["tool_call_id"] = tool_call_id
        converted.append(out)
    return converted


def _sampling(request: Common) -> dict[str, Any]:
    body: dict[str, Any] = dict(request.options.sampling)
    if request.options.num_predict is not None:
        body["max_tokens"] = request.options.num_predict
    return body


def _thinking(think: bool | str | None) -> dict[str, Any]:
    if think is None:
        return {}
    if isinstance(think, bool):
        return {"chat_template_kwargs": {"enable_thinking": think}}
    return {"chat_template_kwargs": {"enable_thinking": True, "reasoning_effort": think}, "reasoning_effort": think}


def _response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any]:
    if fmt is None:
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "schema", "schema": fmt}}}


def _logprobs(request: Common) -> dict[str, Any]:
    if not request.logprobs:
        return {}
    return {"logprobs": True, "top_logprobs": max(request.top_logprobs, 1)}


def chat_body(request: ChatRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": openai_messages(request.messages),
        "stream": True,
        "cache_prompt": True,
        **_sampling(request),
        **_response_format(request.format),
        **_thinking(request.think),
        **_logprobs(request),
    }
    if request.tools:
        body["tools"] = list(request.tools)
    return body


def generate_chat_body(request: GenerateRequest) -> dict[str, Any]:
    """A templated /api/generate: the prompt (and system) as a one-turn chat, the model's own template."""
    messages: list[Message] = []
    if request.system:
        messages.append(Message(role="system", content=request.system))
    messages.append(Message(role="user", content=request.prompt, images=request.images))
    chat = ChatRequest(
        model=request.model,
        options=request.options,
        stream=request.stream,
        keep_alive=request.keep_alive,
        format=request.format,
        think=request.think,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        truncate=request.truncate,
        shift=request.shift,
        messages=tuple(messages),
    )
    return chat_body(chat)


def native_body(request: GenerateRequest) -> tuple[str, dict[str, Any]]:
    """``raw`` → /completion; ``suffix`` → /infill. Returns (path, body)."""
    body: dict[str, Any] = {"stream": True, "cache_prompt": True, **request.options.sampling}
    body["n_predict"] = -1 if request.options.num_predict is None else request.options.num_predict
    if request.format == "json":
        body["json_schema"] = {"type": "object"}
    elif isinstance(request.format, dict):
        body["json_schema"] = request.format
    if request.logprobs:
        body["n_probs"] = max(request.top_logprobs, 1)
    if request.suffix:
        return "/infill", {**body, "input_prefix": request.prompt, "input_suffix": request.suffix, "prompt": ""}
    return "/completion", {**body, "prompt": request.prompt}
