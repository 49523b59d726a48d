"""The only thing the gateway knows about the control plane: a ModelDirectory (and the data it answers with).

In the single-process shape the directory is the in-process supervisor; gateway processes follow the
controller's published directory over HTTP (``proxy/remote.py``, the protocol in docs/architecture.md), whose
entries are ``DirectoryEntry`` values: a model's info, its backends and the limits a gateway applies alone.
Errors crossing this boundary are the ones in ``common.errors`` (the shared exception tree).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from common.errors import Forbidden
from common.upstream import bearer


@dataclass(frozen=True)
class Lease:
    """Permission to send one request to a ready backend; held for the request's whole duration."""

    model: str  # the catalog's name for the model (requests may have used an alias)
    url: str  # backend base URL, e.g. http://127.0.0.1:40123
    load_duration: float  # seconds this request waited for the model to be ready
    api_key: str = field(default="", repr=False)  # the backend's own key: only the gateway sends it
    max_predict: int | None = None  # tokens one request may generate (the model's max_predict); None: no limit
    handle: str = ""  # the backend's pid or container id (what a gateway counts its requests against)

    @property
    def credentials(self) -> dict[str, str]:
        """The header that opens the backend; the client's own credentials never reach it."""
        return bearer(self.api_key)


@dataclass(frozen=True)
class LiveState:
    """A model's lifecycle state right now; the defaults describe a model no request has touched yet."""

    state: str = "stopped"  # stopped, starting, ready, stopping, failed
    backend_url: str | None = None
    handle: str | None = None  # pid or container id
    adopted: bool = False  # started by a previous controller
    in_flight: int = 0
    queued: int = 0
    expires_at: float | None = None  # wall clock; None = never, or not idle
    load_duration: float = 0.0
    starts: int = 0
    failures: int = 0
    error: str | None = None  # why it failed, while failed; why its stop failed, while that is tried again
    embeddings: bool = False  # the running backend serves embeddings
    loaded_context_length: int | None = None  # tokens per request the running backend was started with


@dataclass(frozen=True)
class ModelInfo:
    """The one view of a model: catalog facts (from the GGUF and the config) plus its live state.

    /api/tags, /api/show, /api/ps, /v1/models, the control API and the web page all read this."""

    name: str
    aliases: tuple[str, ...]
    source: str  # "config" or "discovered"
    path: str
    size: int
    modified_at: float  # seconds since the epoch
    digest: str
    architecture: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int | None  # what the GGUF was trained for
    context_size: int  # tokens per request the model is configured for
    pinned: bool
    file_error: str | None  # why the file cannot be loaded (missing, not GGUF)
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF key/values; long arrays as []
    chat_template: str | None = None
    license: str | None = None
    gpu_offload: bool = False  # the backend is asked to put layers on a GPU
    context_shift: bool = False  # the backend runs with --context-shift (Ollama's "shift")
    live: LiveState = field(default_factory=LiveState)

    @property
    def loadable(self) -> bool:
        return self.file_error is None

    @property
    def state(self) -> str:
        return self.live.state

    @property
    def error(self) -> str | None:
        return self.file_error or self.live.error


Allowed = Callable[[str], bool]  # may the caller use the model of this name?


def forbidden(name: str) -> Forbidden:
    """The refusal of a model outside the caller's allow-list, whether or not such a model exists."""
    return Forbidden(f"these credentials may not use model '{name}'")


ALLOW_MODEL_KEY = "llamacontroller.allow_model"  # where the auth layer leaves the predicate in the ASGI scope
HAS_SCOPE_KEY = "llamacontroller.has_scope"  # and the caller's scopes, as a predicate (``"metrics"`` → bool)


class ModelDirectory(Protocol):
    def lease(
        self,
        name: str,
        *,
        keep_alive: float | None = None,
        embeddings: bool = False,
        ctx_size: int | None = None,
        num_predict: int | None = None,
        allowed: Allowed | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """Wait until ``name`` is ready (loading it if needed) and hold it while the block runs.

        ``ctx_size`` and ``num_predict`` are what an Ollama request asked for: the model's limits may refuse
        them (BadRequest) or clamp them.

        ``allowed`` is the caller's model allow-list; a refusal raises Forbidden (see
        ``Supervisor.resolve`` for the one rule every caller goes through)."""

    async def unload(self, name: str, allowed: Allowed | None = None) -> None:
        """Stop the model once its in-flight requests have finished."""

    async def models(self, allowed: Allowed | None = None) -> Sequence[ModelInfo]:
        """Every model in the catalog the caller may see, loaded or not."""

    async def model(self, name: str, allowed: Allowed | None = None) -> ModelInfo:
        """One model by name or alias; raise ModelNotFound / InvalidModelName / Forbidden."""


@dataclass(frozen=True)
class BackendRef:
    """A backend of a model as the directory publishes it: where it is, what it runs with, whether it drains."""

    handle: str  # pid or container id: what gateways count their in-flight requests against
    url: str
    api_key: str = field(default="", repr=False)
    embeddings: bool = False  # started with the embeddings endpoint
    ctx_size: int | None = None  # tokens per request it was started with
    draining: bool = False  # it will stop: gateways send it nothing new


@dataclass(frozen=True)
class DirectoryEntry:
    """One model in the published directory: what a gateway needs to serve it without asking the controller."""

    info: ModelInfo
    backends: tuple[BackendRef, ...] = ()
    max_predict: int | None = None  # the model's max_predict (a request's is lowered to it)
    refuse_over_limit: bool = False  # a request above max_predict is refused, which only the controller says
    # The model's bound on requests at once, running and waiting (max_concurrent + queue_depth), shared out over
    # the live gateways: each takes its part (at least 1); past it a request is refused with 503 (QueueFull).
    admits: int | None = None

    def serving(self, embeddings: bool, ctx_size: int | None, num_predict: int | None) -> BackendRef | None:
        """A ready backend this request may use as it is, or None when only the controller can decide (a load,
        a restart with other flags, a refusal that names a limit)."""
        if self.info.state != "ready":
            return None
        if self.refuse_over_limit and num_predict is not None and self.max_predict is not None:
            if num_predict > self.max_predict:
                return None
        for backend in self.backends:
            if backend.draining or (embeddings and not backend.embeddings):
                continue
            if ctx_size is not None and (backend.ctx_size is None or ctx_size > backend.ctx_size):
                continue
            return backend
        return None

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> DirectoryEntry:
        info = dict(data["info"])
        info["aliases"] = tuple(info["aliases"])
        info["capabilities"] = tuple(info["capabilities"])
        info["live"] = LiveState(**info["live"])
        return cls(
            info=ModelInfo(**info),
            backends=tuple(BackendRef(**backend) for backend in data["backends"]),
            max_predict=data["max_predict"],
            refuse_over_limit=data["refuse_over_limit"],
            admits=data.get("admits"),
        )
