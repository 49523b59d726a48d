"""The only thing the gateway knows about the control plane: a ModelDirectory.

In the embedded shape the directory is the in-process supervisor; a remote implementation can call
the controller over HTTP so gateway replicas scale apart from the single-writer controller.
Errors crossing this boundary are the ones in ``controller.errors`` (the shared exception tree).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Lease:
    """Permission to send one request to a ready backend; held for the request's whole duration."""

    model: str  # the catalog's name for the model (requests may have used an alias)
    url: str  # backend base URL, e.g. http://127.0.0.1:40123
    load_duration: float  # seconds this request waited for the model to be ready


@dataclass(frozen=True)
class ModelInfo:
    """What clients may learn about a model: enough for /api/tags, /api/show, /api/ps and /v1/models."""

    name: str
    aliases: tuple[str, ...]
    size: int
    modified_at: float  # seconds since the epoch
    digest: str
    architecture: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int | None  # what the GGUF was trained for
    state: str
    expires_at: float | None
    loaded_context_length: int | None  # what the running backend was started with
    context_size: int  # tokens per request the model is configured for
    loadable: bool = True  # false when the file is missing or not GGUF
    error: str | None = None
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF key/values; long arrays as []
    chat_template: str | None = None
    license: str | None = None
    gpu_offload: bool = False  # the backend was asked to put layers on a GPU


class ModelDirectory(Protocol):
    def lease(
        self,
        name: str,
        *,
        keep_alive: float | None = None,
        embeddings: bool = False,
        ctx_size: int | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """Wait until ``name`` is ready (loading it if needed) and hold it while the block runs."""

    async def unload(self, name: str) -> None:
        """Stop the model once its in-flight requests have finished."""

    async def models(self) -> Sequence[ModelInfo]:
        """Every model in the catalog, loaded or not."""

    async def model(self, name: str) -> ModelInfo:
        """One model by name or alias; raise ModelNotFound / InvalidModelName."""
