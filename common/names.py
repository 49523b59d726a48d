"""Model names: one strict pattern, Ollama-style ``name[:tag]`` with ``latest`` as the default tag.

Names reach file paths, log file names, pid files, URLs and Caddy routes, so anything outside the
pattern is rejected before it is used anywhere: no path separators, no ``..``, no shell or URL
metacharacters, nothing over-long. Matching is case-insensitive, as in Ollama.
"""

from __future__ import annotations

import re

from common.errors import InvalidModelName

MAX_NAME_LENGTH = 100
DEFAULT_TAG = "latest"

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_NAME = re.compile(rf"(?P<name>{_PART})(?::(?P<tag>{_PART}))?")
_QUANT_SUFFIX = re.compile(r"[-._](?P<quant>(?:i?q[1-8](?:_[a-z0-9]+)*)|f16|f32|bf16|mxfp4)$", re.IGNORECASE)


def validate_model_name(name: str) -> str:
    """Return ``name`` unchanged when it is a valid model name; raise InvalidModelName otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidModelName("model name is required")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelName(f"invalid model name: longer than {MAX_NAME_LENGTH} characters")
    if ".." in name or _NAME.fullmatch(name) is None:
        shown = name if name.isprintable() else repr(name)
        raise InvalidModelName(
            f"invalid model name {shown!r}: use letters, digits, '.', '_' and '-', "
            "optionally followed by ':tag' (no '/', spaces or '..')"
        )
    return name


def canonical(name: str) -> str:
    """The lookup key of a valid name: lower-case, with ``:latest`` when no tag is given."""
    validate_model_name(name)
    return name.lower() if ":" in name else f"{name.lower()}:{DEFAULT_TAG}"


def name_from_filename(stem: str) -> str:
    """Derive an Ollama-style ``name:tag`` from a GGUF file name (without ``.gguf``).

    ``gemma-3-270m-q4_k_m`` → ``gemma-3-270m:q4_k_m``; ``tiny`` → ``tiny:latest``.
    Characters outside the pattern become ``-`` so any file name yields a valid name (or none).
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:MAX_NAME_LENGTH]
    match = _QUANT_SUFFIX.search(cleaned)
    if match and match.start() > 0:
        base = cleaned[: match.start()].strip("-._")
        name = f"{base}:{match.group('quant').lower()}"
    else:
        name = f"{cleaned}:{DEFAULT_TAG}"
    return validate_model_name(name.lower())
