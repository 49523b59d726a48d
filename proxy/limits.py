"""``max_predict`` on the bodies the gateway passes on: OpenAI's, Anthropic's, the native passthrough's, and
the ones it makes from Ollama requests.

Every backend runs with ``--n-predict max_predict`` (controller/catalog/profile.py), but llama-server takes that only
as the default: a request that names its own ``n_predict`` or ``max_tokens`` above it is served as asked
(checked against the llama-server this project pins). So the gateway lowers those fields to the limit before
a body leaves, and the model's directory refuses them first where the config says ``over_limit: refuse``.
"""

from __future__ import annotations

from typing import Any

# What llama-server reads as the number of tokens to generate, on its native, OpenAI and Anthropic routes.
PREDICT_FIELDS = ("n_predict", "max_tokens", "max_completion_tokens", "max_output_tokens")


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def asked_predict(request: dict[str, Any]) -> int | None:
    """The most tokens ``request`` asks for, or None when it names no limit (llama-server's default applies)."""
    asked = [n for field in PREDICT_FIELDS if (n := _number(request.get(field))) is not None]
    if not asked:
        return None
    most = max(asked)
    return int(most) if most < 1 << 62 else 1 << 62  # inf and 1e400 too: far above any limit


def clamp_predict(request: dict[str, Any], limit: int | None) -> dict[str, Any] | None:
    """``request`` with every field above ``limit`` lowered to it; None when nothing needed lowering."""
    if limit is None:
        return None
    over = {field: limit for field in PREDICT_FIELDS if (n := _number(request.get(field))) is not None and n > limit}
    return {**request, **over} if over else None
