"""Regression tests for lifecycle defects found in review; each failed before its fix.

They speak only through the supervisor's public intents (lease, load, unload, close), the way the
gateway and the control API do, over the FakeRuntime.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from common.background import cancel_and_wait
from common.errors import BackendStartFailed, ShuttingDown
from controller.lifecycle.state import State
from controller.runtime.base import Backend
from controller.runtime.fake import FakeBehaviour, FakeRuntime
from tests.support.harness import fake_config, fake_supervisor


def config(tmp_path: Path, tiny_model: Path, models: dict[str, dict[str, Any]] | None = None, **sections: Any) -> Any:
    return fake_config(tmp_path, tiny_model, models or {"a": {}, "b": {}, "c": {}, "x": {}}, **sections)


async def eventually(condition: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_supervisor_close_while_loading_stops_the_starting_backend(tmp_path: Path, tiny_model: Path) -> None:
    runtime = FakeRuntime({"a:latest": FakeBehaviour(ready_after=5)})
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model), runtime)
    await supervisor.start()
    loading = asyncio.create_task(supervisor.load("a"))
    await eventually(lambda: runtime.alive("a:latest"))
    await supervisor.close()
    assert runtime.running == {}, "a backend that was still loading must not outlive the controller"
    with pytest.raises(ShuttingDown):
        await loading


async def test_supervisor_pending_restart_is_not_starved_by_ongoing_traffic(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, {"a": {"max_concurrent": 4}})
    supervisor, runtime = fake_supervisor(cfg)
    await supervisor.start()
    await supervisor.load("a")
    stop = asyncio.Event()

    async def chat_traffic() -> None:
        # Overlapping requests: at any moment at least one chat request is in flight.
        while not stop.is_set():
            async with supervisor.lease("a"):
                await asyncio.sleep(0.02)

    traffic = [asyncio.create_task(chat_traffic()) for _ in range(3)]
    await asyncio.sleep(0.05)
    try:
        async with asyncio.timeout(2.0):
            async with supervisor.lease("a", embeddings=True) as lease:
                assert lease.url
    finally:
        stop.set()
        await asyncio.gather(*traffic)
    assert runtime.starts[-1].labels["embeddings"] == "1"
    await supervisor.close()


async def test_supervisor_duplicate_leftovers_keep_one_and_stop_the_rest(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, scheduling={"max_loaded_models": 2})
    probe_supervisor, _ = fake_supervisor(cfg)
    await probe_supervisor.catalog.refresh()
    good_hash = probe_supervisor.spec_for("a").spec_hash
    labels = {"embeddings": "0", "ctx_size": ""}
    leftovers = [
        Backend("a:latest", f"http://fake.invalid/{h}", h, good_hash, time.time(), labels=labels)
        for h in ("old-a1", "old-a2")
    ]
    supervisor, runtime = fake_supervisor(cfg, FakeRuntime(leftovers=leftovers))
    await supervisor.start()  # must not raise
    await eventually(lambda: supervisor.view("a").state == State.READY)
    assert len(runtime.stops) == 1 and runtime.stops[0] in ("old-a1", "old-a2")
    assert len(runtime.alive("a:latest")) == 1
    await supervisor.close()


async def test_supervisor_keep_alive_of_the_last_scheduled_request_decides(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    first_in = asyncio.Event()
    second_done = asyncio.Event()

    async def first() -> None:  # scheduled first with the default keep_alive, finishes last
        async with supervisor.lease("a"):
            first_in.set()
            await second_done.wait()

    task = asyncio.create_task(first())
    await first_in.wait()
    async with supervisor.lease("a", keep_alive=0):  # scheduled last: it decides
        pass
    second_done.set()
    await task
    await eventually(lambda: not runtime.alive("a:latest"), timeout=1.0)
    await supervisor.close()


async def test_supervisor_failed_start_frees_its_slot(tmp_path: Path, tiny_model: Path) -> None:
    runtime = FakeRuntime({"a:latest": FakeBehaviour(fail_start="broken binary")})
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model), runtime)
    await supervisor.start()
    for _ in range(3):  # the third is refused at once by the backoff
        with pytest.raises(BackendStartFailed):
            await supervisor.load("a")
    assert supervisor.loaded() == [], "a model that failed to start holds no slot"
    assert supervisor.view("a").state == State.FAILED
    await supervisor.close()


async def test_supervisor_switch_draining_does_not_block_other_loads(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, scheduling={"max_loaded_models": 2})
    supervisor, _ = fake_supervisor(cfg)
    await supervisor.start()
    release = asyncio.Event()
    a_running = asyncio.Event()

    async def long_stream() -> None:
        async with supervisor.lease("a"):
            a_running.set()
            await release.wait()

    stream = asyncio.create_task(long_stream())
    await a_running.wait()
    switch = asyncio.create_task(supervisor.load("b", exclusive=True))  # waits for a to drain
    await asyncio.sleep(0.05)
    assert not switch.done()
    try:
        async with asyncio.timeout(1.0):
            await supervisor.load("c")  # needs no victim: must not wait behind the switch
    finally:
        release.set()
        await stream
    await asyncio.wait_for(switch, 2.0)
    assert [m.name for m in supervisor.loaded()] == ["b:latest"]
    await supervisor.close()


async def test_supervisor_requests_waiting_at_shutdown_get_503_not_502(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, {"a": {"max_concurrent": 1}})
    supervisor, _ = fake_supervisor(cfg)
    await supervisor.start()
    inside = asyncio.Event()
    leave = asyncio.Event()

    async def holder() -> None:
        async with supervisor.lease("a"):
            inside.set()
            await leave.wait()

    async def waiter() -> str:
        async with supervisor.lease("a") as lease:
            return lease.url

    held = asyncio.create_task(holder())
    await inside.wait()
    waiting = asyncio.create_task(waiter())  # ready backend, waits for the one slot
    await asyncio.sleep(0.02)
    closing = asyncio.create_task(supervisor.close())
    await asyncio.sleep(0.02)
    leave.set()
    await held
    with pytest.raises(ShuttingDown):
        await waiting
    await closing


async def test_supervisor_close_leaves_no_liveness_task_behind(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, _ = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    await supervisor.load("a")
    await supervisor.close()
    pending = [
        t for t in asyncio.all_tasks() if t.get_name().startswith(("liveness:", "model-owner:")) and not t.done()
    ]
    assert pending == []


async def test_supervisor_models_contending_for_one_slot_each_get_served(tmp_path: Path, tiny_model: Path) -> None:
    """Four clients, four models, one slot: a model admitted for waiting requests used to be evicted before
    it served them, by a newcomer that was evicted in turn — a livelock spinning at full speed (1.5 million
    evictions in two minutes, no answer). Each admission now serves its waiters first."""
    cfg = config(tmp_path, tiny_model, {"a": {}, "b": {}, "c": {}, "d": {}}, scheduling={"max_loaded_models": 1})
    supervisor, _ = fake_supervisor(cfg, FakeRuntime({n: FakeBehaviour(ready_after=0.01) for n in "abcd"}))
    await supervisor.start()
    order: list[str] = []

    async def client(name: str) -> None:
        for _ in range(3):
            async with supervisor.lease(name):
                order.append(name)
                assert sum(1 for m in supervisor.loaded()) <= 1
                await asyncio.sleep(0.01)  # the request's work

    await asyncio.wait_for(asyncio.gather(*(client(n) for n in "abcd")), timeout=10)
    assert sorted(order) == sorted("abcd" * 3)
    # Taking turns, first come first served: every model once before any model twice (none starved: the
    # load run's switch storm had requests waiting over two minutes while others were served again and again).
    rounds = [order[i : i + 4] for i in range(0, 12, 4)]
    assert all(sorted(each) == list("abcd") for each in rounds), order
    await supervisor.close()


async def test_cancel_and_wait_ends_a_task_that_swallowed_its_cancellation() -> None:
    """Python 3.11's asyncio.wait_for, cancelled just as what it awaited completed, returns the result and drops
    the cancellation. The liveness task then probed on, and the stop waiting for it hung forever (CI: a model
    stuck in "stopping", its llama-server orphaned). cancel_and_wait cancels again until the task ends."""
    probes = 0

    async def liveness() -> None:
        nonlocal probes
        swallowed = False
        while True:
            probes += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # what wait_for did with the first one

    task = asyncio.create_task(liveness())
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(cancel_and_wait(task))
    await asyncio.wait({stopping}, timeout=5)  # waits without cancelling anything itself
    ended = stopping.done() and task.cancelled()
    for leftover in (stopping, task):
        leftover.cancel()
    assert ended, f"the task still runs ({probes} probes): the stop waiting for it would hang"


async def test_supervisor_switch_completes_while_the_victim_has_traffic(tmp_path: Path, tiny_model: Path) -> None:
    """A switch stops a model that serves steady traffic. Its waiting requests used to admit it again into the
    room freed for the switch before the switch could take it (98 restarts of the victim in 8 s, the switch never
    done). They now queue behind the switch: the switch's model starts before the victim starts again."""
    cfg = config(tmp_path, tiny_model, {"a": {}, "b": {}})  # one slot (scheduling.max_loaded_models)
    behaviours = {n: FakeBehaviour(ready_after=0.01) for n in ("a:latest", "b:latest")}
    supervisor, runtime = fake_supervisor(cfg, FakeRuntime(behaviours))
    await supervisor.start()
    await supervisor.load("a")
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            async with supervisor.lease("a"):
                await asyncio.sleep(0.01)

    clients = [asyncio.create_task(traffic()) for _ in range(4)]
    await asyncio.sleep(0.05)
    before = len(runtime.starts)
    switch = asyncio.create_task(supervisor.load("b", exclusive=True))
    try:
        await asyncio.wait({switch}, timeout=10)  # a generous deadline: before the fix it never completed
        started = [spec.model for spec in runtime.starts[before:]]
    finally:
        stop.set()
        await asyncio.gather(*clients)
    restarts = started[: started.index("b:latest")] if "b:latest" in started else started
    assert switch.done(), f"the switch never completed; the victim restarted {len(restarts)} times meanwhile"
    assert (await switch).name == "b"
    assert restarts == [], "the victim's waiting requests restarted it before the switch"
    await supervisor.close()
