"""The only thing the gateway knows about the control plane: a ModelDirectory.

In the embedded shape the directory is the in-process supervisor; a remote implementation can call
the controller over HTTP so gateway replicas scale apart from the single-writer controller.
Errors crossing this boundary are the ones in ``controller.errors`` (the shared exception tree).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
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


Allowed = Callable[[str], bool]  # may the caller use the model of this catalog name?
ALLOW_MODEL_KEY = "llamacontroller.allow_model"  # where the auth layer leaves the predicate in the ASGI scope


class ModelDirectory(Protocol):
    def lease(
        self,
        name: str,
        *,
        keep_alive: float | None = None,
        embeddings: bool = False,
        ctx_size: int | None = None,
        allowed: Allowed | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """Wait until ``name`` is ready (loading it if needed) and hold it while the block runs.

        ``allowed`` is checked against the resolved catalog name (so an alias cannot get around a
        token's model allow-list); a refusal raises Forbidden."""

    async def unload(self, name: str, allowed: Allowed | None = None) -> None:
        """Stop the model once its in-flight requests have finished."""

    async def models(self) -> Sequence[ModelInfo]:
        """Every model in the catalog, loaded or not."""

    async def model(self, name: str, allowed: Allowed | None = None) -> ModelInfo:
        """One model by name or alias; raise ModelNotFound / InvalidModelName / Forbidden."""


class Restricted:
    """The directory as one caller sees it: only the models its credentials allow."""

    def __init__(self, inner: ModelDirectory, allowed: Allowed | None) -> None:
        self._inner = inner
        self._allowed = allowed

    @classmethod
    def for_scope(cls, inner: ModelDirectory, scope: MutableMapping[str, Any]) -> Restricted:
        return cls(inner, scope.get(ALLOW_MODEL_KEY))

    def lease(
        self, name: str, *, keep_alive: float | None = None, embeddings: bool = False, ctx_size: int | None = None
    ) -> AbstractAsyncContextManager[Lease]:
        return self._inner.lease(
            name, keep_alive=keep_alive, embeddings=embeddings, ctx_size=ctx_size, allowed=self._allowed
        )

    async def unload(self, name: str) -> None:
        await self._inner.unload(name, self._allowed)

    async def models(self) -> list[ModelInfo]:
        models = await self._inner.models()
        return [m for m in models if self._allowed is None or self._allowed(m.name)]

    async def model(self, name: str) -> ModelInfo:
        return await self._inner.model(name, self._allowed)
