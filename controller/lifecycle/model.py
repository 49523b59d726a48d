"""One model, one owner task: ``ManagedModel``, the only code that changes a model's state.

Callers state an intent (the model's goal) and use the model through ``lease()``; the owner task (``_run``)
makes the state follow the goal. The states, the goals and who sets each, the invariants and the method that
holds each, and how the reconcile passes fit: controller/lifecycle/design.md.

The class reads top to bottom as that document does: what it is made of (``__init__``), what callers read, the
intents callers post, then the owner task — its step, starting, failing and backing off, serving, and stopping
until the runtime confirms the backend is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from common.background import cancel_and_wait
from common.directory import LiveState
from common.errors import (
    BackendCrashed,
    BackendStartFailed,
    LlamaControllerError,
    ModelStopping,
    ShuttingDown,
    StartupTimeout,
)
from controller.catalog.requirements import NOTHING_SPECIAL, ModelPolicy, Requirements
from controller.events import Event, ModelDraining, ModelStateChanged, ModelStopFailed
from controller.lifecycle.gateways import RemoteUse
from controller.lifecycle.health import watch_liveness
from controller.lifecycle.state import ALLOWED, OCCUPYING, Goal, State, backoff_delay, check_transition, fresh
from controller.lifecycle.usage import KEEP_ALIVE_LABEL, Usage, keep_alive_label, kept_keep_alive
from controller.runtime.base import Backend, ExitInfo, LaunchSpec, Runtime
from controller.runtime.logs import LogBook, log_hint
from controller.runtime.watching import Backoff

__all__ = ["Admit", "ManagedModel", "Probe", "Publish", "SpecFactory"]

log = logging.getLogger(__name__)

START_POLL_INTERVAL = 0.02  # seconds between /health polls while loading: adds ≤ 20 ms to a load
PROBE_TIMEOUT = 2.0
STABLE_AFTER = 30.0  # a backend that ran this long resets the failure count (no backoff next time)
STOP_RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)  # between tries of a stop the runtime could not confirm
EXIT_WATCH_GRACE = 2.0  # seconds a confirmed stop waits for the exit watch to see it too
CLOSE_STOP_TRIES = 3  # at shutdown: a backend still not stopped is left to the next controller's first pass

Probe = Callable[[Backend, float], Awaitable[bool]]
SpecFactory = Callable[[Requirements], LaunchSpec]
Publish = Callable[[Event], None]
Admit = Callable[[], Awaitable[None]]


class ManagedModel:
    """One model: the intents callers post and the owner task that carries them out (design.md)."""

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

        # What callers ask and what the owner task has made of it. Callers write only the goal, the wanted
        # requirements, the waiter lists and the adoptee, and then set the wake flag; the rest is the owner's.
        self._state = State.STOPPED
        self._goal = Goal.IDLE
        self._keep_on_close = False  # close() leaves a ready backend running for the next controller
        self._wake = asyncio.Event()
        self._running = Requirements()  # what the current backend was started with
        self._wanted = Requirements()  # what requests since the last stop asked for
        self._ready_waiters: list[tuple[Requirements, asyncio.Future[Backend]]] = []  # each request's needs, waiter
        self._stop_waiters: list[asyncio.Future[None]] = []
        self._adoptee: Backend | None = None  # handed over for adoption, not yet taken

        # The backend in the books, and the tasks that watch it.
        self._backend: Backend | None = None
        self._gone: asyncio.Task[ExitInfo] | None = None  # its exit, from runtime.wait_exit
        self._liveness: asyncio.Task[None] | None = None
        self._unhealthy: str | None = None  # why it is taken for dead while its runtime may still run it
        self._ready_since = 0.0
        self._drain_since: float | None = None  # monotonic: when it began to drain, while it does
        self.stop_error: str | None = None  # why the last try to stop it failed, while it is tried again
        self.stop_failures = 0  # failed tries to stop a backend, over the model's life (a metric)

        # Requests: the queue, the slots and the expiry (Usage), and the admission's progress.
        self._usage = Usage(self.label, policy)
        self._kept_keep_alive = policy.keep_alive  # kept with the current backend (what an adopter restores)
        self._served = True  # has served a request since its admission (see ``settling``)
        self._progress = asyncio.Event()  # set when it serves a request, or gives its slot up

        # Failures and the backoff.
        self.last_error: LlamaControllerError | None = None
        self.failures = 0
        self._retry_at = 0.0
        self._failed_with: Requirements | None = None  # what the last failed backend was asked for: its backoff
        self.load_duration = 0.0
        self.starts = 0

        self._task = asyncio.create_task(self._run(), name=f"model-owner:{name}")

    # ------------------------------ what callers read

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
        """Requests running on the backend, here and in the gateway processes."""
        return self._usage.in_flight + self._usage.remote_in_flight

    @property
    def queued(self) -> int:
        return self._usage.waiting

    @property
    def draining(self) -> bool:
        """Ready, but about to stop (unload, eviction, expiry, a restart with other flags): gateways send its
        backend nothing new, and it stops once the requests on it have ended."""
        return self._state is State.READY and (self._goal in (Goal.STOP, Goal.CLOSE) or self._restart_pending())

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

    @property
    def settling(self) -> bool:
        """Admitted for requests that are still waiting, none of them served yet: evicting it now would let
        models contending for too few slots evict each other before any of them ran a request."""
        return self._goal is Goal.RUN and not self._served and self._usage.queued > 0

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
            in_flight=self.in_flight,
            queued=self.queued,
            expires_at=self.expires_at(),
            load_duration=round(self.load_duration, 4),
            starts=self.starts,
            failures=self.failures,
            error=self.last_error.message if failed and self.last_error else self.stop_error,
            embeddings=self._running.embeddings,
            loaded_context_length=context_length if backend else None,
        )

    def backs_off(self, requirements: Requirements) -> bool:
        """Whether a start for ``requirements`` waits out the backoff: only if it asks for all that failed."""
        return self._failed_with is not None and self._failed_with.satisfied_by(requirements)

    # ------------------------------ intents: what callers ask (each sets the goal or a waiter, then wakes the owner)

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
        """Hold a ready backend meeting ``requirements`` while the block runs (design.md, "Using a model").

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

    def _usable(self, backend: Backend | None) -> bool:
        return (
            backend is not None
            and backend is self._backend
            and self._state is State.READY
            and self._goal is Goal.RUN
            and not self._restart_pending()
        )

    def _restart_pending(self) -> bool:
        return not self._wanted.satisfied_by(self._running)

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

    def remote_use(self, use: RemoteUse) -> None:
        """What the gateway processes report about this model's backend (lifecycle/gateways.py)."""
        if self._usage.set_remote(use) or self.draining:
            self._wake.set()

    def lost(self, backend: Backend, reason: str) -> None:
        """``backend`` is taken for dead (it stopped answering, or its runtime no longer lists it): the owner
        stops what may remain of it and fails the model as after a crash. Ignored for another backend."""
        current = self._backend
        if self._state is State.READY and current is not None and current.handle == backend.handle:
            if self._unhealthy is not None:
                return
            self._unhealthy = reason
            log.warning("model %s: %s; stopping its backend %s", self.name, reason, backend.handle)
            self._wake.set()

    async def close(self, stop_backend: bool = True) -> None:
        """Shutdown: the owner stops the backend (unless it should survive for adoption) and ends."""
        self._keep_on_close = not stop_backend
        self._goal = Goal.CLOSE
        self._wake.set()
        await asyncio.shield(self._task)

    # ------------------------------ the owner task: one step at a time, the only writer of the state

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self._goal is Goal.CLOSE:
                    await self._close_now()
                    return
                await self._step()
            except Exception:  # a bug must not kill the owner: log it, fail the model, keep serving
                log.exception("model %s: owner task error", self.name)
                await self._recover_from_bug()

    async def _recover_from_bug(self) -> None:
        await cancel_and_wait(self._liveness)
        await self._kill()
        if State.FAILED in ALLOWED[self._state]:
            error = LlamaControllerError(f"model '{self.label}': internal error, see the server log")
            self._fail(error, 0.0, wanted=self._running)
        await self._sleep(1.0)

    async def _step(self) -> None:
        state, goal = self._state, self._goal
        if state is State.READY:
            await self._serve()
        elif goal is Goal.STOP:
            if state is State.FAILED:
                self._set_state(State.STOPPED)
            self._finish_stop()
        elif goal is Goal.RUN and self._adoptee is not None:
            self._take_over(self._adoptee)
        elif goal is Goal.RUN:
            delay = self._backoff_left()
            if delay > 0:
                await self._sleep(delay)
            else:
                await self._start()
        else:
            await self._sleep()

    async def _sleep(self, timeout: float | None = None, *also: asyncio.Future[Any]) -> None:
        """Wait for a wake-up, one of ``also`` to finish, or ``timeout`` seconds, whichever is first.

        The wake flag is cleared only at the top of each step (``_run``) and poll round (``_start``),
        before the conditions are read, so an intent posted after that is never lost.
        """
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([woken, *also], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()

    def _set_state(self, new: State, error: LlamaControllerError | None = None) -> None:
        check_transition(self._state, new)
        old, self._state = self._state, new
        if error is not None:
            self.last_error = fresh(error)  # kept through the backoff: it must hold no request's frames
        log.info("model %s: %s → %s%s", self.name, old, new, f" ({error.message})" if error else "")
        self._publish(
            ModelStateChanged(
                model=self.name,
                old=str(old),
                state=str(new),
                error=error.message if error else None,
                time=time.time(),
                # 0 for a backend adopted from an earlier controller
                load_seconds=self.load_duration if new is State.READY else None,
            )
        )

    # ------------------------------ starting

    def _take_over(self, backend: Backend) -> None:
        self._adoptee = None
        self._set_state(State.STARTING)
        self._backend = backend
        self._gone = asyncio.create_task(self._runtime.wait_exit(backend), name=f"exit-watch:{self.name}")
        self._become_ready(started=0.0)

    async def _start(self) -> None:
        self._set_state(State.STARTING)
        self.starts += 1
        started = time.monotonic()
        self._running = self._wanted
        try:
            spec = self._make_spec(self._running)
            backend = replace(await self._runtime.start(spec), api_key=spec.api_key)
        except LlamaControllerError as exc:
            self._start_failed(exc)
            return
        # Recorded at once: from here a stop or a shutdown stops this backend (it is never lost).
        self._backend = backend
        self._gone = gone = asyncio.create_task(self._runtime.wait_exit(backend), name=f"exit-watch:{self.name}")
        deadline = started + self.policy.startup_timeout
        while True:
            self._wake.clear()
            if self._goal in (Goal.STOP, Goal.CLOSE):
                await self._stop_backend()
                if self._goal is Goal.STOP:
                    self._finish_stop()
                return
            if await self._probe(backend, PROBE_TIMEOUT):
                break
            if gone.done():
                if await self._kill():  # what it held (a container, a Deployment) goes with it
                    self._start_failed(self._start_error(gone.result()))
                return
            if time.monotonic() > deadline:
                if not await self._kill():
                    return
                self._start_failed(
                    StartupTimeout(
                        f"model '{self.label}' did not become ready within {self.policy.startup_timeout:g}s "
                        "(defaults.startup_timeout)"
                    )
                )
                return
            await self._sleep(START_POLL_INTERVAL, gone)
        self._become_ready(started)

    def _become_ready(self, started: float) -> None:
        backend = self._backend
        assert backend is not None
        self._unhealthy = None
        self.last_error = self._failed_with = None
        self.load_duration = time.monotonic() - started if started else 0.0
        self._ready_since = time.monotonic()
        # An adopted backend expires as its last controller said (keep_alive -1 stays forever); a new one by
        # the model's default until a request says otherwise.
        kept = kept_keep_alive(backend.labels) if backend.adopted else None
        self._usage.ready(kept)
        self._kept_keep_alive = self.policy.keep_alive if kept is None else kept
        self._set_state(State.READY)
        self._liveness = asyncio.create_task(
            watch_liveness(backend, self._probe, self.policy.health_interval, self._unresponsive),
            name=f"liveness:{self.name}",
        )
        for _, waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_result(backend)
        self._ready_waiters.clear()

    def _start_error(self, exit_info: ExitInfo) -> BackendStartFailed:
        return BackendStartFailed(f"model '{self.label}' failed to load: {exit_info.reason}{self._log_hint()}")

    def _log_hint(self, last_resort: bool = True) -> str:
        """The backend's own first error line since its last start (the cause, not the aftermath)."""
        return log_hint(self._logbook.tail(self.name, 200), last_resort)

    # ------------------------------ failing, and the backoff

    def _backoff_left(self) -> float:
        """Seconds before the next start. The backoff is for what failed: requests that all need less (the
        oversized one failed, they ask for the usual) start at once. A pinned model's restart always waits."""
        if self._state is not State.FAILED:
            return 0.0
        waiting = [needs for needs, waiter in self._ready_waiters if not waiter.done()]
        if waiting and not self.backs_off(Requirements.merge_all(waiting)):
            return 0.0
        return self._retry_at - time.monotonic()

    def _start_failed(self, error: LlamaControllerError) -> None:
        """A start failed. The requests that asked the most of it (a larger num_ctx, embeddings) may be the
        cause: when others wait that need less, only those get the error and the model starts again with what
        the others need. Either way no later start asks for what failed unless its own requests do: one
        oversized request must not break the model for everyone."""
        tried = self._running
        waiting = [(needs, waiter) for needs, waiter in self._ready_waiters if not waiter.done()]
        needed = Requirements.merge_all(needs for needs, _ in waiting)
        if not tried.satisfied_by(needed):  # it asked for more than anyone waiting needs (the asker left)
            culprits, rest = [], waiting
        else:
            most = max((needs.weight for needs, _ in waiting), default=None)
            culprits = [(needs, waiter) for needs, waiter in waiting if needs.weight == most]
            rest = [(needs, waiter) for needs, waiter in waiting if needs.weight != most]
        if not rest or self._goal is not Goal.RUN:
            self._fail(error, ran_for=0.0, wanted=Requirements())
            return
        self._record_failure(error, ran_for=0.0)
        for _, waiter in culprits:
            waiter.set_exception(fresh(error))
        self._ready_waiters = rest
        self._wanted = Requirements.merge_all(needs for needs, _ in rest)  # the goal stays "run": start again

    def _fail(self, error: LlamaControllerError, ran_for: float, wanted: Requirements) -> None:
        """Record a failed start or a crash; waiters get the error; backoff before the next start, which
        asks for ``wanted`` (and what its own requests need)."""
        self._record_failure(error, ran_for)
        self._reject_ready(error)
        # A pinned model restarts by itself and keeps its slot; others free it and start on demand.
        if self._goal is Goal.RUN:
            self._goal = Goal.RUN if self.policy.pinned else Goal.IDLE
        self._wanted = wanted

    def _record_failure(self, error: LlamaControllerError, ran_for: float) -> None:
        self.failures = 1 if ran_for >= STABLE_AFTER else self.failures + 1
        self._retry_at = time.monotonic() + backoff_delay(self.failures)
        self._failed_with = self._running
        self._backend, self._gone = None, None
        self._set_state(State.FAILED, error)

    def _reject_ready(self, error: LlamaControllerError) -> None:
        for _, waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_exception(fresh(error))  # one object per request: see ``fresh``
        self._ready_waiters.clear()

    # ------------------------------ serving

    async def _serve(self) -> None:
        """While ready: react to a crash, a stop or restart once drained, or the idle expiry."""
        assert self._backend is not None and self._gone is not None
        if self._gone.done() or self._unhealthy is not None:
            reason = self._unhealthy or self._gone.result().reason
            await cancel_and_wait(self._liveness)
            # Taken for dead, released before it reads failed: a failed model holds no slot, so whatever the
            # backend still holds (a GPU, a container) must be gone first. A hung backend is killed here.
            self._set_state(State.STOPPING)
            if not await self._kill():
                return  # shutting down: _close_now takes it from here
            self._fail(
                BackendCrashed(
                    f"model '{self.label}' backend stopped unexpectedly: {reason}{self._log_hint(last_resort=False)}"
                ),
                ran_for=time.monotonic() - self._ready_since,
                wanted=self._running,  # it ran with them: a crash is not theirs to blame
            )
            return
        usage = self._usage
        if usage.keep_alive != self._kept_keep_alive:
            await self._keep_keep_alive(self._backend, usage.keep_alive)
        now = time.monotonic()
        drain_left = self._drain_left(now)
        settling = self._adoption_settling(now) if self.draining else 0.0
        drained = usage.drained and settling <= 0
        idle = drained and usage.waiting == 0 and not self.policy.pinned and self._goal is Goal.RUN
        expired = idle and usage.expires_at is not None and now >= usage.expires_at
        if drained and self._goal is Goal.STOP:
            await self._stop_backend()
            if self._goal is Goal.STOP:  # a shutdown that came meanwhile is _close_now's to finish
                self._finish_stop()
            return
        if drained and self._restart_pending():
            await self._stop_backend()  # restart with the new flags; the goal stays "run"
            return
        if expired:
            log.info("model %s: keep_alive expired", self.name)
            self._goal = Goal.STOP
            return
        # Idle: until the expiry. Draining: until the drain timeout or the adoption's settling time, whichever
        # comes first (each report wakes it besides).
        waits = [seconds for seconds in (drain_left, settling) if seconds]
        timeout = (usage.expires_at - now) if idle and usage.expires_at is not None else min(waits, default=None)
        await self._sleep(timeout, self._gone)

    def _adoption_settling(self, now: float) -> float:
        """Seconds left before an adopted backend may stop: the gateways that sent it requests while no controller
        answered report them to this one within a couple of report intervals (policy.adoption_settle); until then
        a drain cannot know they are there."""
        backend = self._backend
        if backend is None or not backend.adopted:
            return 0.0
        return max(0.0, self._ready_since + self.policy.adoption_settle - now)

    def _drain_left(self, now: float) -> float | None:
        """While draining: announce it once, and give up waiting for the gateways' requests after the drain
        timeout (a stream may never end by itself); the seconds left of it, else None."""
        if not self.draining:
            self._drain_since = None
            return None
        if self._drain_since is None:
            self._drain_since = now
            # The gateways cannot have seen it yet: each must report again (lifecycle/gateways.py, "behind").
            self._usage.remote = replace(self._usage.remote, behind=self._usage.remote.gateways)
            self._publish(ModelDraining(model=self.name, in_flight=self.in_flight, time=time.time()))
        left = self._drain_since + self.policy.drain_timeout - now
        usage = self._usage
        waiting = usage.remote_in_flight or usage.remote.behind
        if left <= 0 and usage.remote_counts and waiting:
            log.warning(
                "model %s: %d requests in the gateways still run on %s (%d gateways not heard from) after the drain "
                "timeout (%gs); stopping it",
                self.name,
                usage.remote_in_flight,
                usage.remote.behind,
                self._backend.handle if self._backend else "?",
                self.policy.drain_timeout,
            )
            usage.remote_counts = False
        return max(left, 0.0) if usage.remote_counts and waiting else None

    async def _keep_keep_alive(self, backend: Backend, seconds: float) -> None:
        """Keep the keep_alive in force with the backend, so that a controller that adopts it after a restart
        keeps to it. Written when it changes, not at each request (an API call on Kubernetes); the idle time
        is not kept, so an adopted backend's idle time counts from its adoption."""
        self._kept_keep_alive = seconds  # once per change, even when it fails: no retry storm on a broken API
        try:
            await self._runtime.keep_labels(backend, {KEEP_ALIVE_LABEL: keep_alive_label(seconds)})
        except LlamaControllerError as exc:
            log.warning("model %s: could not keep its keep_alive with the backend: %s", self.name, exc)

    async def _unresponsive(self, backend: Backend, misses: int) -> None:
        """The liveness watch gave up on ``backend``: the owner stops it (until it is gone) as a crash."""
        self.lost(backend, f"health check failed {misses} times in a row")

    # ------------------------------ stopping until the runtime confirms the backend is gone

    async def _stop_backend(self) -> None:
        """STARTING or READY → STOPPING → STOPPED, the backend stopped and forgotten. It reads ``stopped`` only
        once the runtime confirms the backend is gone; a stop left undone at shutdown leaves it ``stopping``."""
        self._set_state(State.STOPPING)
        await cancel_and_wait(self._liveness)
        if await self._kill():
            self._set_state(State.STOPPED)

    async def _kill(self) -> bool:
        """Stop the backend until the runtime confirms it is gone; True once it is. The backend stays in the
        books (``backend``, the slot) meanwhile, so nothing that runs is ever forgotten; only at shutdown is it
        given up after CLOSE_STOP_TRIES, for the next controller's first pass to remove."""
        backend, gone = self._backend, self._gone
        if backend is not None and not await self._stop_until_gone(backend):
            return False
        self._backend = self._gone = None
        if gone is not None:  # its exit watch ends with it; one whose event was lost is given up on
            with contextlib.suppress(Exception):
                async with asyncio.timeout(EXIT_WATCH_GRACE):
                    await asyncio.shield(gone)
            await cancel_and_wait(gone)
        return True

    async def _stop_until_gone(self, backend: Backend) -> bool:
        backoff = Backoff(STOP_RETRY_DELAYS)
        while True:
            try:
                await self._runtime.stop(backend, self.policy.stop_timeout)
            except Exception as exc:  # an engine timeout, an API error, a bug in a runtime: try again
                error = exc.message if isinstance(exc, LlamaControllerError) else exc.__class__.__name__
                self.stop_error = error
                self.stop_failures += 1
                closing = self._goal is Goal.CLOSE
                if closing and backoff.failures + 1 >= CLOSE_STOP_TRIES:
                    log.error(
                        "model %s: its backend %s could not be stopped (%s); left for the next controller to "
                        "remove at its start",
                        self.name,
                        backend.handle,
                        error,
                    )
                    return False
                delay = backoff.next_delay()
                log.warning(
                    "model %s: stopping its backend %s failed (%s); trying again in %gs",
                    self.name,
                    backend.handle,
                    error,
                    delay,
                )
                self._publish(
                    ModelStopFailed(
                        model=self.name,
                        state=str(self._state),
                        handle=backend.handle,
                        error=error,
                        failures=backoff.failures,
                        retry_in=delay,
                        time=time.time(),
                    )
                )
                await self._pause(min(delay, 0.5) if closing else delay)
                continue
            if self.stop_error is not None:
                log.info(
                    "model %s: its backend %s is stopped, %d tries failed before",
                    self.name,
                    backend.handle,
                    backoff.failures,
                )
            self.stop_error = None
            return True

    async def _pause(self, delay: float) -> None:
        """``delay`` seconds, cut short only by a shutdown (requests wake the owner all the time: they must not
        turn a backoff into a storm). The caller reads the goal again afterwards, so no intent is lost."""
        until = time.monotonic() + delay
        while self._goal is not Goal.CLOSE and (left := until - time.monotonic()) > 0:
            self._wake.clear()
            await self._sleep(left)

    async def _close_now(self) -> None:
        self._reject_ready(ShuttingDown("the server is shutting down"))
        await cancel_and_wait(self._liveness)
        if self._state is State.READY and self._keep_on_close:
            # It stays ready in the books: it runs on, and "stopped" would be untrue to the last event anyone saw.
            log.info("model %s: leaving its backend running for the next controller to adopt", self.name)
            await cancel_and_wait(self._gone)
        elif self._state in (State.STARTING, State.READY, State.STOPPING):
            if self._state is not State.STOPPING:
                self._set_state(State.STOPPING)
            if await self._kill():
                self._set_state(State.STOPPED)
        elif self._state is State.FAILED:
            self._set_state(State.STOPPED)
        self._resolve_stopped()

    def _finish_stop(self) -> None:
        self._goal = Goal.IDLE
        self._usage.stopped()
        self._wanted = Requirements()
        self._reject_ready(ModelStopping(f"model '{self.label}' was unloaded while the request waited"))
        self._resolve_stopped()

    def _resolve_stopped(self) -> None:
        for waiter in self._stop_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._stop_waiters.clear()
