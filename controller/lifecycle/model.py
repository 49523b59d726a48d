"""One model, one owner task: every state transition happens in ``ManagedModel._run``.

Callers state an intent — the model's ``goal`` — and never test the state themselves. The owner task makes
the state follow the goal:

    goal    meaning                                      set by
    ------  -------------------------------------------  -----------------------------------------------
    idle    nothing asked: stay stopped (or failed)      a finished stop; a failed start (unpinned)
    run     have a ready backend; holds an admission     the supervisor's admission (``reserve``), an
            slot while set                               adoption, a pinned model's failure
    stop    stop once in-flight requests have drained    ``stop()`` (unload, eviction), keep_alive expiry
    close   shutdown: stop (or keep) the backend, end    ``close()``
            the owner task

``lease()`` is the one way to use the model: it counts the request against the bounded queue, asks for
admission, waits for a ready backend that meets the request's requirements, and holds it for the block.

Invariants, enforced where noted:
- Exactly one start for N concurrent callers: waiters queue on ``_ready_waiters``; only the owner task
  (``ModelOwner._run`` in owner.py) starts.
- The backend is recorded the moment the runtime returns it (``_start``), so a stop or shutdown during the
  load stops it: nothing a runtime started is ever lost; it leaves the books only once the runtime confirms
  it is gone (``_stop_until_gone``).
- A model with in-flight requests is never stopped by expiry, eviction or unload (``_serve`` waits until
  ``Usage.drained``); only a crash or shutdown ends it under them.
- While a restart for new requirements is pending (embeddings, a larger context), no new request is
  leased to the old backend (``_usable``): they queue for the new one, so the drain always completes.
- keep_alive follows Ollama: the last request *scheduled* onto the backend decides the idle expiry.
- ``lease`` re-checks ``_usable`` synchronously: between the owner resolving a waiter and the waiter
  running, the owner may have begun a stop; such a lease is refused and the caller asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from common.directory import LiveState
from common.errors import LlamaControllerError, ModelStopping, ShuttingDown
from controller.catalog.requirements import NOTHING_SPECIAL, ModelPolicy, Requirements
from controller.lifecycle.owner import ModelOwner, Probe, Publish, SpecFactory
from controller.lifecycle.state import OCCUPYING, Goal, State, fresh
from controller.lifecycle.usage import Usage
from controller.runtime.base import Backend, ExitInfo, Runtime
from controller.runtime.logs import LogBook

__all__ = ["Admit", "ManagedModel", "Probe", "Publish", "SpecFactory"]

Admit = Callable[[], Awaitable[None]]


class ManagedModel(ModelOwner):
    """See the module docstring: intents outside, one owner task inside."""

    def __init__(
        self,
        name: str,
        policy: ModelPolicy,
        runtime: Runtime,
        make_spec: SpecFactory,
        probe: Probe,
        logbook: LogBook,
        publish: Publish,
        label: str | None = None,
    ) -> None:
        self.name = name
        self.label = label or name  # the catalog's spelling, for messages
        self.policy = policy
        self._runtime = runtime
        self._make_spec = make_spec
        self._probe = probe
        self._logbook = logbook
        self._publish = publish

        self._state = State.STOPPED
        self._goal = Goal.IDLE
        self._keep_on_close = False
        self._backend: Backend | None = None
        self._gone: asyncio.Task[ExitInfo] | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._unhealthy: str | None = None
        self.stop_error: str | None = None
        self.stop_failures = 0
        self._adoptee: Backend | None = None
        self._running = Requirements()  # what the current backend was started with
        self._wanted = Requirements()  # what requests since the last stop asked for

        self._ready_waiters: list[tuple[Requirements, asyncio.Future[Backend]]] = []
        self._stop_waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()

        self._usage = Usage(self.label, policy)
        self._kept_keep_alive = policy.keep_alive
        self._served = True  # has served a request since its admission (see ``settling``)
        self._progress = asyncio.Event()  # set when it serves a request, or gives its slot up
        self._ready_since = 0.0

        self.last_error: LlamaControllerError | None = None
        self.failures = 0
        self._retry_at = 0.0
        self._failed_with: Requirements | None = None
        self.load_duration = 0.0
        self.starts = 0
        self._task = asyncio.create_task(self._run(), name=f"model-owner:{name}")

    # ------------------------------------------------------------------ read-only views

    @property
    def state(self) -> State:
        return self._state

    @property
    def backend(self) -> Backend | None:
        return self._backend

    @property
    def booked(self) -> Backend | None:
        """The backend in this model's books: its own, or one handed over for adoption and not yet taken."""
        return self._backend or self._adoptee

    @property
    def in_flight(self) -> int:
        return self._usage.in_flight

    @property
    def queued(self) -> int:
        return self._usage.queued

    @property
    def last_used(self) -> float:
        return self._usage.last_used

    @property
    def holds_slot(self) -> bool:
        """True while the model counts against ``max_loaded_models`` (admitted, loading, loaded, stopping)."""
        return self._goal is Goal.RUN or self._state in OCCUPYING

    @property
    def requirements(self) -> Requirements:
        return self._running

    def _usable(self, backend: Backend | None) -> bool:
        return (
            backend is not None
            and backend is self._backend
            and self._state is State.READY
            and self._goal is Goal.RUN
            and not self._restart_pending()
        )

    def expires_at(self) -> float | None:
        """Wall-clock expiry (seconds since the epoch), None when never or not idle-timed."""
        return self._usage.wall_expiry() if self._state is State.READY else None

    def snapshot(self, context_length: int | None = None) -> LiveState:
        backend = self._backend
        failed = self._state is State.FAILED
        return LiveState(
            state=str(self._state),
            backend_url=backend.url if backend and self._state is State.READY else None,
            handle=backend.handle if backend else None,
            adopted=bool(backend and backend.adopted),
            in_flight=self._usage.in_flight,
            queued=self._usage.queued,
            expires_at=self.expires_at(),
            load_duration=round(self.load_duration, 4),
            starts=self.starts,
            failures=self.failures,
            error=self.last_error.message if failed and self.last_error else self.stop_error,
            embeddings=self._running.embeddings,
            loaded_context_length=context_length if backend else None,
        )

    # ------------------------------------------------------------------ intents

    @property
    def settling(self) -> bool:
        """Admitted for requests that are still waiting, none of them served yet: evicting it now would let
        models contending for too few slots evict each other before any of them ran a request."""
        return self._goal is Goal.RUN and not self._served and self._usage.queued > 0

    async def wait_progress(self, timeout: float) -> None:
        """Until it serves a request or gives its slot up (or ``timeout``: a failed load sets nothing)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._progress.wait()

    def reserve(self) -> None:
        """The supervisor's admission granted this model a slot: have it running."""
        if self._goal is Goal.IDLE:
            self._goal = Goal.RUN
            self._served = False
            self._progress.clear()
            self._wake.set()

    def check_backoff(self, requirements: Requirements = NOTHING_SPECIAL) -> None:
        """Refuse at once, holding no slot, while a failed model waits out its backoff (a request that needs
        less than what failed, e.g. a smaller context, may try)."""
        if self._goal is Goal.CLOSE:
            raise ShuttingDown("the server is shutting down")
        if (
            self._state is State.FAILED
            and self._goal is Goal.IDLE
            and time.monotonic() < self._retry_at
            and self.backs_off(requirements)
        ):
            assert self.last_error is not None
            raise fresh(self.last_error)  # a new one per request: see ``fresh``

    @asynccontextmanager
    async def lease(
        self,
        requirements: Requirements = NOTHING_SPECIAL,
        keep_alive: float | None = None,
        admit: Admit | None = None,
    ) -> AsyncIterator[Backend]:
        """Hold a ready backend meeting ``requirements`` while the block runs (see the module docstring).

        ``admit`` is the supervisor's admission (it may stop other models, then calls ``reserve``);
        alone, the model admits itself. ``keep_alive`` (seconds; None = the model's) sets the expiry."""
        self.check_backoff(requirements)
        usage = self._usage
        usage.enter_queue()
        try:
            while True:
                await (admit() if admit is not None else self._admit_alone())
                try:
                    backend = await self._ready(requirements)
                except ModelStopping:
                    continue  # unloaded or evicted while we waited: ask for a slot again
                await usage.acquire_slot()
                if self._usable(backend):  # re-checked: a stop may have begun while we waited
                    if usage.begin(keep_alive):
                        self._wake.set()  # the owner keeps the new keep_alive with the backend
                    self._served = True
                    self._progress.set()
                    break
                usage.release_slot()
        finally:
            usage.leave_queue()
        try:
            yield backend
        finally:
            usage.end()
            self._wake.set()

    async def _admit_alone(self) -> None:
        self.reserve()

    async def _ready(self, requirements: Requirements) -> Backend:
        if self._goal is Goal.CLOSE:
            raise ShuttingDown("the server is shutting down")
        if self._goal is Goal.STOP:
            await self.wait_stopped()
            raise ModelStopping(f"model '{self.label}' was unloaded while the request waited")
        if self._usable(self._backend) and requirements.satisfied_by(self._running):
            assert self._backend is not None
            return self._backend
        if self._goal is not Goal.RUN:  # not admitted (a failure freed the slot): ask for admission again
            raise ModelStopping(f"model '{self.label}' is not loaded")
        waiter: asyncio.Future[Backend] = asyncio.get_running_loop().create_future()
        self._ready_waiters.append((requirements, waiter))
        self._wanted = self._wanted.merge(requirements)
        self._wake.set()
        return await waiter

    def request_stop(self) -> None:
        """Ask for a stop after in-flight requests drain (eviction, unload); returns at once."""
        if self._goal is Goal.CLOSE:
            return
        if self._state is State.STOPPED and self._goal is not Goal.RUN:
            return
        self._goal = Goal.STOP
        self._progress.set()
        self._wake.set()

    async def stop(self) -> None:
        """Stop after in-flight requests drain; return once stopped. Idempotent."""
        self.request_stop()
        await self.wait_stopped()

    async def wait_stopped(self) -> None:
        if self._goal not in (Goal.STOP, Goal.CLOSE) and self._state is State.STOPPED:
            return
        if self._task.done():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stop_waiters.append(waiter)
        self._wake.set()
        await waiter

    def adopt(self, backend: Backend, requirements: Requirements) -> None:
        """Take over a backend a previous controller left running (it answered /health)."""
        if self._state is not State.STOPPED or self._goal is not Goal.IDLE:
            raise LlamaControllerError(f"model '{self.label}' is already managed; cannot adopt another backend")
        self._adoptee = backend
        self._running = self._wanted = requirements
        self._goal = Goal.RUN
        self._wake.set()

    async def close(self, stop_backend: bool = True) -> None:
        """Shutdown: the owner stops the backend (unless it should survive for adoption) and ends."""
        self._keep_on_close = not stop_backend
        self._goal = Goal.CLOSE
        self._wake.set()
        await asyncio.shield(self._task)
