"""llama-server SSE → Ollama NDJSON objects (pure: bytes and dicts in, dicts out; no I/O).

``SSEParser`` splits the upstream byte stream into events. ``Accumulator`` reads OpenAI chunks
(``/v1/chat/completions``) or native ones (``/completion``, ``/infill``) and yields the Ollama chunks to
send now; ``final()`` builds the ``done: true`` object with the metrics in nanoseconds.
Rules from Ollama's runner: a chunk with neither content nor thinking is not forwarded; tool calls are
accumulated by index and sent on the final chunk with their arguments as objects; ``done_reason`` is
``length`` when the token limit was hit, else ``stop``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from common import notes
from common.errors import BadRequest
from common.jsonbody import decode_json

log = logging.getLogger(__name__)

DONE = object()  # the upstream's ``data: [DONE]``


_second: tuple[int, str] = (-1, "")  # the last whole second and its formatted date and time


def created_at() -> str:
    """RFC 3339 in UTC with microseconds, like Go's RFC3339Nano; the date and time are formatted once a second
    (one line per streamed token asks for it)."""
    global _second
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second[1]}.{int((now - second) * 1e6):06d}Z"


class SSEParser:
    """Incremental SSE parser: feed bytes as they arrive, get complete ``data`` payloads back."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[Any]:
        """Decoded JSON payloads (dicts) and ``DONE`` for each event completed by ``chunk``."""
        self._buffer += chunk
        events: list[Any] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                return events
            line = self._buffer[:newline].rstrip(b"\r")
            self._buffer = self._buffer[newline + 1 :]
            if not line:
                if self._data:
                    events.append(self._decode(b"\n".join(self._data)))
                    self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[5:].lstrip(b" "))
            # comments (": ping") and other fields (event:, id:) carry nothing we need

    def close(self) -> list[Any]:
        """Whatever a stream that ended without a final blank line still held."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        return events

    @staticmethod
    def _decode(payload: bytes) -> Any:
        if payload.strip() == b"[DONE]":
            return DONE
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            return {"error": {"message": "the model's backend sent an unreadable event"}}


@dataclass
class _ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: str = ""


def _nanoseconds(milliseconds: Any) -> int:
    return round(float(milliseconds) * 1e6) if isinstance(milliseconds, int | float) else 0


@dataclass
class Accumulator:
    """Turns upstream events into Ollama chunks for /api/chat (``kind="chat"``) or /api/generate."""

    model: str
    kind: Literal["chat", "generate"]
    streaming: bool
    content: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: dict[int, _ToolCallParts] = field(default_factory=dict)
    done_reason: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.done_reason is not None

    def feed(self, event: Any) -> list[dict[str, Any]]:
        """Ollama chunks to send for one upstream event (none while aggregating, or for empty deltas)."""
        if event is DONE or not isinstance(event, dict):
            return []
        if "error" in event:
            error = event["error"]
            self.error = str(error.get("message", error)) if isinstance(error, dict) else str(error)
            return []
        if isinstance(event.get("timings"), dict):
            self.timings = event["timings"]
            notes.note_timings(self.timings)
        if "choices" in event:
            text, thought, logprobs = self._openai(event)
        else:
            text, thought, logprobs = self._native(event)
        if text:
            self.content.append(text)
        if thought:
            self.thinking.append(thought)
        self.logprobs.extend(logprobs)
        if not self.streaming or not (text or thought):
            return []
        return [self._chunk(text, thought, logprobs)]

    def _openai(self, event: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
        choices = event.get("choices") or []
        if not choices:
            return "", "", []
        choice = choices[0]
        delta = choice.get("delta") or choice.get("message") or {}
        for part in delta.get("tool_calls") or []:
            parts = self.tool_calls.setdefault(int(part.get("index", len(self.tool_calls))), _ToolCallParts())
            parts.id += part.get("id") or ""
            function = part.get("function") or {}
            parts.name += function.get("name") or ""
            arguments = function.get("arguments")
            # A few llama.cpp builds sent objects instead of JSON strings: accept both.
            parts.arguments += arguments if isinstance(arguments, str) else json.dumps(arguments or {})
        reason = choice.get("finish_reason")
        if reason:
            self.done_reason = "length" if reason == "length" else "stop"
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        return delta.get("content") or "", delta.get("reasoning_content") or "", [_logprob(p) for p in logprobs]

    def _native(self, event: dict[str, Any]) -> tuple[str, str, list[dict[str, Any]]]:
        if event.get("stop"):
            self.done_reason = "length" if event.get("stop_type") == "limit" else "stop"
        probabilities = event.get("completion_probabilities") or []
        return event.get("content") or "", "", [_logprob(p) for p in probabilities]

    def _chunk(self, text: str, thought: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thought:
                message["thinking"] = thought
            chunk["message"] = message
        else:
            chunk["response"] = text
            if thought:
                chunk["thinking"] = thought
        chunk["done"] = False
        if logprobs:
            chunk["logprobs"] = logprobs
        return chunk

    def tool_call_objects(self) -> list[dict[str, Any]]:
        calls = []
        for index in sorted(self.tool_calls):
            parts = self.tool_calls[index]
            try:  # the model's text, which a prompt can steer: read within the same bounds as a client's JSON
                arguments = decode_json(parts.arguments, "arguments") if parts.arguments.strip() else {}
            except BadRequest:
                log.warning("tool call %s had arguments that are not JSON: %.200s", parts.name, parts.arguments)
                arguments = {}
            call: dict[str, Any] = {"function": {"index": index, "name": parts.name, "arguments": arguments}}
            if parts.id:
                call["id"] = parts.id
            calls.append(call)
        return calls

    def final(self, load_duration_ns: int, total_duration_ns: int) -> dict[str, Any]:
        """The ``done: true`` object: aggregated text when not streaming, and the metrics."""
        text = "" if self.streaming else "".join(self.content)
        thought = "" if self.streaming else "".join(self.thinking)
        final = self._chunk(text, thought, [] if self.streaming else self.logprobs)
        if self.kind == "chat":
            calls = self.tool_call_objects()
            if calls:
                final["message"]["tool_calls"] = calls
        final["done"] = True
        final["done_reason"] = self.done_reason or "stop"
        metrics = {
            "total_duration": total_duration_ns,
            "load_duration": load_duration_ns,
            "prompt_eval_count": int(self.timings.get("cache_n", 0) or 0) + int(self.timings.get("prompt_n", 0) or 0),
            "prompt_eval_duration": _nanoseconds(self.timings.get("prompt_ms")),
            "eval_count": int(self.timings.get("predicted_n", 0) or 0),
            "eval_duration": _nanoseconds(self.timings.get("predicted_ms")),
        }
        final.update({key: value for key, value in metrics.items() if value})  # Ollama omits zero values
        return final


def _logprob(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        return {}
    out: dict[str, Any] = {"token": entry.get("token", ""), "logprob": entry.get("logprob", 0.0)}
    if entry.get("bytes") is not None:
        out["bytes"] = entry["bytes"]
    top = entry.get("top_logprobs") or entry.get("probs") or []
    out["top_logprobs"] = [
        {"token": t.get("token", t.get("tok_str", "")), "logprob": t.get("logprob", 0.0)}
        for t in top
        if isinstance(t, dict)
    ]
    return out


def load_chunk(model: str, kind: Literal["chat", "generate"], reason: Literal["load", "unload"]) -> dict[str, Any]:
    """The answer to an empty prompt or message list: the model was loaded (or unloaded), nothing generated."""
    chunk: dict[str, Any] = {"model": model, "created_at": created_at()}
    if kind == "chat":
        chunk["message"] = {"role": "assistant", "content": ""}
    else:
        chunk["response"] = ""
    chunk["done"] = True
    chunk["done_reason"] = reason
    return chunk
