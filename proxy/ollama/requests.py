"""Ollama request bodies → typed, validated requests (pure). Messages follow Ollama's own wording."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from common.durations import DurationError, parse_keep_alive
from common.errors import BadRequest, ModelNotFound
from common.jsonbody import decode_json
from proxy.ollama.options import MappedOptions, map_options

THINK_LEVELS = ("low", "medium", "high", "max")
MAX_IMAGES = 16


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    thinking: str = ""  # an assistant's earlier reasoning, kept for templates that show it
    images: tuple[bytes, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str | None = None
    tool_call_id: str | None = None


@dataclass(frozen=True)
class Common:
    """Fields shared by /api/chat and /api/generate."""

    model: str
    options: MappedOptions
    stream: bool = True
    keep_alive: float | None = None
    format: str | dict[str, Any] | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    truncate: bool | None = None  # None: Ollama's default (true)
    shift: bool | None = None


@dataclass(frozen=True)
class ChatRequest(Common):
    messages: tuple[Message, ...] = ()
    tools: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class GenerateRequest(Common):
    prompt: str = ""
    suffix: str = ""
    system: str = ""
    raw: bool = False
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class EmbedRequest:
    model: str
    inputs: tuple[str, ...]
    truncate: bool = True
    dimensions: int | None = None
    keep_alive: float | None = None
    options: MappedOptions = field(default_factory=lambda: map_options(None))


@dataclass(frozen=True)
class ShowRequest:
    model: str
    verbose: bool = False


def _optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...], kind_name: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"{name} must be {kind_name}")
    return value


def _model(body: dict[str, Any], *, empty_is_not_found: bool = False) -> str:
    name = body.get("model")
    if name is None or name == "":
        name = body.get("name")  # the legacy spelling some clients still send
    if name is None or name == "":
        if empty_is_not_found:
            raise ModelNotFound("")
        raise BadRequest("model is required")
    if not isinstance(name, str):
        raise BadRequest("model must be a string")
    return name


def _keep_alive(body: dict[str, Any]) -> float | None:
    if body.get("keep_alive") is None:
        return None
    try:
        return parse_keep_alive(body["keep_alive"])
    except DurationError as exc:
        raise BadRequest(str(exc)) from None


def _format(body: dict[str, Any]) -> str | dict[str, Any] | None:
    value = body.get("format")
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        return value
    raise BadRequest('invalid format: expected "json" or a valid JSON Schema object')


def _think(body: dict[str, Any]) -> bool | str | None:
    value = body.get("think")
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in THINK_LEVELS:
        return value.lower()
    if isinstance(value, str) and value in ("true", "false"):
        return bool(value == "true")
    raise BadRequest("invalid think value")


def _images(value: Any, where: str) -> tuple[bytes, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadRequest(f"{where} must be a list of base64 strings")
    if len(value) > MAX_IMAGES:
        raise BadRequest(f"{where}: at most {MAX_IMAGES} images per message")
    decoded = []
    for index, item in enumerate(value):
        try:
            decoded.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(
                f"{where}[{index}] is not valid base64 (send raw base64, without a data: prefix)"
            ) from None
    return tuple(decoded)


def _tool_call(value: Any, where: str) -> ToolCall:
    if not isinstance(value, dict) or not isinstance(value.get("function"), dict):
        raise BadRequest(f"{where} must be an object with a 'function'")
    function = value["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}.function.name must be a non-empty string")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI clients send a JSON string: accept both
        try:
            arguments = decode_json(arguments, "arguments") if arguments.strip() else {}
        except BadRequest:
            raise BadRequest(f"{where}.function.arguments is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise BadRequest(f"{where}.function.arguments must be an object")
    call_id = value.get("id")
    return ToolCall(name=name, arguments=arguments, id=call_id if isinstance(call_id, str) else None)


def _message(value: Any, index: int) -> Message:
    where = f"messages[{index}]"
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object")
    role = value.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequest(f"{where}.role must be a non-empty string")
    content = value.get("content")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string")
    calls = value.get("tool_calls")
    calls = [] if calls is None else calls
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be a list")
    tool_name = _optional(value, "tool_name", str, "a string") or _optional(value, "name", str, "a string")
    return Message(
        role=role.lower(),
        content=content,
        thinking=_optional(value, "thinking", str, "a string") or "",
        images=_images(value.get("images"), f"{where}.images"),
        tool_calls=tuple(_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)),
        tool_name=tool_name,
        tool_call_id=_optional(value, "tool_call_id", str, "a string"),
    )


def _common(body: dict[str, Any], model: str) -> dict[str, Any]:
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    logprobs = _optional(body, "logprobs", bool, "true or false") or False
    top_logprobs = _optional(body, "top_logprobs", int, "an integer") or 0
    if not 0 <= top_logprobs <= 20:
        raise BadRequest("top_logprobs must be between 0 and 20")
    return {
        "model": model,
        "options": map_options(body.get("options")),
        "stream": stream,
        "keep_alive": _keep_alive(body),
        "format": _format(body),
        "think": _think(body),
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
        "truncate": _optional(body, "truncate", bool, "true or false"),
        "shift": _optional(body, "shift", bool, "true or false"),
    }


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    model = _model(body)
    messages = body.get("messages")
    messages = [] if messages is None else messages
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    tools = body.get("tools")
    tools = [] if tools is None else tools
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise BadRequest("tools must be a list of objects")
    return ChatRequest(
        **_common(body, model),
        messages=tuple(_message(m, i) for i, m in enumerate(messages)),
        tools=tuple(tools),
    )


def parse_generate(body: dict[str, Any]) -> GenerateRequest:
    model = _model(body, empty_is_not_found=True)
    prompt = _optional(body, "prompt", str, "a string") or ""
    system = _optional(body, "system", str, "a string") or ""
    template = _optional(body, "template", str, "a string") or ""
    context = _optional(body, "context", list, "a list of token ids") or []
    raw = _optional(body, "raw", bool, "true or false") or False
    if raw and (template or system or context):
        raise BadRequest("raw mode does not support template, system, or context")
    if template:
        raise BadRequest("template overrides are not supported: the chat template from the model's GGUF file is used")
    if context:
        raise BadRequest(
            "context is not supported (it is deprecated in Ollama too): send the conversation to /api/chat"
        )
    return GenerateRequest(
        **_common(body, model),
        prompt=prompt,
        suffix=_optional(body, "suffix", str, "a string") or "",
        system=system,
        raw=raw,
        images=_images(body.get("images"), "images"),
    )


def parse_embed(body: dict[str, Any]) -> EmbedRequest:
    model = _model(body)
    value = body.get("input")
    if value is None:
        inputs: tuple[str, ...] = ()
    elif isinstance(value, str):
        inputs = (value,) if value else ()
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        inputs = tuple(value)
    else:
        raise BadRequest("invalid input type")
    dimensions = _optional(body, "dimensions", int, "an integer")
    if dimensions is not None and dimensions <= 0:
        raise BadRequest("dimensions must be greater than 0")
    truncate = _optional(body, "truncate", bool, "true or false")
    return EmbedRequest(
        model=model,
        inputs=inputs,
        truncate=True if truncate is None else truncate,
        dimensions=dimensions,
        keep_alive=_keep_alive(body),
        options=map_options(body.get("options")),
    )


def parse_embeddings(body: dict[str, Any]) -> EmbedRequest:
    """The legacy /api/embeddings: one ``prompt``; an empty prompt returns an empty embedding."""
    model = _model(body)
    prompt = _optional(body, "prompt", str, "a string") or ""
    return EmbedRequest(
        model=model,
        inputs=(prompt,) if prompt else (),
        keep_alive=_keep_alive(body),
        options=map_options(body.get("options")),
    )


def parse_show(body: dict[str, Any]) -> ShowRequest:
    return ShowRequest(model=_model(body), verbose=bool(_optional(body, "verbose", bool, "true or false")))
