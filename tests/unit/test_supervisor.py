"""Supervisor: admission, eviction, switch, pinned, adoption, shutdown — over the FakeRuntime."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import pytest

from common.errors import InvalidModelFile, InvalidModelName, ModelNotFound, NoCapacity, QueueFull
from controller.events import ModelDraining, ModelStateChanged
from controller.lifecycle.state import State
from controller.runtime.base import Backend
from controller.runtime.fake import FakeBehaviour, FakeRuntime
from tests.support.harness import fake_config, fake_supervisor


def config(tmp_path: Path, tiny_model: Path, models: dict[str, dict[str, Any]] | None = None, **sections: Any) -> Any:
    return fake_config(tmp_path, tiny_model, models or {"a": {}, "b": {}, "c": {}}, **sections)


async def test_supervisor_twenty_concurrent_requests_start_one_backend(tmp_path: Path, tiny_model: Path) -> None:
    runtime = FakeRuntime({"a:latest": FakeBehaviour(ready_after=0.05)})
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model), runtime)
    await supervisor.start()

    async def one() -> str:
        async with supervisor.lease("a") as lease:
            await asyncio.sleep(0.01)
            return lease.url

    urls = await asyncio.gather(*(one() for _ in range(20)))
    assert len(set(urls)) == 1
    assert len(runtime.starts) == 1
    await supervisor.close()


async def test_supervisor_loading_another_model_evicts_the_idle_one(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    async with supervisor.lease("a"):
        pass
    async with supervisor.lease("b"):
        pass
    assert [m.name for m in supervisor.loaded()] == ["b:latest"]
    assert runtime.alive("a:latest") == []
    await supervisor.close()


async def test_supervisor_busy_model_is_evicted_only_after_it_drains(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    release = asyncio.Event()
    a_running = asyncio.Event()

    async def long_request() -> None:
        async with supervisor.lease("a"):
            a_running.set()
            await release.wait()

    first = asyncio.create_task(long_request())
    await a_running.wait()
    second = asyncio.create_task(supervisor.load("b"))
    await asyncio.sleep(0.1)
    assert runtime.alive("a:latest"), "a must not be stopped while its request runs"
    assert not second.done()
    release.set()
    await first
    await asyncio.wait_for(second, 1.0)
    assert runtime.alive("a:latest") == [] and runtime.alive("b:latest")
    await supervisor.close()


async def test_supervisor_pinned_model_is_never_evicted(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, {"p": {"pinned": True}, "b": {}})
    supervisor, runtime = fake_supervisor(cfg)
    await supervisor.start()
    for _ in range(100):
        if runtime.alive("p:latest"):
            break
        await asyncio.sleep(0.01)
    assert runtime.alive("p:latest"), "pinned models are loaded at start"
    with pytest.raises(NoCapacity, match="pinned"):
        async with supervisor.lease("b"):
            pass
    assert runtime.alive("p:latest")
    await supervisor.close()


async def test_supervisor_exclusive_load_switches(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, scheduling={"max_loaded_models": 3})
    supervisor, _ = fake_supervisor(cfg)
    await supervisor.start()
    await supervisor.load("a")
    await supervisor.load("b")
    assert len(supervisor.loaded()) == 2
    info = await supervisor.load("c", exclusive=True)
    assert info.state == "ready"
    assert [m.name for m in supervisor.loaded()] == ["c:latest"]
    await supervisor.close()


async def test_supervisor_unload_stops_and_frees_the_slot(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, _ = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    await supervisor.load("a")
    await supervisor.unload("a")
    assert supervisor.loaded() == []
    assert (await supervisor.model("a")).state == "stopped"
    await supervisor.close()


async def test_supervisor_names_resolve_by_alias_and_case(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, {"gemma3:270m": {"aliases": ["tiny"]}})
    supervisor, _ = fake_supervisor(cfg)
    await supervisor.start()
    async with supervisor.lease("TINY") as lease:
        assert lease.model == "gemma3:270m"
    async with supervisor.lease("Gemma3:270M") as lease:
        assert lease.model == "gemma3:270m"
    await supervisor.close()


async def test_supervisor_bad_names_and_files_are_client_errors(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, {"broken": {}})
    Path(cfg.models["broken"].path).write_bytes(b"not a gguf at all")
    supervisor, runtime = fake_supervisor(cfg)
    await supervisor.start()
    with pytest.raises(ModelNotFound, match="model 'nope' not found"):
        async with supervisor.lease("nope"):
            pass
    with pytest.raises(InvalidModelName):
        async with supervisor.lease("../etc/passwd"):
            pass
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        async with supervisor.lease("broken"):
            pass
    assert runtime.starts == []
    await supervisor.close()


async def test_supervisor_queue_depth_is_enforced_per_model(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, {"a": {"max_concurrent": 1, "queue_depth": 1}})
    supervisor, _ = fake_supervisor(cfg)
    await supervisor.start()
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def hold() -> None:
        async with supervisor.lease("a"):
            entered.set()
            await gate.wait()

    running = asyncio.create_task(hold())
    await entered.wait()
    queued = asyncio.create_task(hold())
    await asyncio.sleep(0.02)
    with pytest.raises(QueueFull):
        async with supervisor.lease("a"):
            pass
    gate.set()
    await asyncio.gather(running, queued)
    await supervisor.close()


async def test_supervisor_adopts_matching_leftovers_and_removes_the_rest(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, scheduling={"max_loaded_models": 2})
    probe_supervisor, _ = fake_supervisor(cfg)
    await probe_supervisor.catalog.refresh()
    good_hash = probe_supervisor.spec_for("a").spec_hash
    labels = {"embeddings": "0", "ctx_size": ""}
    leftovers = [
        Backend("a:latest", "http://fake.invalid/old-a", "old-a", good_hash, time.time(), labels=labels),
        Backend("b:latest", "http://fake.invalid/old-b", "old-b", "stale-hash", time.time(), labels=labels),
        Backend("gone:latest", "http://fake.invalid/old-g", "old-g", "x", time.time(), labels=labels),
    ]
    runtime = FakeRuntime(leftovers=leftovers)
    supervisor, runtime = fake_supervisor(cfg, runtime)
    await supervisor.start()
    for _ in range(100):
        if supervisor.view("a").state == State.READY:
            break
        await asyncio.sleep(0.01)
    assert supervisor.view("a").state == State.READY and supervisor.view("a").adopted
    assert sorted(runtime.stops) == ["old-b", "old-g"]
    async with supervisor.lease("a") as lease:
        assert lease.url.endswith("/old-a")
    assert len(runtime.starts) == 0, "an adopted backend is used, not started again"
    await supervisor.close()


async def test_supervisor_close_stops_every_backend(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, scheduling={"max_loaded_models": 3})
    supervisor, runtime = fake_supervisor(cfg)
    await supervisor.start()
    await asyncio.gather(supervisor.load("a"), supervisor.load("b"), supervisor.load("c"))
    assert len(runtime.running) == 3
    await supervisor.close()
    assert runtime.running == {}


async def test_supervisor_keep_backends_on_exit_leaves_them_running(tmp_path: Path, tiny_model: Path) -> None:
    cfg = config(tmp_path, tiny_model, runtime={"keep_backends_on_exit": True})
    supervisor, runtime = fake_supervisor(cfg)
    await supervisor.start()
    await supervisor.load("a")
    await supervisor.close()
    assert runtime.alive("a:latest")
    last = [e.state for e in supervisor.events if isinstance(e, ModelStateChanged)][-1]  # type: ignore[attr-defined]
    assert last == "ready", "a backend left running is never reported stopped"


async def test_supervisor_state_changes_are_published(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, _ = fake_supervisor(config(tmp_path, tiny_model))
    await supervisor.start()
    await supervisor.load("a")
    await supervisor.unload("a")
    published = supervisor.events  # type: ignore[attr-defined]
    events = [(e.model, e.state) for e in published if isinstance(e, ModelStateChanged)]
    assert events == [("a:latest", s) for s in ("starting", "ready", "stopping", "stopped")]
    draining = [e for e in published if isinstance(e, ModelDraining)]
    assert [(e.model, e.in_flight) for e in draining] == [("a:latest", 0)]  # announced once, before the stop
    await supervisor.close()


@pytest.mark.parametrize("keep_alive", [math.inf, 3600.0])
async def test_supervisor_a_clients_keep_alive_survives_adoption(
    tmp_path: Path, tiny_model: Path, keep_alive: float
) -> None:
    """keep_alive -1 (forever) or an hour, set by a client, still holds after a controller restart: it is kept with
    the backend and read back on adoption (before, the adopted model expired after the default 5 minutes)."""
    cfg = config(tmp_path, tiny_model, runtime={"keep_backends_on_exit": True})
    first, runtime = fake_supervisor(cfg)
    await first.start()
    await first.load("a", keep_alive=keep_alive)
    for _ in range(100):
        if runtime.kept:
            break
        await asyncio.sleep(0.01)
    [(handle, labels)] = runtime.kept
    assert labels == {"keep_alive": repr(keep_alive)}
    await first.close()
    [left] = runtime.alive("a:latest")
    assert left.handle == handle and left.labels["keep_alive"] == repr(keep_alive)

    second, _ = fake_supervisor(cfg, FakeRuntime(leftovers=[left]))
    await second.start()
    for _ in range(100):
        if second.view("a").state == State.READY:
            break
        await asyncio.sleep(0.01)
    view = second.view("a")
    assert view.state == State.READY and view.adopted
    if math.isinf(keep_alive):
        assert view.expires_at is None
    else:
        assert view.expires_at is not None and view.expires_at > time.time() + 1800  # not the default 300 s
    await second.close()


@pytest.mark.parametrize(("tearing_down", "kept"), [(True, False), (False, True)])
async def test_supervisor_keeps_backends_through_a_restart_not_a_teardown(
    tmp_path: Path, tiny_model: Path, tearing_down: bool, kept: bool
) -> None:
    """keep_backends_on_exit: auto (the default) asks the runtime whether the deployment is being taken down."""
    supervisor, runtime = fake_supervisor(config(tmp_path, tiny_model))
    runtime.tearing_down = tearing_down
    await supervisor.start()
    await supervisor.load("a")
    await supervisor.close()
    assert bool(runtime.alive("a:latest")) is kept
