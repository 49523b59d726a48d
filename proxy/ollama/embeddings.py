"""``/api/embed`` and ``/api/embeddings`` on llama-server's ``/v1/embeddings``, with Ollama's ``truncate``.

Inputs go out as they are; only when llama-server refuses one as too long does the gateway tokenize
(``/tokenize``), cut each input to the limit the backend named, and send the token ids: an over-long
input is then embedded from its first tokens, as in Ollama. ``truncate: false`` turns that refusal into
Ollama's own 400 instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import BadRequest, UpstreamError, UpstreamRefused
from common.upstream import Upstream
from proxy.ollama.fit import embedding_limit
from proxy.ollama.wire import post_json, upstream_error_message

TOO_LONG = "the input length exceeds the context length"
_ATTEMPTS = 3  # as sent, then cut to the batch size, then (rarely) to a smaller context


@dataclass(frozen=True)
class Embedded:
    vectors: list[list[float]]
    prompt_tokens: int


def normalise(vector: list[float], dimensions: int | None) -> list[float]:
    """L2-normalise (after truncating to ``dimensions``), as /api/embed promises."""
    if dimensions is not None:
        vector = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm > 0 else vector


async def _tokens(upstream: Upstream, url: str, text: str | list[int], headers: Mapping[str, str]) -> list[int]:
    if isinstance(text, list):
        return text
    status, payload = await post_json(upstream, url + "/tokenize", {"content": text, "add_special": True}, headers)
    if status >= 400:
        raise UpstreamRefused(status, upstream_error_message(payload))
    try:
        return [int(token) for token in json.loads(payload)["tokens"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamError("the model's backend sent an unreadable /tokenize reply") from exc


async def embed(
    upstream: Upstream, url: str, inputs: tuple[str, ...], truncate: bool, headers: Mapping[str, str]
) -> Embedded:
    batch: list[str | list[int]] = list(inputs)
    for attempt in range(_ATTEMPTS):
        status, payload = await post_json(
            upstream, url + "/v1/embeddings", {"input": batch, "encoding_format": "float"}, headers
        )
        if status < 400:
            break
        limit = embedding_limit(status, payload)
        if limit is not None and not truncate:
            raise BadRequest(TOO_LONG)
        if limit is None or attempt == _ATTEMPTS - 1:
            raise UpstreamRefused(status, upstream_error_message(payload))
        batch = [(await _tokens(upstream, url, item, headers))[:limit] for item in batch]
    try:
        data = json.loads(payload)
        items = sorted(data["data"], key=lambda item: item.get("index", 0))
        vectors = [[float(x) for x in item["embedding"]] for item in items]
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamError("the model's backend sent an unreadable embeddings reply") from exc
    return Embedded(vectors, int((data.get("usage") or {}).get("prompt_tokens", 0)))
