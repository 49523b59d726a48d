"""All models together: admission (who may hold a slot), leases, load/unload, adoption, shutdown.

The supervisor is the gateway's ModelDirectory in the embedded shape. Its one lock, ``_admission``,
serialises slot decisions so that two models starting at once cannot both take the last slot; the
choice itself is ``policy.choose_victims``. Requests for a model that already holds a slot never
touch the lock (the hot path stays lock-free).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from controller.background import Background
from controller.catalog import Catalog, CatalogEntry
from controller.config import Config
from controller.errors import BackendStartFailed, Forbidden, ModelStopping, NoCapacity, ShuttingDown
from controller.launch import (
    build_launch_spec,
    context_size,
    gpu_ids,
    memory_estimate,
    model_policy,
    requirements_from_labels,
)
from controller.lifecycle.model import ManagedModel, Probe, Publish, Requirements, Snapshot
from controller.lifecycle.policy import Limits, Loaded, Refuse, Target, choose_victims
from controller.runtime.base import Backend, LaunchSpec, Runtime
from controller.runtime.logs import LogBook
from proxy.directory import Allowed, Lease, ModelInfo

log = logging.getLogger(__name__)


def capabilities(entry: CatalogEntry) -> tuple[str, ...]:
    """What the GGUF says the model can do (Ollama's capability names)."""
    meta = entry.metadata
    if meta is None:
        return ()
    caps: list[str] = []
    embedding_only = meta.pooling_type is not None and not meta.chat_template
    if not embedding_only:
        caps.append("completion")
    if embedding_only or (entry.config and entry.config.embeddings):
        caps.append("embedding")
    template = meta.chat_template or ""
    if "tools" in template:
        caps.append("tools")
    if "<think>" in template or "enable_thinking" in template or "reasoning_content" in template:
        caps.append("thinking")
    if meta.has_vision or (entry.config and entry.config.mmproj):
        caps.append("vision")
    if any(key in meta.values for key in ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id")):
        caps.append("insert")
    return tuple(caps)


class Supervisor:
    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        catalog: Catalog,
        logbook: LogBook,
        probe: Probe,
        publish: Publish,
        binary: Callable[[], str],
        supported_flags: frozenset[str] = frozenset(),
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.catalog = catalog
        self.logbook = logbook
        self._probe = probe
        self._publish = publish
        self._binary = binary
        self._flags = supported_flags
        self._models: dict[str, ManagedModel] = {}
        self._admission = asyncio.Lock()
        self._closing = False
        self._background = Background()
        self.ready = False

    def set_flags(self, flags: frozenset[str]) -> None:
        """The long flags the llama-server binary accepts (probed once at start-up)."""
        self._flags = flags

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Scan the catalog, adopt or remove backends a previous controller left, preload pinned models."""
        await self.catalog.refresh()
        await self._adopt_or_remove(await self.runtime.list_managed())
        for entry in self.catalog.entries():
            if entry.config and entry.config.pinned and not entry.error:
                self._background.spawn(self.load(entry.name), f"preload:{entry.name}")
        self.ready = True

    async def _adopt_or_remove(self, backends: list[Backend]) -> None:
        adopted = 0
        for backend in backends:
            entry = self.catalog.get(backend.model)
            reason = await self._adoption_refusal(backend, entry, adopted)
            if reason is None and entry is not None:
                requirements = self._effective(entry, requirements_from_labels(backend.labels))
                await self._model(entry).adopt(backend, requirements)
                adopted += 1
                log.info("adopted running backend for %s (pid/handle %s)", entry.name, backend.handle)
                continue
            log.info("removing backend %s left by a previous run: %s", backend.handle, reason)
            await self.runtime.stop(backend, self.config.runtime.stop_timeout)

    async def _adoption_refusal(self, backend: Backend, entry: CatalogEntry | None, adopted: int) -> str | None:
        if entry is None:
            return f"model {backend.model} is no longer in the catalog"
        if adopted >= self.config.scheduling.max_loaded_models:
            return "max_loaded_models is already reached"
        try:
            expected = self._spec(entry, self._effective(entry, requirements_from_labels(backend.labels)))
        except BackendStartFailed as exc:
            return exc.message
        if expected.spec_hash != backend.spec_hash:
            return "its command line or model file changed"
        if not await self._probe(backend, 2.0):
            return "it does not answer /health"
        return None

    async def close(self) -> None:
        """Stop every backend (unless configured to survive for adoption) and every owner task."""
        self._closing = True
        self._background.cancel()
        keep = self.config.runtime.keep_backends_on_exit
        await asyncio.gather(*(model.close(stop_backend=not keep) for model in self._models.values()))
        await self.runtime.close()

    # ------------------------------------------------------------------ models

    def _effective(self, entry: CatalogEntry, wanted: Requirements) -> Requirements:
        """Requirements with the context the backend would really get (configured, raised by a request's
        num_ctx, capped at what the model was trained for), so that comparisons are between real sizes:
        a request for less than the backend runs with, or for more than the model supports, restarts
        nothing. A context the config chose (not a request) is taken from the current config, so a
        backend left by a run with another config is not adopted."""
        embeddings = wanted.embeddings or bool(entry.config and entry.config.embeddings)
        asked = wanted.ctx_size if wanted.ctx_requested else None
        ctx = context_size(entry, self.config, Requirements(embeddings, asked))
        return Requirements(embeddings, ctx, wanted.ctx_requested)

    def _spec(self, entry: CatalogEntry, requirements: Requirements) -> LaunchSpec:
        return build_launch_spec(entry, self.config, self._binary(), requirements, self._flags)

    def _model(self, entry: CatalogEntry) -> ManagedModel:
        model = self._models.get(entry.key)
        if model is None:
            key = entry.key

            def make_spec(requirements: Requirements) -> LaunchSpec:
                current = self.catalog.get(key) or entry
                current.require_loadable()
                return self._spec(current, requirements)

            model = ManagedModel(
                entry.key,
                model_policy(entry, self.config),
                self.runtime,
                make_spec,
                self._probe,
                self.logbook,
                self._publish,
                label=entry.name,
            )
            self._models[entry.key] = model
        return model

    def loaded(self) -> list[ManagedModel]:
        return [m for m in self._models.values() if m.holds_slot]

    async def _admit(self, model: ManagedModel, entry: CatalogEntry, exclusive: bool) -> None:
        """Grant ``model`` a slot, stopping others as the policy decides (busy ones after they drain)."""
        if model.holds_slot and not exclusive:
            return
        async with self._admission:
            while True:
                if self._closing:
                    raise ShuttingDown("the server is shutting down")
                others = [m for m in self.loaded() if m is not model]
                if model.holds_slot and not exclusive:
                    return
                decision = choose_victims(
                    Target(entry.key, memory_estimate(entry), gpu_ids(entry, self.config), exclusive),
                    [self._as_loaded(m) for m in others],
                    Limits(self.config.scheduling.max_loaded_models, self.config.scheduling.gpu_memory),
                )
                if isinstance(decision, Refuse):
                    raise NoCapacity(decision.reason)
                if not decision.victims:
                    model.reserve()
                    return
                log.info("evicting %s to make room for %s", ", ".join(decision.victims), entry.name)
                await asyncio.gather(*(self._models[name].request_stop() for name in decision.victims))

    def _as_loaded(self, model: ManagedModel) -> Loaded:
        entry = self.catalog.get(model.name)
        return Loaded(
            name=model.name,
            pinned=model.policy.pinned,
            # Queued requests count as busy: a model just admitted for waiting requests is not
            # evicted before they ran, which would let two models evict each other forever.
            in_flight=model.in_flight + model.queued,
            last_used=model.last_used,
            memory=memory_estimate(entry) if entry else 0,
            gpus=gpu_ids(entry, self.config) if entry else (),
        )

    @asynccontextmanager
    async def lease(
        self,
        name: str,
        *,
        keep_alive: float | None = None,
        embeddings: bool = False,
        ctx_size: int | None = None,
        exclusive: bool = False,
        allowed: Allowed | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold a ready backend for ``name`` for the duration of the block (see ModelDirectory)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        started = time.monotonic()
        entry = await self._lookup(name, allowed)
        entry.require_loadable()
        model = self._model(entry)
        requirements = self._effective(
            entry, Requirements(embeddings=embeddings, ctx_size=ctx_size, ctx_requested=ctx_size is not None)
        )
        model.admit_request()
        try:
            while True:
                await self._admit(model, entry, exclusive)
                try:
                    backend = await model.ensure_ready(requirements)
                except ModelStopping:
                    continue  # unloaded or evicted while we waited: ask for a slot again
                await model.acquire_slot()
                if model.take_lease(backend):
                    break
                model.release_slot()
        finally:
            model.leave_queue()
        try:
            yield Lease(model=entry.name, url=backend.url, load_duration=time.monotonic() - started)
        finally:
            model.release(keep_alive)

    async def load(self, name: str, *, exclusive: bool = False, keep_alive: float | None = None) -> ModelInfo:
        """Make ``name`` ready (switching away from the others when ``exclusive``) and return its info."""
        async with self.lease(name, keep_alive=keep_alive, exclusive=exclusive) as lease:
            model_name = lease.model
        return await self.model(model_name)

    async def _lookup(self, name: str, allowed: Allowed | None) -> CatalogEntry:
        entry = await self.catalog.lookup(name)
        if allowed is not None and not allowed(entry.name):
            raise Forbidden(f"these credentials may not use model '{name}'")
        return entry

    async def unload(self, name: str, allowed: Allowed | None = None) -> None:
        entry = await self._lookup(name, allowed)
        model = self._models.get(entry.key)
        if model is not None:
            await model.request_stop()

    # ------------------------------------------------------------------ views

    def _info(self, entry: CatalogEntry) -> ModelInfo:
        model = self._models.get(entry.key)
        meta = entry.metadata
        snapshot = model.snapshot() if model else Snapshot()
        loaded_ctx: int | None = None
        if model is not None and model.backend is not None:
            loaded_ctx = context_size(entry, self.config, model.requirements)
        metadata: dict[str, Any] = {}
        if meta is not None:
            metadata = {**meta.values, **{key: [] for key in meta.array_lengths}}
        layers = entry.config.n_gpu_layers if entry.config else None
        if layers is None:
            layers = self.config.defaults.n_gpu_layers
        gpus = entry.config.gpus if entry.config else "all"
        return ModelInfo(
            name=entry.name,
            aliases=entry.aliases,
            size=entry.size,
            modified_at=entry.modified_at,
            digest=entry.digest,
            architecture=meta.architecture if meta else None,
            parameter_count=meta.parameter_count if meta else None,
            quantization=meta.file_type if meta else None,
            context_length=meta.context_length if meta else None,
            state=snapshot.state,
            expires_at=snapshot.expires_at,
            loaded_context_length=loaded_ctx,
            context_size=context_size(entry, self.config, Requirements()),
            loadable=entry.error is None,
            error=entry.error or snapshot.error,
            capabilities=capabilities(entry),
            metadata=metadata,
            chat_template=meta.chat_template if meta else None,
            license=str(meta.values["general.license"]) if meta and "general.license" in meta.values else None,
            gpu_offload=gpus != "none" and bool(layers),
        )

    async def models(self) -> list[ModelInfo]:
        await self.catalog.refresh()
        return [self._info(entry) for entry in self.catalog.entries()]

    async def model(self, name: str, allowed: Allowed | None = None) -> ModelInfo:
        return self._info(await self._lookup(name, allowed))

    def status(self, entry: CatalogEntry) -> dict[str, Any]:
        """The control API's view of one model: catalog facts plus live state."""
        model = self._models.get(entry.key)
        info = self._info(entry)
        live = model.snapshot() if model else Snapshot()
        return {
            "name": entry.name,
            "aliases": list(entry.aliases),
            "source": entry.source,
            "path": str(entry.path),
            "size": entry.size,
            "digest": entry.digest,
            "modified_at": entry.modified_at,
            "architecture": info.architecture,
            "parameter_count": info.parameter_count,
            "quantization": info.quantization,
            "context_length": info.context_length,
            "loaded_context_length": info.loaded_context_length,
            "capabilities": list(info.capabilities),
            "pinned": bool(entry.config and entry.config.pinned),
            "file_error": entry.error,
            **asdict(live),
        }
