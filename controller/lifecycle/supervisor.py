"""All models together: admission (who may hold a slot), leases, load/unload, adoption, shutdown.

The supervisor is the gateway's ModelDirectory in the embedded shape. Its one lock, ``_admission``,
serialises slot decisions so that two models starting at once cannot both take the last slot; the
choice itself is ``policy.choose_victims``. The lock is never held while victims drain: a switch waits
for its own victims, and loads that need no victim go ahead meanwhile. Requests for a model that already
holds a slot never touch the lock (the hot path stays lock-free).

``resolve`` is the one rule for "may this caller touch this model", used by every caller: the gateway,
the native passthrough, the control API and the web page.

The admission rules, adoption and the reconcile passes, and how they meet each model's owner task:
controller/lifecycle/design.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Collection, Mapping
from contextlib import asynccontextmanager

from common import notes
from common.background import Background, cancel_and_wait
from common.directory import Allowed, BackendRef, DirectoryEntry, Lease, LiveState, ModelInfo, forbidden
from common.errors import LlamaControllerError, ModelNotFound, NoCapacity, NotLeader, ShuttingDown
from controller.catalog.entries import Catalog, CatalogEntry
from controller.catalog.profile import ModelProfile, build_profile
from controller.catalog.requirements import NOTHING_SPECIAL, ModelPolicy, Requirements
from controller.config import Config
from controller.lifecycle.gateways import GatewayReports
from controller.lifecycle.model import ManagedModel, Probe, Publish
from controller.lifecycle.policy import Evict, Limits, Loaded, Refuse, Target, Wait, choose_victims
from controller.lifecycle.reconcile import compare
from controller.lifecycle.state import State
from controller.runtime.base import Backend, LaunchSpec, Runtime
from controller.runtime.keys import BackendKeys
from controller.runtime.logs import LogBook

log = logging.getLogger(__name__)


NOT_PUBLISHED = ("", 1 << 62)  # a drain the gateways cannot have seen yet: every live one is behind it
SETTLING_POLL = 0.25  # seconds between looks at a settling model whose load may fail without a signal


def admits(policy: ModelPolicy, gateways: int) -> int:
    """One gateway's part of a model's bound on requests at once (running and queued), at least one: N gateways
    together admit what one process would, not N times it (rounded up)."""
    bound = policy.max_concurrent + policy.queue_depth
    return max(1, -(-bound // max(1, gateways)))


async def wait_for_progress(models: list[ManagedModel]) -> None:
    """Until one of ``models`` has served a request it was admitted for, or given its slot up."""
    waits = [asyncio.ensure_future(model.wait_progress(SETTLING_POLL)) for model in models]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class Supervisor:
    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        catalog: Catalog,
        logbook: LogBook,
        probe: Probe,
        publish: Publish,
        supported_flags: Collection[str] = (),
        *,
        keys: BackendKeys | None = None,
        key_check: Probe | None = None,
        standby: bool = False,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.catalog = catalog
        self.logbook = logbook
        self._probe = probe
        self._publish = publish
        self._flags = frozenset(supported_flags)
        self._keys = keys or BackendKeys.ephemeral()
        self._key_check = key_check  # does an adopted backend accept the key derived for it?
        self._models: dict[str, ManagedModel] = {}
        self._profiles: dict[str, ModelProfile] = {}
        self._admission = asyncio.Lock()  # held to decide, never to wait
        self._turns = asyncio.Lock()  # admissions that must make room, in arrival order (asyncio locks are FIFO)
        self._claim: Loaded | None = None  # the room the admission whose turn it is is waiting for
        self._evicting: set[str] = set()  # the models it stopped: their requests queue behind it
        self._closing = False
        self._background = Background()
        self._passes = asyncio.Lock()  # one reconcile pass at a time
        self._resync = asyncio.Event()  # the runtime's watch was lost and is back: a pass now
        self._suspects: frozenset[str] = frozenset()  # own backends in nobody's books at the last pass
        self._passing: asyncio.Task[None] | None = None
        # A standby's supervisor (leader election) admits nothing until start(), which it reaches only once its
        # controller leads; abandon() (the lease lost) makes it admit nothing again and keep every backend.
        self._acting = not standby
        self._abandoned = False
        self.ready = False

    def set_flags(self, flags: Collection[str]) -> None:
        """The long flags the llama-server binary accepts (probed once at start-up)."""
        self._flags = frozenset(flags)
        self._profiles.clear()

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Scan the catalog, adopt or remove backends a previous controller left, preload pinned models, and
        from then on compare what runs with the books on a slow timer and after each resync of the runtime."""
        await self.catalog.refresh()
        await self.reconcile()
        self._acting = True
        for entry in self.catalog.entries():
            if entry.config and entry.config.pinned and not entry.error:
                self._background.spawn(self.load(entry.name), f"preload:{entry.name}")
        self.runtime.on_resync(self._resync.set)
        self._passing = asyncio.create_task(self._reconcile_forever(), name="reconcile")
        self.ready = True

    def _booked(self) -> dict[str, Backend]:
        return {backend.handle: backend for model in self._models.values() if (backend := model.booked)}

    async def reconcile(self) -> None:
        """One pass (lifecycle/reconcile.py): list what the runtime runs, compare it with the books, and adopt
        or remove what nobody books, remove own strays, and fail models whose backend is gone."""
        async with self._passes:
            before = self._booked()
            listed = await self.runtime.list_managed()
            difference = compare(before, self._booked(), listed, self._suspects)
            self._suspects = difference.suspects
            for backend in difference.missing:
                model = self._models.get(backend.model)
                if model is not None:
                    model.lost(backend, "its runtime no longer runs it (it was removed behind the controller's back)")
            await self._adopt_or_remove(list(difference.unknown))
            for backend in difference.strays:
                log.warning(
                    "removing backend %s of %s: no model of this controller books it", backend.handle, backend.model
                )
                await self._remove(backend)

    async def _reconcile_forever(self) -> None:
        interval = self.config.runtime.reconcile_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._resync.wait()
            self._resync.clear()
            try:
                await self.reconcile()
            except LlamaControllerError as exc:  # the engine or API server is away: the next pass tries again
                log.warning("reconcile pass failed (%s); the next one in %gs", exc.message, interval)

    async def _remove(self, backend: Backend) -> None:
        """Stop a backend nobody books; a failure is logged, and the next pass meets it again."""
        try:
            await self.runtime.stop(backend, self.config.runtime.stop_timeout)
        except LlamaControllerError as exc:
            log.warning("could not remove backend %s (%s); the next pass tries again", backend.handle, exc.message)

    async def _adopt_or_remove(self, backends: list[Backend]) -> None:
        """Keep at most one healthy, matching backend per model, within max_loaded_models; stop every other
        one. Never raises: a backend that cannot be handled is logged, and the pass goes on."""
        by_model: dict[str, list[Backend]] = defaultdict(list)
        for backend in sorted(backends, key=lambda b: b.started_at, reverse=True):  # newest first
            by_model[backend.model].append(backend)
        for model_key, candidates in by_model.items():
            for found in candidates:
                backend = self._keys.recover(found)
                try:
                    reason = await self._adoption_refusal(backend)
                    if reason is None:
                        profile = self.profile(self.catalog.get(model_key))  # type: ignore[arg-type]
                        self._model(profile).adopt(backend, profile.effective(Requirements.from_labels(backend.labels)))
                        log.info("adopted running backend for %s (handle %s)", profile.name, backend.handle)
                        continue
                    log.info("removing backend %s: %s", backend.handle, reason)
                    await self.runtime.stop(backend, self.config.runtime.stop_timeout)
                except Exception:
                    log.exception("could not adopt or remove backend %s", backend.handle)

    async def _adoption_refusal(self, backend: Backend) -> str | None:
        entry = self.catalog.get(backend.model)
        if entry is None:
            return f"model {backend.model} is no longer in the catalog"
        model = self._models.get(entry.key)
        if model is not None and (model.holds_slot or model.booked is not None):
            return "the model runs (or is starting) another backend: a duplicate"
        if len(self.loaded()) >= self.config.scheduling.max_loaded_models:
            return "max_loaded_models is already reached"
        profile = self.profile(entry)
        try:
            entry.require_loadable()
            expected = profile.spec(profile.effective(Requirements.from_labels(backend.labels)))
        except LlamaControllerError as exc:
            return exc.message
        if expected.spec_hash != backend.spec_hash:
            return "its command line or model file changed"
        if not await self._probe(backend, 2.0):
            return "it does not answer /health"
        if self._key_check is not None and not await self._key_check(backend, 2.0):
            return "it does not accept the API key derived for it (was identity.key replaced?)"
        return None

    def abandon(self) -> None:
        """This controller no longer leads: admit nothing, compare nothing, and leave every backend running at
        close for the next leader to adopt (the runtime refuses this controller's calls already)."""
        self._acting = False
        self._abandoned = True
        if self._passing is not None:
            self._passing.cancel()

    def _require_acting(self) -> None:
        if not self._acting:
            if self._abandoned:
                raise NotLeader("this controller no longer leads: it is ending, another one takes over")
            raise NotLeader("standby: another controller leads (control requests go to the leader)")

    async def _keep_on_exit(self) -> bool:
        setting = self.config.runtime.keep_backends_on_exit
        if setting != "auto":
            return setting
        try:
            torn_down = await self.runtime.torn_down()
        except Exception as exc:  # the engine does not answer: stopping is what leaves nothing behind
            log.warning("cannot tell a restart from a teardown (%s); stopping the backends", exc)
            return False
        log.info("%s: %s its backends", "teardown" if torn_down else "restart", "stopping" if torn_down else "keeping")
        return not torn_down

    async def close(self) -> None:
        """Stop every backend (unless configured to survive for adoption, or abandoned) and every owner task."""
        self._closing = True
        await cancel_and_wait(self._passing)
        self._background.cancel()
        keep = self._abandoned or await self._keep_on_exit()
        await asyncio.gather(*(model.close(stop_backend=not keep) for model in self._models.values()))
        await self._background.drain()
        await self.runtime.close()

    # ------------------------------------------------------------------ models

    def profile(self, entry: CatalogEntry) -> ModelProfile:
        """The entry's settings, derived once per version of the entry (and of the llama-server flags)."""
        profile = self._profiles.get(entry.key)
        if profile is None or profile.entry is not entry:
            profile = self._profiles[entry.key] = build_profile(entry, self.config, self._flags)
        return profile

    def _model(self, profile: ModelProfile) -> ManagedModel:
        model = self._models.get(profile.key)
        if model is None:
            key = profile.key

            def make_spec(requirements: Requirements) -> LaunchSpec:
                current = self.catalog.get(key) or profile.entry
                current.require_loadable()
                return self._keys.issue(self.profile(current).spec(requirements))

            model = ManagedModel(
                key,
                profile.policy,
                self.runtime,
                make_spec,
                self._probe,
                self.logbook,
                self._publish,
                profile.name,
            )
            self._models[key] = model
        return model

    def loaded(self) -> list[ManagedModel]:
        return [m for m in self._models.values() if m.holds_slot]

    async def _admit(self, model: ManagedModel, profile: ModelProfile, exclusive: bool) -> None:
        """Grant ``model`` a slot, stopping others as the policy decides (busy ones after they drain).

        A slot that is free is taken at once. When others must make room, admissions take turns, first come
        first served (``_turns``, held across the wait for the victims), and the room being made is claimed
        (``_claim``) so a newcomer cannot take it: models contending for too few slots are served in rotation,
        none starved. The models it stops (``_evicting``), for a switch too, are not admitted again before
        it: their waiting requests take a turn behind it, or a busy victim would be restarted into the room
        freed for the switch, again and again. The decision lock covers the decision and the stop intents,
        never a wait, so requests for models that hold a slot, and loads that need no room, go ahead."""
        if model.holds_slot and not exclusive:
            return
        if await self._admission_round(model, profile, exclusive, may_evict=False):
            return
        async with self._turns:
            try:
                while not await self._admission_round(model, profile, exclusive, may_evict=True):
                    exclusive = exclusive and any(m is not model for m in self.loaded())
            finally:
                self._claim = None
                self._evicting.clear()

    async def _admission_round(
        self, model: ManagedModel, profile: ModelProfile, exclusive: bool, may_evict: bool
    ) -> bool:
        """One decision: True once ``model`` holds its slot; otherwise (if allowed) make room and return False."""
        async with self._admission:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            self._require_acting()
            if model.holds_slot and not exclusive:
                return True
            if not may_evict and model.name in self._evicting:
                return False  # stopped to make room for the admission whose turn it is: queue behind it
            others = [self._as_loaded(m) for m in self.loaded() if m is not model]
            claim = self._claim
            if not may_evict and claim is not None and claim.name != model.name:
                others.append(claim)  # room being made for the admission whose turn it is: not free for us
            decision = choose_victims(
                Target(profile.key, profile.memory, profile.budget_gpus, exclusive),
                others,
                Limits(self.config.scheduling.max_loaded_models, self.config.scheduling.gpu_memory),
            )
            if isinstance(decision, Refuse):
                raise NoCapacity(decision.reason)
            if isinstance(decision, Evict) and not decision.victims:
                model.reserve()
                return True
            if not may_evict:
                return False
            if isinstance(decision, Wait):
                settling = [self._models[name] for name in decision.settling]
                victims: list[ManagedModel] = []
            else:
                settling = []
                victims = [self._models[name] for name in decision.victims]
                if not exclusive:  # a switch empties the machine anyway: nothing to hold for it
                    self._claim = Loaded(
                        profile.key, in_flight=1, memory=profile.memory, gpus=profile.budget_gpus, settling=True
                    )
                self._evicting.update(decision.victims)
                log.info("evicting %s to make room for %s", ", ".join(decision.victims), profile.name)
                for victim in victims:
                    victim.request_stop()
        if settling:  # outside the lock, which they may need to make progress
            await wait_for_progress(settling)
        await asyncio.gather(*(victim.wait_stopped() for victim in victims))
        return False

    def _as_loaded(self, model: ManagedModel) -> Loaded:
        profile = self._profiles.get(model.name)
        return Loaded(
            name=model.name,
            pinned=model.policy.pinned,
            in_flight=model.in_flight + model.queued,  # waiting requests make a model busy
            last_used=model.last_used,
            memory=profile.memory if profile else 0,
            gpus=profile.budget_gpus if profile else (),
            settling=model.settling,
        )

    async def resolve(self, name: str, allowed: Allowed | None = None) -> CatalogEntry:
        """The catalog entry for ``name`` if the caller may touch it: the one model-authorization rule.

        The allow-list is matched against the resolved catalog name, so an alias cannot get around it.
        A name outside the allow-list is 403 whether or not such a model exists (existence never leaks
        outside a caller's allow-list); inside it, an unknown model is 404."""
        try:
            entry = await self.catalog.lookup(name)
        except ModelNotFound:
            if allowed is not None and not allowed(name):
                raise forbidden(name) from None
            raise
        if allowed is not None and not allowed(entry.name):
            raise forbidden(name)
        notes.note_model(entry.name)  # the request's metrics are labelled with this name, never its spelling
        return entry

    @asynccontextmanager
    async def lease(
        self,
        name: str,
        *,
        keep_alive: float | None = None,
        embeddings: bool = False,
        ctx_size: int | None = None,
        num_predict: int | None = None,
        exclusive: bool = False,
        allowed: Allowed | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold a ready backend for ``name`` for the duration of the block (see ModelDirectory)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        self._require_acting()
        started = time.monotonic()
        entry = await self.resolve(name, allowed)
        entry.require_loadable()
        profile = self.profile(entry)
        profile.check_limits(ctx_size, num_predict)
        model = self._model(profile)
        wanted = Requirements(embeddings=embeddings, ctx_size=ctx_size, ctx_requested=ctx_size is not None)

        def admit() -> Awaitable[None]:
            return self._admit(model, profile, exclusive)

        async with model.lease(profile.effective(wanted), keep_alive, admit) as backend:
            waited = time.monotonic() - started
            yield Lease(
                entry.name,
                backend.url,
                waited,
                api_key=backend.api_key,
                max_predict=profile.max_predict,
                handle=backend.handle,
            )

    async def load(self, name: str, *, exclusive: bool = False, keep_alive: float | None = None) -> ModelInfo:
        """Make ``name`` ready (switching away from the others when ``exclusive``) and return its info."""
        async with self.lease(name, keep_alive=keep_alive, exclusive=exclusive) as lease:
            model_name = lease.model
        return await self.model(model_name)

    async def unload(self, name: str, allowed: Allowed | None = None) -> None:
        self._require_acting()
        entry = await self.resolve(name, allowed)
        model = self._models.get(entry.key)
        if model is not None:
            await model.stop()

    # ------------------------------------------------------------------ views

    def info(self, entry: CatalogEntry) -> ModelInfo:
        """The one view of a model: catalog facts plus live state."""
        profile = self.profile(entry)
        model = self._models.get(entry.key)
        meta = entry.metadata
        live = model.snapshot(profile.context_size(model.requirements)) if model else LiveState()
        metadata = {**meta.values, **{key: [] for key in meta.array_lengths}} if meta else {}
        return ModelInfo(
            name=entry.name,
            aliases=entry.aliases,
            source=entry.source,
            path=str(entry.path),
            size=entry.size,
            modified_at=entry.modified_at,
            digest=entry.digest,
            architecture=meta.architecture if meta else None,
            parameter_count=meta.parameter_count if meta else None,
            quantization=meta.file_type if meta else None,
            context_length=meta.context_length if meta else None,
            context_size=profile.context_size(Requirements()),
            pinned=profile.policy.pinned,
            file_error=entry.error,
            capabilities=profile.capabilities,
            metadata=metadata,
            chat_template=meta.chat_template if meta else None,
            license=str(meta.values["general.license"]) if meta and "general.license" in meta.values else None,
            gpu_offload=profile.gpus != "none" and bool(profile.n_gpu_layers),
            context_shift=profile.context_shift,
            live=live,
        )

    async def models(self, allowed: Allowed | None = None) -> list[ModelInfo]:
        entries = await self.catalog.refresh()
        return [self.info(entry) for entry in entries if allowed is None or allowed(entry.name)]

    async def model(self, name: str, allowed: Allowed | None = None) -> ModelInfo:
        return self.info(await self.resolve(name, allowed))

    async def directory(self, rescan: bool = True, gateways: int = 1) -> list[DirectoryEntry]:
        """Every model as the gateway processes see it: its info, its backend and the limits they apply (the
        bound on requests at once shared out over ``gateways``); ``rescan``: look at the models folder again
        (new, changed and removed files) first."""
        published = []
        for entry in await self.catalog.refresh() if rescan else self.catalog.entries():
            profile = self.profile(entry)
            model = self._models.get(entry.key)
            backends: tuple[BackendRef, ...] = ()
            if model is not None and model.backend is not None and model.state is State.READY:
                backend, running = model.backend, model.requirements
                ctx = profile.context_size(running)
                ref = BackendRef(backend.handle, backend.url, backend.api_key, running.embeddings, ctx, model.draining)
                backends = (ref,)
            published.append(
                DirectoryEntry(
                    self.info(entry),
                    backends,
                    max_predict=profile.max_predict,
                    refuse_over_limit=profile.refuse_over_limit,
                    admits=admits(profile.policy, gateways),
                )
            )
        return published

    def take_reports(self, reports: GatewayReports, drains: Mapping[str, tuple[str, int]]) -> None:
        """Hand each model what the gateway processes report about its current backend. ``drains``: per model,
        the directory (epoch, revision) that published it draining; one draining and not published yet waits for
        every gateway."""
        for key, model in self._models.items():
            entry = self.catalog.get(key)
            name = entry.name if entry else key
            backend = model.backend
            drain = drains.get(name, NOT_PUBLISHED) if model.draining else None
            model.remote_use(reports.use(name, backend.handle if backend else None, drain))

    def ready_backends(self) -> list[tuple[str, Backend]]:
        """(catalog name, backend) of every ready model, key included: for scraping the backends' /metrics."""
        found = []
        for model in self._models.values():
            entry = self.catalog.get(model.name)
            if model.state is State.READY and model.backend is not None and entry is not None:
                found.append((entry.name, model.backend))
        return found

    def view(self, name: str) -> LiveState:
        """A model's live state by canonical name or spelling (tests, diagnostics)."""
        entry = self.catalog.get(name) or self.catalog.get(f"{name}:latest")
        model = self._models.get(entry.key) if entry else None
        return model.snapshot() if model else LiveState()

    def spec_for(self, name: str, requirements: Requirements = NOTHING_SPECIAL) -> LaunchSpec:
        entry = self.catalog.get(name) or self.catalog.get(f"{name}:latest")
        if entry is None:
            raise ModelNotFound(name)
        profile = self.profile(entry)
        return profile.spec(profile.effective(requirements))
