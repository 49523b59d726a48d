"""Ollama's ``truncate`` on llama-server, which refuses what does not fit instead of cutting it (pure).

llama-server answers an over-long prompt with a 400 ``exceed_context_size_error`` (and an over-long
embedding input with a message naming its batch or context size). The gateway tries the request as it
is — nothing is tokenized twice in the common case — and only on that refusal shortens and retries:
chat history loses its oldest turns (system messages and the last message stay, as in Ollama), and
embedding inputs are cut to the limit the backend named.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxy.ollama.requests import Message

_OVERFLOW = re.compile(r"\((\d+) tokens\)[^(]*\((\d+) tokens\)")
_EMBED_LIMITS = (
    re.compile(r"current batch size: (\d+)"),
    re.compile(r"max context size \((\d+) tokens\)"),
    re.compile(r"available context size \((\d+) tokens\)"),
)
HEADROOM = 0.9  # aim a little under the context: token counts are estimated from characters


def _error(payload: bytes) -> dict[str, Any]:
    try:
        error = json.loads(payload).get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def context_overflow(status: int, payload: bytes) -> tuple[int, int] | None:
    """(prompt tokens, context size) when llama-server refused a prompt as longer than its context."""
    if status != 400:
        return None
    error = _error(payload)
    if error.get("type") != "exceed_context_size_error":
        return None
    prompt, context = error.get("n_prompt_tokens"), error.get("n_ctx")
    if isinstance(prompt, int) and isinstance(context, int) and prompt > 0 and context > 0:
        return prompt, context
    match = _OVERFLOW.search(str(error.get("message", "")))
    return (int(match.group(1)), int(match.group(2))) if match else None


def shorten_history(messages: tuple[Message, ...], prompt_tokens: int, context: int) -> tuple[Message, ...] | None:
    """Drop the oldest turns so the prompt should fit; None when only system messages and the last remain."""
    droppable = [i for i, m in enumerate(messages[:-1]) if m.role != "system"]
    if not droppable:
        return None
    size = sum(len(m.content) + len(m.thinking) for m in messages) or 1
    excess = size * (1 - context * HEADROOM / prompt_tokens)
    dropped: set[int] = set()
    for index in droppable:
        if dropped and excess <= 0:
            break
        dropped.add(index)
        message = messages[index]
        excess -= len(message.content) + len(message.thinking)
    kept = [m for i, m in enumerate(messages) if i not in dropped]
    while True:  # a tool result whose call was dropped confuses templates: drop such orphans too
        first = next((i for i, m in enumerate(kept[:-1]) if m.role != "system"), None)
        if first is None or kept[first].role != "tool":
            return tuple(kept)
        kept.pop(first)


def embedding_limit(status: int, payload: bytes) -> int | None:
    """The most tokens one embedding input may have, from llama-server's refusal of a longer one."""
    if status < 400:
        return None
    message = str(_error(payload).get("message", ""))
    limits = [int(m.group(1)) for pattern in _EMBED_LIMITS if (m := pattern.search(message))]
    return min(limits) if limits else None
