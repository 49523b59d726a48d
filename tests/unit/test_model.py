"""ManagedModel's state machine against the FakeRuntime: one start, crashes, expiry, drains, backoff."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import (
    BackendCrashed,
    BackendStartFailed,
    ModelStopping,
    QueueFull,
    ShuttingDown,
    StartupTimeout,
)
from controller.catalog.requirements import NOTHING_SPECIAL, ModelPolicy, Requirements
from controller.events import Event, ModelStateChanged
from controller.lifecycle.model import ManagedModel
from controller.lifecycle.state import State, backoff_delay
from controller.runtime.base import Backend, LaunchSpec
from controller.runtime.fake import FakeBehaviour, FakeRuntime
from controller.runtime.logs import LogBook

NAME = "m:latest"


class Harness:
    def __init__(
        self, policy: ModelPolicy, behaviour: FakeBehaviour | None = None, runtime: FakeRuntime | None = None
    ) -> None:
        self.runtime = runtime or FakeRuntime({NAME: behaviour or FakeBehaviour()})
        self.events: list[Event] = []
        self.logbook = LogBook()
        self.model = ManagedModel(
            NAME, policy, self.runtime, self.spec, self.runtime.probe, self.logbook, self.events.append
        )

    @staticmethod
    def spec(requirements: Requirements) -> LaunchSpec:
        flags = ("--embeddings",) if requirements.embeddings else ()
        if requirements.ctx_size:
            flags += ("--ctx-size", str(requirements.ctx_size))
        return LaunchSpec(NAME, Path("m.gguf"), flags)

    def states(self) -> list[str]:
        return [e.state for e in self.events if isinstance(e, ModelStateChanged)]

    async def wait_state(self, state: State, timeout: float = 2.0) -> None:
        async def poll() -> None:
            while self.model.state is not state:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(poll(), timeout)

    async def lease(self, keep_alive: float | None = None) -> None:
        """Take and release one request's lease."""
        async with self.model.lease(keep_alive=keep_alive):
            pass

    async def ready(self, requirements: Requirements = NOTHING_SPECIAL) -> Any:
        """The backend a request would get (its lease ends at once)."""
        async with self.model.lease(requirements) as backend:
            return backend

    def hold(self, keep_alive: float | None = None) -> tuple[asyncio.Task[None], asyncio.Event, asyncio.Event]:
        """A request that holds its lease until ``release`` is set; ``inside`` once it holds it."""
        inside, release = asyncio.Event(), asyncio.Event()

        async def run() -> None:
            async with self.model.lease(keep_alive=keep_alive):
                inside.set()
                await release.wait()

        return asyncio.create_task(run()), inside, release


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness(ModelPolicy(keep_alive=60, health_interval=0.05))
    yield made
    await made.model.close()


def make(**policy: Any) -> Harness:
    behaviour = policy.pop("behaviour", None)
    return Harness(ModelPolicy(**{"health_interval": 0.05, **policy}), behaviour)


async def test_model_concurrent_requests_start_exactly_once(harness: Harness) -> None:
    harness.runtime.behaviours[NAME] = FakeBehaviour(ready_after=0.05)
    backends = await asyncio.gather(*(harness.ready() for _ in range(20)))
    assert len({b.handle for b in backends}) == 1
    assert len(harness.runtime.starts) == 1
    assert harness.states() == ["starting", "ready"]


async def test_model_start_failure_reaches_every_waiter(harness: Harness) -> None:
    harness.runtime.behaviours[NAME] = FakeBehaviour(fail_start="no such file")
    results = await asyncio.gather(*(harness.ready() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, BackendStartFailed) for r in results)
    assert harness.model.state is State.FAILED
    assert harness.model.snapshot().error == "no such file"


async def test_model_exit_while_loading_reports_the_log_line(harness: Harness) -> None:
    harness.runtime.behaviours[NAME] = FakeBehaviour(exit_while_loading=1)
    harness.logbook.append(NAME, "llama_model_load: error loading model: bad magic")
    with pytest.raises(BackendStartFailed, match="exited with code 1: llama_model_load: error loading model"):
        await harness.ready()


async def test_model_startup_timeout_kills_the_backend() -> None:
    h = make(startup_timeout=0.1, behaviour=FakeBehaviour(never_ready=True))
    with pytest.raises(StartupTimeout, match=r"did not become ready within 0\.1s"):
        await h.ready()
    assert h.runtime.stops and not h.runtime.running
    await h.model.close()


async def test_model_crash_while_ready_fails_fast_and_restarts_on_demand(harness: Harness) -> None:
    first = await harness.ready()
    harness.runtime.crash(NAME)
    await harness.wait_state(State.FAILED, timeout=1.0)
    assert isinstance(harness.model.last_error, BackendCrashed)
    second = await harness.ready()
    assert second.handle != first.handle
    assert harness.states() == ["starting", "ready", "stopping", "failed", "starting", "ready"]


async def test_model_repeated_failures_back_off() -> None:
    h = make(behaviour=FakeBehaviour(fail_start="broken"))
    for _ in range(2):
        with pytest.raises(BackendStartFailed):
            await h.ready()
    # Two failures in a row: the third attempt is refused at once until the backoff passes.
    starts = len(h.runtime.starts)
    with pytest.raises(BackendStartFailed):
        await h.ready()
    assert len(h.runtime.starts) == starts
    await h.model.close()


def test_model_backoff_delay_grows_and_caps() -> None:
    assert [backoff_delay(n) for n in range(1, 9)] == [0, 1, 2, 4, 8, 16, 30, 30]


async def test_model_keep_alive_expiry_unloads() -> None:
    h = make(keep_alive=60)
    await h.lease(keep_alive=0.1)
    assert h.model.state is State.READY
    assert h.model.expires_at() is not None
    await h.wait_state(State.STOPPED, timeout=1.0)
    assert h.runtime.stops
    await h.model.close()


async def test_model_keep_alive_zero_unloads_after_the_request() -> None:
    h = make()
    await h.lease(keep_alive=0)
    await h.wait_state(State.STOPPED, timeout=0.5)
    await h.model.close()


async def test_model_keep_alive_forever_never_expires() -> None:
    h = make(keep_alive=0.05)
    await h.lease(keep_alive=float("inf"))
    await asyncio.sleep(0.2)
    assert h.model.state is State.READY and h.model.expires_at() is None
    await h.model.close()


async def test_model_busy_model_does_not_expire_until_drained() -> None:
    h = make(keep_alive=0.05)
    task, inside, release = h.hold(keep_alive=0.05)
    await inside.wait()
    await asyncio.sleep(0.2)
    assert h.model.state is State.READY  # in flight: the expiry does not apply
    release.set()
    await task
    await h.wait_state(State.STOPPED, timeout=1.0)
    await h.model.close()


async def test_model_stop_waits_for_in_flight_requests(harness: Harness) -> None:
    task, inside, release = harness.hold()
    await inside.wait()
    stopping = asyncio.create_task(harness.model.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done() and harness.model.state is State.READY
    late = asyncio.create_task(harness.ready())  # no new request is served once a stop is asked for
    await asyncio.sleep(0.05)
    assert not late.done()
    release.set()
    await task
    await asyncio.wait_for(stopping, 1.0)
    assert harness.runtime.stops, "the backend was stopped after the drain"
    await asyncio.wait_for(late, 1.0)  # then the late request loads the model again


async def test_model_request_waiting_during_a_stop_is_served_after_it(harness: Harness) -> None:
    first = await harness.ready()
    task, inside, release = harness.hold()
    await inside.wait()
    stopping = asyncio.create_task(harness.model.stop())
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(harness.ready())
    release.set()
    await task
    await stopping
    second = await asyncio.wait_for(waiting, 1.0)
    assert second.handle != first.handle
    assert harness.states() == ["starting", "ready", "stopping", "stopped", "starting", "ready"]


async def test_model_stop_during_start_aborts_it() -> None:
    h = make(behaviour=FakeBehaviour(ready_after=5))
    waiter = asyncio.create_task(h.model._ready(Requirements()))  # a request waiting for the load
    h.model.reserve()
    await h.wait_state(State.STARTING)
    await asyncio.wait_for(h.model.stop(), 1.0)
    with pytest.raises(ModelStopping):
        await waiter
    assert h.model.state is State.STOPPED and not h.runtime.running
    await h.model.close()


async def test_model_hung_backend_is_killed_by_liveness(harness: Harness) -> None:
    await harness.ready()
    harness.runtime.hang(NAME)
    await harness.wait_state(State.FAILED, timeout=2.0)
    assert "health check failed" in (harness.model.snapshot().error or "")
    assert not harness.runtime.running


async def test_model_pinned_restarts_by_itself_after_a_crash() -> None:
    h = make(pinned=True)
    first = await h.ready()
    h.runtime.crash(NAME)
    await asyncio.sleep(0.05)
    await h.wait_state(State.READY)
    assert h.states() == ["starting", "ready", "stopping", "failed", "starting", "ready"]
    assert h.model.backend is not None and h.model.backend.handle != first.handle
    await h.model.close()


async def test_model_new_requirements_restart_after_drain(harness: Harness) -> None:
    plain = await harness.ready()
    embedding = await harness.ready(Requirements(embeddings=True))
    assert embedding.handle != plain.handle
    assert harness.runtime.starts[-1].args == ("--embeddings",)
    again = await harness.ready()  # embeddings still there: no restart for a chat request
    assert again.handle == embedding.handle


async def test_model_queue_full_is_refused() -> None:
    h = make(max_concurrent=1, queue_depth=1)
    task, inside, release = h.hold()
    await inside.wait()
    queued, _, queued_release = h.hold()  # one may wait
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull, match="1 requests running and 1 queued"):
        await h.ready()
    release.set()
    queued_release.set()
    await asyncio.gather(task, queued)
    await h.model.close()


async def test_model_close_stops_the_backend_and_rejects_waiters() -> None:
    h = make(behaviour=FakeBehaviour(ready_after=5))
    waiter = asyncio.create_task(h.ready())
    await h.wait_state(State.STARTING)
    await h.model.close()
    with pytest.raises(ShuttingDown):
        await waiter
    with pytest.raises(ShuttingDown):
        await h.ready()


class SmallMemory(FakeRuntime):
    """A machine where a backend with a context over ``CTX_LIMIT`` does not start (its KV cache does not fit)."""

    async def start(self, spec: LaunchSpec) -> Backend:
        if "--ctx-size" in spec.args and int(spec.args[spec.args.index("--ctx-size") + 1]) > CTX_LIMIT:
            self.starts.append(spec)
            raise BackendStartFailed("failed to allocate the KV cache")
        return await super().start(spec)

    def contexts(self) -> list[str]:
        return [spec.args[spec.args.index("--ctx-size") + 1] for spec in self.starts]


CTX_LIMIT = 8192
PLAIN = Requirements(ctx_size=4096)  # what a request that asks for nothing gets (the configured context)
OVERSIZED = Requirements(ctx_size=32768, ctx_requested=True)  # num_ctx 32768


async def test_model_an_oversized_request_does_not_break_the_model_for_the_next_ones() -> None:
    """A failed start kept its requirements: every later start asked for num_ctx 32768 again and failed, for
    every client, until an unload. Later starts ask for what their own requests need, and the backoff after
    repeated failures refuses only requests that ask for what failed."""
    h = Harness(ModelPolicy(health_interval=0.05), runtime=SmallMemory())
    with pytest.raises(BackendStartFailed, match="KV cache"):
        await h.ready(OVERSIZED)
    await h.ready(PLAIN)
    assert h.runtime.contexts() == ["32768", "4096"]
    await h.model.stop()
    with pytest.raises(BackendStartFailed, match="KV cache"):
        await h.ready(OVERSIZED)  # the second failure in a row: the model is in its backoff, for what failed
    with pytest.raises(BackendStartFailed):  # the same request again is refused at once
        await h.ready(OVERSIZED)
    assert h.runtime.contexts() == ["32768", "4096", "32768"]
    await h.ready(PLAIN)  # a request that needs less is served at once
    assert h.runtime.contexts() == ["32768", "4096", "32768", "4096"]
    await h.model.close()


async def test_model_failed_start_fails_only_the_requests_that_asked_for_more() -> None:
    h = Harness(ModelPolicy(health_interval=0.05), runtime=SmallMemory())
    oversized, plain, embeddings = await asyncio.gather(
        h.ready(OVERSIZED),
        h.ready(PLAIN),
        h.ready(Requirements(embeddings=True, ctx_size=4096)),
        return_exceptions=True,
    )
    assert isinstance(oversized, BackendStartFailed)
    assert isinstance(plain, Backend) and isinstance(embeddings, Backend) and plain.handle == embeddings.handle
    assert h.runtime.contexts() == ["32768", "4096"], "started again with what the others need"
    assert h.runtime.starts[-1].args[0] == "--embeddings"
    await h.model.close()


def depth(error: BaseException) -> int:
    return len(traceback.extract_tb(error.__traceback__))


async def test_model_each_request_gets_its_own_error_and_the_kept_one_holds_no_frames() -> None:
    """One exception object was raised again for every request refused during a backoff (and given to every
    waiter of a failed start): each raise added that request's frames to its traceback, and the model held them
    all, with what they referenced (300 refusals: 31 MB), until it recovered."""
    h = make(behaviour=FakeBehaviour(fail_start="broken"))
    waiters = await asyncio.gather(*(h.ready() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(error, BackendStartFailed) for error in waiters)
    assert len({id(error) for error in waiters}) == 3, "waiters of one failed start share one exception"
    with pytest.raises(BackendStartFailed):
        await h.ready()  # the second failure in a row: the next requests are refused during the backoff
    refused: list[BaseException] = []
    depths = []
    for _ in range(20):
        try:
            await h.ready()
        except BackendStartFailed as exc:
            refused.append(exc)
            depths.append(depth(exc))
    assert len(refused) == 20 and len({id(error) for error in refused}) == 20
    assert len(set(depths)) == 1, f"the traceback grows with every refusal: {depths}"
    kept = h.model.last_error
    assert kept is not None and kept.__traceback__ is None and all(error is not kept for error in refused)
    assert str(kept) == "broken"
    await h.model.close()


async def test_model_recovery_clears_the_last_error() -> None:
    h = make(behaviour=FakeBehaviour(fail_start="broken"))
    with pytest.raises(BackendStartFailed):
        await h.ready()
    assert h.model.last_error is not None
    h.runtime.behaviours[NAME] = FakeBehaviour()
    await h.ready()  # one failure: no backoff yet
    assert h.model.last_error is None, "a ready model keeps no error (nor what it references)"
    await h.model.close()
