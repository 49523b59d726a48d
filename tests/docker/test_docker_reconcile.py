"""The level-triggered lifecycle on the docker runtime against a real Docker Engine: a stop the engine refuses is
tried again until the container is gone, a listing (each reconcile pass) never disturbs a container being started
or stopped, a container removed while no controller ran is noticed by the next controller's first pass, and an
exit is reported with llama-server's own last words. (The process runtime's are in tests/integration.)

Faults are injected into the docker SDK calls the runtime makes (``Container.stop``, ``start``, ``logs``)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from docker.models.containers import Container

from common.errors import BackendStartFailed
from controller.config import validate_config
from controller.lifecycle import model as managed_model
from controller.runtime import runtime_setup
from controller.runtime.base import LaunchSpec
from controller.runtime.docker import DockerRuntime
from controller.runtime.instance import instance_id
from controller.runtime.logs import LogBook, log_hint
from tests.docker.test_docker_runtime import docker_config, ours
from tests.support.server import running_app

A = "a:latest"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_FLAG_LINE = "invalid argument: --no-such-flag"  # what llama-server says before it exits with code 1


@pytest.fixture
def cleanup(tmp_path: Path, engine: docker.DockerClient) -> Iterator[None]:
    """Whatever a test leaves of its own instance is removed (by id), and the test fails for it."""
    yield
    if not (tmp_path / "data" / "instance-id").exists():
        return
    left = ours(engine, tmp_path)
    for container in left:
        container.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


def runs(engine: docker.DockerClient, handle: str) -> bool:
    try:
        return engine.containers.get(handle).status == "running"
    except docker.errors.NotFound:
        return False


async def eventually(condition: Any, seconds: float = 60.0) -> None:
    async with asyncio.timeout(seconds):
        while not await asyncio.to_thread(condition):
            await asyncio.sleep(0.1)


@pytest.mark.usefixtures("llama_server_image", "cleanup")
async def test_docker_stop_that_fails_twice_ends_gone_and_never_reads_stopped_before(
    tmp_path: Path, engine: docker.DockerClient, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(managed_model, "STOP_RETRY_DELAYS", (0.3,))
    failed: list[str] = []
    real_stop = Container.stop

    def stop_fails_twice(self: Container, **kwargs: Any) -> None:
        if len(failed) < 2:  # as an engine that times out: the container runs on
            failed.append(self.id or "")
            raise docker.errors.APIError("injected: the engine did not answer in time")
        real_stop(self, **kwargs)

    monkeypatch.setattr(Container, "stop", stop_fails_twice)
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    async with running_app(config) as running:
        client = running.client
        loaded = (await client.post("/control/v1/models/a/load")).json()
        assert loaded["state"] == "ready"
        handle = loaded["handle"]
        unloading = asyncio.create_task(client.post("/control/v1/models/a/unload", timeout=120))
        seen: list[tuple[str, bool]] = []  # (its state, then whether its container runs)
        while not unloading.done():
            state = (await client.get("/control/v1/models/a")).json()["state"]
            seen.append((state, await asyncio.to_thread(runs, engine, handle)))
            await asyncio.sleep(0.05)
        assert (await unloading).json()["state"] == "stopped"
        assert failed == [handle, handle]
        assert ("stopping", True) in seen, "it reads stopping while the stop is tried again"
        assert ("stopped", True) not in seen, "never stopped while its container runs"
        assert ours(engine, tmp_path) == [], "the container is removed"
        assert (await client.post("/v1/chat/completions", json={"model": "a", **CHAT})).status_code == 200
        [again] = ours(engine, tmp_path)
        assert again.id != handle and again.status == "running", "the next load makes no duplicate"
        assert (await client.post("/control/v1/models/a/unload")).json()["state"] == "stopped"


@pytest.mark.usefixtures("llama_server_image", "cleanup")
async def test_docker_listing_while_a_container_starts_or_stops_leaves_it_alone(
    tmp_path: Path, engine: docker.DockerClient, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconcile pass may list at any moment: a container created but not yet started is no leftover to remove
    (before, the listing removed it and the start failed), one this runtime started is reported as its own
    (before, as adopted, which the lifecycle takes for a duplicate to stop), and one being stopped is left to
    its stop."""
    entered, go_on = threading.Event(), threading.Event()
    real_start, real_stop = Container.start, Container.stop

    def held(real: Any) -> Any:
        def call(self: Container, **kwargs: Any) -> Any:
            entered.set()
            go_on.wait(60)
            return real(self, **kwargs)

        return call

    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    runtime = DockerRuntime(runtime_setup(config, LogBook()))
    try:
        monkeypatch.setattr(Container, "start", held(real_start))
        starting = asyncio.ensure_future(runtime.start(LaunchSpec(A, models_dir / "a.gguf", ("--ctx-size", "512"))))
        assert await asyncio.to_thread(entered.wait, 60)
        assert await runtime.list_managed() == []  # created, not running yet: nothing to report
        [created] = ours(engine, tmp_path)
        assert created.status == "created", "the listing left it alone"
        go_on.set()
        backend = await starting
        listed = await runtime.list_managed()
        assert [(b.handle, b.adopted) for b in listed] == [(backend.handle, False)]

        entered.clear()
        go_on.clear()
        monkeypatch.setattr(Container, "stop", held(real_stop))
        stopping = asyncio.ensure_future(runtime.stop(backend, 2))
        assert await asyncio.to_thread(entered.wait, 60)
        listed = await runtime.list_managed()
        assert [(b.handle, b.adopted) for b in listed] == [(backend.handle, False)]
        go_on.set()
        await stopping
        assert await runtime.list_managed() == []
    finally:
        go_on.set()
        await runtime.close()
    assert ours(engine, tmp_path) == []


@pytest.mark.usefixtures("llama_server_image", "cleanup")
async def test_docker_start_removes_an_earlier_container_of_the_model_that_still_runs(
    tmp_path: Path, engine: docker.DockerClient, models_dir: Path
) -> None:
    """A container of the model that nobody holds any more (a controller that could not stop it left it) is
    removed by the next start: before, it was left running and the start failed with 409 Conflict."""
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    instance = instance_id(config.data_dir)
    spec = LaunchSpec(A, models_dir / "a.gguf", ("--ctx-size", "512"))
    first = DockerRuntime(runtime_setup(config, LogBook(), instance=instance))
    earlier = await first.start(spec)
    await first.close()
    second = DockerRuntime(runtime_setup(config, LogBook(), instance=instance))
    try:
        backend = await second.start(spec)
        [running] = ours(engine, tmp_path)
        assert running.id == backend.handle != earlier.handle
        await second.stop(backend, 2)
    finally:
        await second.close()
    assert ours(engine, tmp_path) == []


@pytest.mark.parametrize("behind_the_back", ["removed", "killed"])
@pytest.mark.usefixtures("llama_server_image", "cleanup")
async def test_docker_container_gone_while_no_controller_runs_is_noticed_by_the_first_pass(
    tmp_path: Path, engine: docker.DockerClient, models_dir: Path, behind_the_back: str
) -> None:
    raw = docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}})
    raw["runtime"]["keep_backends_on_exit"] = True
    config = validate_config(raw)
    async with running_app(config) as first:
        loaded = (await first.client.post("/control/v1/models/a/load")).json()
        assert loaded["state"] == "ready"
        handle = loaded["handle"]
    assert runs(engine, handle), "left running for the next controller"
    old = engine.containers.get(handle)
    if behind_the_back == "removed":
        old.remove(force=True)
    else:
        old.kill()
        await eventually(lambda: not runs(engine, handle))

    async with running_app(config) as second:
        found = (await second.client.get("/control/v1/models/a")).json()
        assert found["state"] == "stopped" and found["handle"] is None, "not adopted: it is gone"
        assert second.supervisor.loaded() == [], "it holds no slot"
        assert [c.id for c in ours(engine, tmp_path)] == [], "a dead leftover is removed"
        assert (await second.client.post("/v1/chat/completions", json={"model": "a", **CHAT})).status_code == 200
        assert len(ours(engine, tmp_path)) == 1
        assert (await second.client.post("/control/v1/models/a/unload")).json()["state"] == "stopped"


def slow_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine hands a container's output over late (a busy engine): its ``die`` event comes first."""
    real_logs = Container.logs

    def logs(self: Container, **kwargs: Any) -> Any:
        stream = real_logs(self, **kwargs)

        def late() -> Iterator[bytes]:
            time.sleep(0.5)
            yield from stream

        return late()

    monkeypatch.setattr(Container, "logs", logs)


@pytest.mark.usefixtures("llama_server_image", "cleanup")
async def test_docker_exit_right_after_start_is_answered_with_the_backends_last_words(
    tmp_path: Path, engine: docker.DockerClient, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama-server refuses a flag and exits at once: by the time the runtime reports the exit (or fails the
    start), its last line is in the log book, so the error quotes it (before, the exit was answered as soon as
    the event came, and the log still lacked the reason)."""
    slow_logs(monkeypatch)
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    logbook = LogBook()
    runtime = DockerRuntime(runtime_setup(config, logbook))
    try:
        for _ in range(3):
            try:
                backend = await runtime.start(LaunchSpec(A, models_dir / "a.gguf", ("--no-such-flag",)))
            except BackendStartFailed as exc:  # it was gone before its port could be read
                assert BAD_FLAG_LINE in exc.message
                continue
            async with asyncio.timeout(60):
                info = await runtime.wait_exit(backend)
            assert info.code == 1
            assert BAD_FLAG_LINE in log_hint(logbook.tail(A, 200)), "its last words are in when the exit is"
    finally:
        await runtime.close()
    await eventually(lambda: ours(engine, tmp_path) == [])


@pytest.mark.usefixtures("llama_server_image", "cleanup")
async def test_docker_load_of_a_backend_that_exits_at_once_quotes_its_reason(
    tmp_path: Path, engine: docker.DockerClient, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_logs(monkeypatch)
    models = {"a": {"path": str(models_dir / "a.gguf"), "args": ["--no-such-flag"]}}
    async with running_app(validate_config(docker_config(tmp_path, models))) as running:
        answer = await running.client.post("/control/v1/models/a/load")
        assert answer.status_code == 502
        assert BAD_FLAG_LINE in answer.json()["error"]
        state = (await running.client.get("/control/v1/models/a")).json()
        assert state["state"] == "failed" and BAD_FLAG_LINE in state["error"]
    await eventually(lambda: ours(engine, tmp_path) == [])


@pytest.mark.usefixtures("llama_server_image", "cleanup")
async def test_docker_backend_runs_unprivileged(tmp_path: Path, engine: docker.DockerClient, models_dir: Path) -> None:
    """As the kubernetes runtime's pods: not root, no capabilities, no-new-privileges, a read-only root file system,
    a bound on processes, a rotated log; and llama-server serves that way."""
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    runtime = DockerRuntime(runtime_setup(config, LogBook()))
    try:
        backend = await runtime.start(LaunchSpec(A, models_dir / "a.gguf", ("--ctx-size", "512")))
        container = engine.containers.get(backend.handle)
        host = container.attrs["HostConfig"]
        assert container.attrs["Config"]["User"] == "65532:65532"
        assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges:true"]
        assert host["ReadonlyRootfs"] is True and host["PidsLimit"] == 4096 and "/tmp" in host["Tmpfs"]
        assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}
        await eventually(lambda: httpx.get(f"{backend.url}/health", timeout=5).status_code == 200)
        await runtime.stop(backend, 2)
    finally:
        await runtime.close()
