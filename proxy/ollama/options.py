"""Ollama ``options`` → llama-server sampling fields (pure).

Rules, as Ollama has them: unknown keys are ignored; a value of the wrong type is an error
(``option "temperature" must be of type float32``, a 400 here); Ollama's sampling defaults are sent
explicitly, because llama-server's own defaults differ (top_p 0.95, min_p 0.05). ``num_ctx`` is a
load-time setting and comes back separately, so the caller can ask for a backend that large.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from common.errors import BadRequest

log = logging.getLogger(__name__)

# Ollama's DefaultOptions for the sampling fields; sent on every request.
SAMPLING_DEFAULTS: dict[str, float | int] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.9,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_last_n": 64,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}

# option → (Ollama's type name, llama-server field or None when handled separately / not per request)
_KNOWN: dict[str, tuple[str, str | None]] = {
    "temperature": ("float32", "temperature"),
    "top_k": ("int", "top_k"),
    "top_p": ("float32", "top_p"),
    "min_p": ("float32", "min_p"),
    "typical_p": ("float32", "typical_p"),
    "repeat_last_n": ("int", "repeat_last_n"),
    "repeat_penalty": ("float32", "repeat_penalty"),
    "presence_penalty": ("float32", "presence_penalty"),
    "frequency_penalty": ("float32", "frequency_penalty"),
    "seed": ("int", "seed"),
    "num_keep": ("int", "n_keep"),
    "num_predict": ("int", None),
    "stop": ("[]string", "stop"),
    "num_ctx": ("int", None),
    # Load-time settings decided by the config here; accepted (typed) and otherwise ignored.
    "num_batch": ("int", None),
    "num_gpu": ("int", None),
    "main_gpu": ("int", None),
    "num_thread": ("int", None),
    "use_mmap": ("bool", None),
    "draft_num_predict": ("int", None),
    # Removed from Ollama, still sent by some clients: llama-server still has mirostat.
    "mirostat": ("int", "mirostat"),
    "mirostat_tau": ("float32", "mirostat_tau"),
    "mirostat_eta": ("float32", "mirostat_eta"),
    "penalize_newline": ("bool", None),
    "tfs_z": ("float32", None),
    "use_mlock": ("bool", None),
    "numa": ("bool", None),
    "low_vram": ("bool", None),
}
_MAX_STOP_WORDS = 64


@dataclass(frozen=True)
class MappedOptions:
    sampling: dict[str, Any]  # fields for the llama-server request body
    num_predict: int | None  # None: no limit (generation stops at the context end or EOS)
    num_ctx: int | None


def _typed(name: str, kind: str, value: Any) -> Any:
    wrong = BadRequest(f'option "{name}" must be of type {kind}')
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong
        return value
    if kind == "[]string":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong
        if len(value) > _MAX_STOP_WORDS:
            raise BadRequest(f'option "{name}" has more than {_MAX_STOP_WORDS} entries')
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong
    # Checked before math.isfinite, which raises OverflowError on an integer too large for a float.
    if abs(value) > 2**63 or not math.isfinite(value):
        raise wrong
    if kind == "int":
        return int(value)  # JSON numbers: Ollama truncates 1.5 to 1 for int options
    return float(value)


def map_options(options: Any) -> MappedOptions:
    """Validate ``options`` and map it onto llama-server fields (Ollama defaults first)."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object")
    sampling: dict[str, Any] = dict(SAMPLING_DEFAULTS)
    num_predict: int | None = None
    num_ctx: int | None = None
    for name, value in options.items():
        known = _KNOWN.get(name)
        if known is None:
            log.debug("ignoring unknown option %r", name)
            continue
        if value is None:
            continue
        kind, field = known
        typed = _typed(name, kind, value)
        if name == "num_predict":
            num_predict = typed if typed >= 0 else None
        elif name == "num_ctx":
            if typed <= 0:
                raise BadRequest('option "num_ctx" must be greater than 0')
            num_ctx = typed
        elif name == "seed":
            if typed >= 0:
                sampling["seed"] = typed
        elif field is not None:
            sampling[field] = typed
    return MappedOptions(sampling=sampling, num_predict=num_predict, num_ctx=num_ctx)
