"""Two whole controller apps sharing one Redis (store and leader election) and one engine (a FakeRuntime both act
on, as two controllers share one Docker engine): the second stands by — not ready, never listing, starting or
stopping anything — while the first leads; when the first dies, the second takes over and adopts what it left.

The election runs with its defaults (a 10 s lease renewed every 2 s): the takeover allowed is the design's promise,
``TAKEOVER_ALLOWED`` after the leader's death, adoption included. The measured time is printed (``-s``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from quart import Quart

from common.background import cancel_and_wait
from controller.events import Event, LeadershipChanged
from controller.leadership.office import EXIT_LEADERSHIP_LOST
from controller.lifecycle.state import State
from controller.runtime.base import Backend, ExitInfo, LaunchSpec
from controller.runtime.fake import FakeBehaviour, FakeRuntime
from controller.services import services_of
from llamacontroller.app import create_app
from tests.support.harness import fake_config

TAKEOVER_ALLOWED = 15.0  # seconds from the leader's death until the standby is ready with the backends adopted


class View:
    """One controller's door to the shared engine: records each call, and reports a backend another controller
    started as a leftover to adopt (``adopted``), as the container runtimes report what they did not start."""

    def __init__(self, engine: FakeRuntime) -> None:
        self.engine = engine
        self.name = engine.name
        self.calls: list[str] = []
        self.mine: set[str] = set()

    async def start(self, spec: LaunchSpec) -> Backend:
        self.calls.append("start")
        backend = await self.engine.start(spec)
        self.mine.add(backend.handle)
        return backend

    async def stop(self, backend: Backend, timeout: float) -> None:
        self.calls.append("stop")
        await self.engine.stop(backend, timeout)

    async def list_managed(self) -> list[Backend]:
        self.calls.append("list")
        listed = await self.engine.list_managed()
        return [found if found.handle in self.mine else replace(found, adopted=True) for found in listed]

    async def keep_labels(self, backend: Backend, labels: Mapping[str, str]) -> None:
        self.calls.append("keep_labels")
        await self.engine.keep_labels(backend, labels)

    async def wait_exit(self, backend: Backend) -> ExitInfo:
        return await self.engine.wait_exit(backend)

    async def torn_down(self) -> bool:
        return False  # a restart: what one controller leaves, the next adopts

    def on_resync(self, callback: Callable[[], None]) -> None:
        return None

    def logs(self, model: str) -> AsyncIterator[bytes]:
        return self.engine.logs(model)

    async def close(self) -> None:
        return None


@dataclass
class Controller:
    app: Quart
    view: View

    async def get(self, path: str) -> tuple[int, Any]:
        answer = await self.app.test_client().get(path)
        return answer.status_code, await answer.get_json() if answer.is_json else await answer.get_data(as_text=True)


@pytest.fixture
def make(tmp_path: Path, tiny_model: Path, redis_url: str) -> Callable[..., Controller]:
    def controller(name: str, engine: FakeRuntime, models: tuple[str, ...] = ("a",)) -> Controller:
        config = fake_config(
            tmp_path,  # one models folder: the same files, so the same backends, for both
            tiny_model,
            {model: {} for model in models},
            server={"data_dir": str(tmp_path / name), "leader_election": {"kind": "redis"}},
            store={"kind": "redis", "redis_url": redis_url},
            auth={"enabled": False, "secrets_dir": str(tmp_path / "secrets")},  # shared, as the shapes share them
            scheduling={"max_loaded_models": len(models)},
        )
        view = View(engine)
        app = create_app(config, runtime=view, probe=engine.probe, binary=lambda: "/bin/llama-server")
        return Controller(app, view)

    return controller


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


async def test_two_controllers_one_leads_and_the_standby_takes_over(
    make: Callable[[str, FakeRuntime], Controller],
) -> None:
    engine = FakeRuntime()
    first, second = make("one", engine), make("two", engine)
    async with first.app.test_app():
        assert await first.get("/readyz") == (200, {"status": "ready"})
        loaded = await first.app.test_client().post("/control/v1/models/a/load")
        assert loaded.status_code == 200, await loaded.get_data(as_text=True)
        async with second.app.test_app():
            status, body = await second.get("/readyz")
            assert (status, body["status"], body["error"]) == (503, "standby", "standby: another controller leads")
            assert await second.get("/healthz") == (200, {"status": "ok"})
            refused = await second.app.test_client().post("/control/v1/models/a/load")
            assert refused.status_code == 503 and (await refused.get_json())["code"] == "not_leader"
            await asyncio.sleep(5.0)  # a few renewals and standby looks
            assert second.view.calls == [], "the standby acted on the runtime"
            assert metric((await second.get("/metrics"))[1], "llamacontroller_leader") == 0.0
            assert metric((await first.get("/metrics"))[1], "llamacontroller_leader") == 1.0
            leadership = (await second.get("/control/v1/system"))[1]["leadership"]
            assert leadership["kind"] == "redis" and leadership["leading"] is False and leadership["term"] is None
            assert (await first.get("/readyz"))[0] == 200

            one, two = services_of(first.app), services_of(second.app)
            with one.events.subscription() as first_events:
                loop = asyncio.get_running_loop()
                died = loop.time()
                await cancel_and_wait(one.leadership.renewal)  # renews no more, releases nothing: a SIGKILL's leftovers
                async with asyncio.timeout(TAKEOVER_ALLOWED):
                    while (await second.get("/readyz"))[0] != 200:
                        await asyncio.sleep(0.05)
                took = loop.time() - died
                print(f"\ntaken over and adopted {took:.2f}s after the leader died (allowed {TAKEOVER_ALLOWED:g}s)")
                lost = await _leadership_event(first_events)

            assert one.leadership.lost.is_set() and not one.leadership.leading
            assert lost.state == "lost" and lost.error and lost.term == one.leadership.fencing_token
            assert one.ending.code == EXIT_LEADERSHIP_LOST
            status, body = await first.get("/readyz")
            assert status == 503 and body["status"] == "lost leadership"
            assert second.view.calls[0] == "list" and "start" not in second.view.calls
            assert two.supervisor.view("a").state == State.READY, "the backend the dead leader left was not adopted"
            assert two.leadership.fencing_token is not None and one.leadership.fencing_token is not None
            assert two.leadership.fencing_token > one.leadership.fencing_token
            leadership = (await second.get("/control/v1/system"))[1]["leadership"]
            assert leadership["leading"] is True and leadership["term"] == two.leadership.fencing_token
            assert leadership["identity"] == two.leadership.identity
            assert engine.stops == [] and len(engine.running) == 1, "a backend was stopped or started again"
            assert "stop" not in first.view.calls
        # The dead leader's shutdown stops nothing (its backends were the next leader's).
    assert first.view.calls.count("stop") == 0


async def _leadership_event(events: asyncio.Queue[Event]) -> LeadershipChanged:
    async with asyncio.timeout(5):
        while True:
            event = await events.get()
            if isinstance(event, LeadershipChanged):
                return event


async def test_a_leader_that_dies_mid_load_and_mid_drain_leaves_one_backend_of_each_model(
    make: Callable[..., Controller],
) -> None:
    """The leader dies while ``b`` loads and while ``a`` drains (unloaded with a request still on it): the one that
    takes over finds each backend and adopts it; nothing is started twice, and the dead leader stops nothing."""
    engine = FakeRuntime(behaviours={"b:latest": FakeBehaviour(ready_after=3.0)})
    first, second = make("one", engine, ("a", "b")), make("two", engine, ("a", "b"))
    # The dead leader's shutdown gives up its refused stops in a few tries each: more than Quart's default 6 s.
    async with first.app.test_app_class(first.app, shutdown_timeout=30):  # type: ignore[call-arg]
        one = services_of(first.app)
        assert (await first.app.test_client().post("/control/v1/models/a/load")).status_code == 200
        async with second.app.test_app(), one.supervisor.lease("a") as held:
            loading = asyncio.create_task(first.app.test_client().post("/control/v1/models/b/load"))
            unloading = asyncio.create_task(first.app.test_client().post("/control/v1/models/a/unload"))
            await asyncio.sleep(1.0)  # b is starting; a drains, waiting for the request held on it
            assert one.supervisor.view("a").state == State.READY and not unloading.done() and not loading.done()
            await cancel_and_wait(one.leadership.renewal)  # dies: renews nothing, releases nothing
            async with asyncio.timeout(TAKEOVER_ALLOWED):
                while (await second.get("/readyz"))[0] != 200:
                    await asyncio.sleep(0.05)
            two = services_of(second.app)
            async with asyncio.timeout(10):
                while two.supervisor.view("b").state != State.READY:
                    await asyncio.sleep(0.05)
            assert two.supervisor.view("a").state == State.READY
            assert two.supervisor.view("a").handle == held.handle, "the drained backend is adopted, not replaced"
            models = sorted(running.spec.model for running in engine.running.values())
            assert models == ["a:latest", "b:latest"], "one backend of each model, whatever the dead leader was doing"
            assert [spec.model for spec in engine.starts] == ["a:latest", "b:latest"], "nothing started twice"
            assert "start" not in second.view.calls and engine.stops == []
            for task in (loading, unloading):  # the dead leader's clients: their answers no longer matter here
                await cancel_and_wait(task)
    assert "stop" not in first.view.calls, "a leader that lost its lease acts on nothing"
