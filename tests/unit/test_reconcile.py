"""The level-triggered lifecycle: stops tried until the runtime confirms them, failed backends released, and
passes that compare what the runtime runs with the books (lifecycle/reconcile.py), over the FakeRuntime with its
fault injection. Each runtime's own fault test is in tests/{integration,docker,kube}."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from common.errors import BackendStartFailed
from controller.catalog.entries import Catalog
from controller.events import Event, ModelStateChanged, ModelStopFailed
from controller.lifecycle import model as managed_model
from controller.lifecycle.reconcile import compare
from controller.lifecycle.supervisor import Supervisor
from controller.runtime.base import Backend
from controller.runtime.fake import FakeBehaviour, FakeRuntime
from controller.runtime.logs import LogBook
from tests.support.harness import fake_config, fake_supervisor

A = "a:latest"


def config(tmp_path: Path, tiny_model: Path, **sections: Any) -> Any:
    sections.setdefault("runtime", {"reconcile_interval": 3600})  # passes come when a test asks (resync)
    return fake_config(tmp_path, tiny_model, {"a": {}, "b": {}}, **sections)


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def backend(handle: str, adopted: bool = False, model: str = A) -> Backend:
    return Backend(model, f"http://fake.invalid/{handle}", handle, "h", 0.0, adopted=adopted)


def test_compare_sorts_what_runs_against_the_books() -> None:
    mine, gone, left, new, stray = (
        backend("mine"),
        backend("gone"),
        backend("left", adopted=True),
        backend("new"),
        backend("stray"),
    )
    books = {"mine": mine, "gone": gone}
    difference = compare(books, books, [mine, left, new, stray], suspects={"stray"})
    assert difference.unknown == (left,)
    assert difference.strays == (stray,)  # met unbooked twice; "new" only once: it may be mid-start
    assert difference.missing == (gone,)
    assert difference.suspects == {"new", "stray"}


def test_compare_takes_nothing_for_missing_or_unknown_while_it_changed_during_the_listing() -> None:
    started, stopped = backend("started"), backend("stopped")
    difference = compare({"stopped": stopped}, {"started": started}, [])
    assert difference.missing == ()  # booked only after the listing: started while it ran
    assert difference.unknown == difference.strays == ()


async def test_a_stop_that_fails_twice_keeps_the_model_stopping_until_it_succeeds(
    tmp_path: Path, tiny_model: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(managed_model, "STOP_RETRY_DELAYS", (0.05,))
    runtime = FakeRuntime({A: FakeBehaviour()})
    seen: list[tuple[str, bool]] = []  # (state, a backend runs) at every state event

    def watch(event: Event) -> None:
        if isinstance(event, ModelStateChanged):
            seen.append((event.state, bool(runtime.alive(A))))

    cfg = config(tmp_path, tiny_model)
    supervisor = Supervisor(cfg, runtime, Catalog(cfg), LogBook(), runtime.probe, watch)
    await supervisor.start()
    await supervisor.load("a")
    runtime.behaviour(A).fail_stops = 2
    unloading = asyncio.create_task(supervisor.unload("a"))
    await eventually(lambda: len(runtime.stops) >= 1)
    await asyncio.sleep(0.02)
    assert supervisor.view("a").state == "stopping" and runtime.alive(A)
    assert "did not stop" in (supervisor.view("a").error or ""), "why it is still stopping is shown"
    await unloading
    assert len(runtime.stops) == 3
    assert supervisor.view("a").state == "stopped" and not runtime.alive(A)
    assert ("stopped", True) not in seen, "never stopped while its backend runs"
    assert supervisor.view("a").error is None
    await supervisor.load("a")
    assert len(runtime.alive(A)) == 1 and len(runtime.starts) == 2  # no duplicate
    await supervisor.close()


async def test_a_failed_stop_is_an_event_and_a_metric(tmp_path: Path, tiny_model: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(managed_model, "STOP_RETRY_DELAYS", (0.01,))
    supervisor, _ = fake_supervisor(config(tmp_path, tiny_model), FakeRuntime({A: FakeBehaviour(fail_stops=1)}))
    await supervisor.start()
    await supervisor.load("a")
    await supervisor.unload("a")
    failed = [e for e in supervisor.events if isinstance(e, ModelStopFailed)]  # type: ignore[attr-defined]
    assert len(failed) == 1 and failed[0].model == A and "did not stop" in failed[0].error
    assert supervisor._models[A].stop_failures == 1
    await supervisor.close()


async def test_a_crashed_backend_is_released_before_the_model_reads_failed(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    await supervisor.load("a")
    handle = runtime.alive(A)[0].handle
    runtime.crash(A)
    await eventually(lambda: supervisor.view("a").state == "failed")
    assert handle in runtime.stops, "what a dead backend holds (a container, a Deployment) is released"
    await supervisor.close()


async def test_a_backend_that_exits_while_loading_is_released(tmp_path: Path, tiny_model: Path) -> None:
    runtime = FakeRuntime({A: FakeBehaviour(exit_while_loading=1)})
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model), runtime)
    await supervisor.start()
    with pytest.raises(BackendStartFailed):
        await supervisor.load("a")
    assert supervisor.view("a").state == "failed"
    assert runtime.stops == ["fake-1"], "what a backend that failed to load holds is released"
    await supervisor.close()


async def test_a_hung_backend_whose_stop_fails_is_stopped_in_the_end(
    tmp_path: Path, tiny_model: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(managed_model, "STOP_RETRY_DELAYS", (0.02,))
    cfg = config(tmp_path, tiny_model, defaults={"health_interval": "10ms"})
    supervisor, runtime = fake_supervisor(cfg, FakeRuntime({A: FakeBehaviour(fail_stops=2)}))
    await supervisor.start()
    await supervisor.load("a")
    runtime.hang(A)
    await eventually(lambda: supervisor.view("a").state == "failed")
    assert not runtime.alive(A) and len(runtime.stops) == 3
    assert "health check failed" in (supervisor.view("a").error or "")
    await supervisor.close()


async def test_a_backend_gone_without_an_exit_event_is_noticed_by_the_next_pass(
    tmp_path: Path, tiny_model: Path
) -> None:
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    await supervisor.load("a")
    runtime.vanish(A)  # no exit reaches the lifecycle: as a lost event would
    await asyncio.sleep(0.05)
    assert supervisor.view("a").state == "ready"
    runtime.resync()  # the runtime's watch is back: a pass compares
    await eventually(lambda: supervisor.view("a").state == "failed")
    assert "no longer runs it" in (supervisor.view("a").error or "")
    await supervisor.load("a")
    assert len(runtime.alive(A)) == 1
    await supervisor.close()


async def test_the_timer_runs_passes_without_any_event(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, runtime={"reconcile_interval": "20ms"})
    supervisor, runtime = fake_supervisor(cfg)
    await supervisor.start()
    await supervisor.load("a")
    runtime.vanish(A)
    await eventually(lambda: supervisor.view("a").state == "failed")
    await supervisor.close()


async def test_a_leftover_met_after_start_up_is_adopted_or_removed_by_the_start_up_rules(
    tmp_path: Path, tiny_model: Path
) -> None:
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    good = supervisor.spec_for("b").spec_hash
    labels = {"embeddings": "0", "ctx_size": ""}
    runtime.leftovers = [
        Backend("b:latest", "http://fake.invalid/b", "old-b", good, time.time(), labels=labels),
        Backend("b:latest", "http://fake.invalid/b2", "old-b2", good, time.time() - 5, labels=labels),
        Backend("a:latest", "http://fake.invalid/a", "old-a", "stale-hash", time.time(), labels=labels),
    ]
    runtime.resync()
    await eventually(lambda: supervisor.view("b").state == "ready")
    assert supervisor.view("b").handle == "old-b"  # the newest adopted, the other a duplicate
    await eventually(lambda: sorted(runtime.stops) == ["old-a", "old-b2"])
    await supervisor.close()


async def test_an_own_backend_nobody_books_is_removed_at_the_second_pass(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    stray = await runtime.start(supervisor.spec_for("a"))  # as a backend whose owner lost track of it would be
    await supervisor.reconcile()
    assert runtime.alive(A), "one pass may meet a backend between its start and its owner recording it"
    await supervisor.reconcile()
    assert runtime.stops == [stray.handle] and not runtime.alive(A)
    await supervisor.close()


async def test_a_pass_leaves_a_backend_that_is_starting_alone(tmp_path: Path, tiny_model: Path) -> None:
    runtime = FakeRuntime({A: FakeBehaviour(ready_after=0.3)})
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model), runtime)
    await supervisor.start()
    loading = asyncio.create_task(supervisor.load("a"))
    await eventually(lambda: runtime.alive(A))
    for _ in range(3):
        await supervisor.reconcile()
    await loading
    assert runtime.stops == [] and supervisor.view("a").state == "ready"
    await supervisor.close()


async def test_shutdown_gives_a_stop_that_keeps_failing_up_in_bounded_time(
    tmp_path: Path, tiny_model: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(managed_model, "STOP_RETRY_DELAYS", (30.0,))
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model), FakeRuntime({A: FakeBehaviour(fail_stops=99)}))
    await supervisor.start()
    await supervisor.load("a")
    async with asyncio.timeout(10):
        await supervisor.close()
    assert runtime.alive(A), "left for the next controller's first pass"
    assert supervisor.view("a").state == "stopping", "never read stopped while it runs"
