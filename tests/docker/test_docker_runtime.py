"""`runtime.kind: docker` against a real Docker Engine: llama-server in containers built by `images build`.

The controller runs on the host (`llamacontroller serve`); its backends are containers that publish on
127.0.0.1. The shape where the controller itself runs in a container is test_controller_in_container.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import ollama
import pytest
from docker.models.containers import Container

from common.errors import BackendStartFailed
from controller.config import validate_config
from controller.runtime import runtime_setup
from controller.runtime.base import LaunchSpec
from controller.runtime.containers import INSTANCE, MANAGED, MODEL
from controller.runtime.docker import DockerRuntime
from controller.runtime.instance import instance_id
from controller.runtime.logs import LogBook
from controller.runtime.process import free_port
from tests.support.ollama_checks import GEMMA, gemma_stream_embed_and_ps
from tests.support.server import ServeProcess, serve_processes


def docker_config(root: Path, models: dict[str, Any], **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "models_dir": str(root / "none"),
        "runtime": {"kind": "docker", "stop_timeout": 5},
        "edge": {"enabled": False},
        "defaults": {"ctx_size": 2048, "max_concurrent": 2, "startup_timeout": 60},
        "models": models,
    }
    config.update(sections)
    return config


def ours(engine: docker.DockerClient, root: Path) -> list[Any]:
    """The containers this test's controller (its data dir's instance) has on the engine, running or not."""
    instance = (root / "data" / "instance-id").read_text().strip()
    return engine.containers.list(all=True, filters={"label": [f"{MANAGED}=true", f"{INSTANCE}={instance}"]})


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copy(tiny_model, folder / f"{name}.gguf")
    return folder


@pytest.fixture
def serve(tmp_path: Path, llama_server_image: str) -> Iterator[Callable[..., ServeProcess]]:
    """Start `serve` with a docker-runtime config; every server started is stopped, and the test fails if any
    container of its instance is left afterwards."""
    with serve_processes(tmp_path) as start:
        yield start
    engine = docker.from_env(version="auto")
    try:
        left = ours(engine, tmp_path) if (tmp_path / "data" / "instance-id").exists() else []
        names = [container.name for container in left]
        for container in left:
            container.remove(force=True)
        assert not names, f"containers left behind: {names}"
    finally:
        engine.close()


def test_docker_ollama_client_end_to_end_with_gemma(
    tmp_path: Path,
    serve: Callable[..., ServeProcess],
    engine: docker.DockerClient,
    models_dir: Path,
    gemma_model: Path,
) -> None:
    gemma = models_dir / gemma_model.name
    os.link(gemma_model, gemma)  # into the folder the container mounts, without copying 253 MB
    config = docker_config(
        tmp_path,
        {GEMMA: {"path": str(gemma)}, "a": {"path": str(models_dir / "a.gguf")}},
        scheduling={"max_loaded_models": 1},
    )
    served = serve(config)
    with ollama.Client(host=served.url, headers=served.headers, timeout=120) as client:
        reply = client.chat(GEMMA, messages=[{"role": "user", "content": "Say hi."}], options={"num_predict": 8})
        assert reply.done and reply.message.content  # loaded on demand, in a container
        running = [c for c in ours(engine, tmp_path) if c.status == "running"]
        assert [c.labels[MODEL] for c in running] == [GEMMA]
        assert running[0].attrs["HostConfig"]["Init"] is True
        # Only the gateway holds the backend's key: in the container's environment, never on its command line.
        backend = served.http.get(f"/control/v1/models/{GEMMA}").json()["backend_url"]
        assert httpx.get(f"{backend}/props", timeout=10).status_code == 401
        assert any(env.startswith("LLAMA_API_KEY=") for env in running[0].attrs["Config"]["Env"])
        assert not any("api-key" in arg or "API_KEY" in arg for arg in running[0].attrs["Args"])
        mounts = running[0].attrs["Mounts"]
        assert [(m["Source"], m["Destination"], m["RW"]) for m in mounts] == [(str(models_dir), "/models", False)]
        gemma_stream_embed_and_ps(client)  # embeddings: restarts the container with --embeddings
        client.chat("a", messages=[{"role": "user", "content": "x"}], options={"num_predict": 2})  # a switch
        assert [c.labels[MODEL] for c in ours(engine, tmp_path)] == ["a:latest"]
        client.generate("a", keep_alive=0)  # unload
    assert ours(engine, tmp_path) == []


def test_docker_kill_fails_fast_and_the_next_request_restarts(
    tmp_path: Path, serve: Callable[..., ServeProcess], engine: docker.DockerClient, models_dir: Path
) -> None:
    served = serve(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    first = served.http.post("/control/v1/models/a/load").json()["handle"]
    engine.containers.get(first).kill()
    killed = time.monotonic()
    while (state := served.http.get("/control/v1/models/a").json())["state"] != "failed":
        assert time.monotonic() - killed < 1.5, state
        time.sleep(0.02)
    assert "killed (SIGKILL)" in state["error"]
    second = served.http.post("/control/v1/models/a/load")
    assert second.status_code == 200 and second.json()["handle"] != first


def test_docker_memory_limit_is_reported_as_out_of_memory(
    tmp_path: Path, serve: Callable[..., ServeProcess], models_dir: Path, gemma_model: Path
) -> None:
    gemma = models_dir / gemma_model.name
    os.link(gemma_model, gemma)  # into the folder the container mounts, without copying 253 MB
    models = {GEMMA: {"path": str(gemma), "container": {"memory": "24MiB"}}}
    served = serve(docker_config(tmp_path, models))
    answer = served.http.post("/control/v1/models/gemma3:270m/load")
    assert answer.status_code == 502
    assert "out of memory: llama-server exceeded the container's memory limit of 24 MiB" in answer.json()["error"]
    state = served.http.get("/control/v1/models/gemma3:270m").json()
    assert state["state"] == "failed" and "out of memory" in state["error"]
    chat = served.http.post("/api/generate", json={"model": GEMMA, "prompt": "x", "stream": False})
    assert chat.status_code == 502 and "out of memory" in chat.json()["error"]


def test_docker_gpu_request_on_an_engine_without_nvidia_is_clear_and_leaves_nothing(
    tmp_path: Path, serve: Callable[..., ServeProcess], engine: docker.DockerClient, models_dir: Path
) -> None:
    if "nvidia" in (engine.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime")  # never the case on the machines CI runs on
    served = serve(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf"), "gpus": "all"}}))
    answer = served.http.post("/control/v1/models/a/load")
    assert answer.status_code == 502
    assert "NVIDIA Container Toolkit" in answer.json()["error"]
    assert ours(engine, tmp_path) == []


def test_docker_missing_image_names_it_and_how_to_build_it(
    tmp_path: Path, serve: Callable[..., ServeProcess], engine: docker.DockerClient, models_dir: Path
) -> None:
    config = docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf"), "container": {"image": "lc-none/x:1"}}})
    served = serve(config)
    answer = served.http.post("/control/v1/models/a/load")
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert "lc-none/x:1 is not on this Docker engine" in error and "llamacontroller images build" in error
    assert ours(engine, tmp_path) == []


def test_docker_twenty_restarts_never_orphan_or_duplicate(
    tmp_path: Path, serve: Callable[..., ServeProcess], engine: docker.DockerClient, models_dir: Path
) -> None:
    models = {name: {"path": str(models_dir / f"{name}.gguf"), "keep_alive": -1} for name in ("a", "b")}
    config = docker_config(tmp_path, models, scheduling={"max_loaded_models": 2})
    for round_number in range(20):
        served = serve(config, name=f"serve{round_number}")
        for name in ("a", "b"):
            assert served.http.post(f"/control/v1/models/{name}/load").status_code == 200
        containers = ours(engine, tmp_path)
        labels = sorted(c.labels[MODEL] for c in containers)
        assert labels == ["a:latest", "b:latest"], f"round {round_number}: {[(c.name, c.status) for c in containers]}"
        if round_number % 2:
            served.process.send_signal(signal.SIGKILL)  # the containers stay, to be adopted next round
            served.process.wait()
        else:
            served.process.send_signal(signal.SIGTERM)  # a clean stop removes them
            served.process.wait(30)
            assert ours(engine, tmp_path) == [], f"round {round_number}: a clean stop left containers"
    last = serve(config, name="last")  # adopts what the last kill -9 left, then a clean stop removes it
    assert sorted(m["name"] for m in last.http.get("/control/v1/models").json()["models"] if m["adopted"]) == ["a", "b"]


async def test_docker_events_stream_lost_is_reconnected_and_exits_still_noticed(
    tmp_path: Path, engine: docker.DockerClient, llama_server_image: str, models_dir: Path
) -> None:
    """The engine's event stream breaks (as when dockerd restarts): the runtime reconnects, an exit that happened
    while nobody listened is still reported, and the lifecycle is told to compare again (``on_resync``: before,
    it was never called)."""
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    runtime = DockerRuntime(runtime_setup(config, LogBook()))
    resynced = asyncio.Event()
    runtime.on_resync(resynced.set)
    backend = await runtime.start(LaunchSpec("a:latest", models_dir / "a.gguf", ("--ctx-size", "512")))
    try:
        exited = asyncio.ensure_future(runtime.wait_exit(backend))
        stream = runtime._event_stream
        await asyncio.to_thread(stream.close)  # the connection to the engine is gone
        engine.containers.get(backend.handle).kill()  # ... and the container dies meanwhile
        async with asyncio.timeout(30):
            info = await exited
            await resynced.wait()
        assert info.code == 137 and "SIGKILL" in info.reason
        assert runtime._event_stream is not stream, "a new stream was opened"
    finally:
        await runtime.stop(backend, 2)
        await runtime.close()
    assert ours(engine, tmp_path) == []


class LateToResume(DockerRuntime):
    """As on a busy machine: the event loop comes back to ``start`` only after the container it started has
    died and its ``die`` event has been handled (the runtime removes a dead container: it is gone then)."""

    async def _call(self, action: str, work: Callable[[], Any]) -> Any:
        result = await super()._call(action, work)
        if isinstance(result, Container) and result.attrs["State"].get("Running"):
            engine = docker.from_env(version="auto")
            try:
                async with asyncio.timeout(60):
                    while True:
                        try:
                            await asyncio.to_thread(engine.containers.get, result.id or "")
                        except docker.errors.NotFound:
                            break
                        await asyncio.sleep(0.05)
            finally:
                engine.close()
        return result


async def test_docker_container_that_exits_right_after_start_is_seen(
    tmp_path: Path, engine: docker.DockerClient, llama_server_image: str, models_dir: Path
) -> None:
    """llama-server refuses a flag and exits within milliseconds: its exit reaches the lifecycle (before the fix
    the exit watch was registered after the start returned, the event was dropped and a load waited out its
    whole startup timeout)."""
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    runtime = LateToResume(runtime_setup(config, LogBook()))
    try:
        for _ in range(3):
            try:
                backend = await runtime.start(LaunchSpec("a:latest", models_dir / "a.gguf", ("--no-such-flag",)))
            except BackendStartFailed as exc:  # it was gone before its port could be read
                assert "exited with code 1" in str(exc)
                continue
            info = await asyncio.wait_for(runtime.wait_exit(backend), 30)
            assert info.code == 1 and info.reason == "llama-server exited with code 1"
    finally:
        await runtime.close()
    async with asyncio.timeout(30):
        while ours(engine, tmp_path):  # each dead container is removed
            await asyncio.sleep(0.1)


async def test_docker_two_models_whose_names_slug_alike_run_side_by_side(
    tmp_path: Path, engine: docker.DockerClient, llama_server_image: str, models_dir: Path
) -> None:
    """``a:b-c`` and ``a-b:c`` once mapped to one container name: the second start failed with a 409 that blamed
    "another controller"."""
    models = {"a:b-c": {"path": str(models_dir / "a.gguf")}, "a-b:c": {"path": str(models_dir / "b.gguf")}}
    config = validate_config(docker_config(tmp_path, models))
    runtime = DockerRuntime(runtime_setup(config, LogBook()))
    backends = []
    try:
        for model, file in (("a:b-c", "a.gguf"), ("a-b:c", "b.gguf")):
            backends.append(await runtime.start(LaunchSpec(model, models_dir / file, ("--ctx-size", "512"))))
        running = {c.labels[MODEL]: c.name for c in ours(engine, tmp_path) if c.status == "running"}
        assert sorted(running) == ["a-b:c", "a:b-c"] and len(set(running.values())) == 2
    finally:
        for backend in backends:
            await runtime.stop(backend, 2)
        await runtime.close()
    assert ours(engine, tmp_path) == []


async def test_docker_container_named_the_older_way_is_still_adopted(
    tmp_path: Path, engine: docker.DockerClient, llama_server_image: str, models_dir: Path
) -> None:
    """Names gained a hash; a container an older controller named without it is adopted by its labels."""
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    instance = instance_id(config.data_dir)
    first = DockerRuntime(runtime_setup(config, LogBook(), instance=instance))
    backend = await first.start(LaunchSpec("a:latest", models_dir / "a.gguf", ("--ctx-size", "512")))
    await first.close()
    engine.containers.get(backend.handle).rename(f"llamacontroller-{instance[:8]}-a-latest")
    second = DockerRuntime(runtime_setup(config, LogBook(), instance=instance))
    try:
        adopted = await second.list_managed()
        assert [(b.handle, b.adopted, b.url) for b in adopted] == [(backend.handle, True, backend.url)]
    finally:
        await second.stop(backend, 2)
        await second.close()
    assert ours(engine, tmp_path) == []


async def test_docker_adoption_follows_only_new_output(
    tmp_path: Path, engine: docker.DockerClient, llama_server_image: str, models_dir: Path
) -> None:
    """A restarted controller adopts a container and follows what it writes from then on: the output already in
    the model's log file is not written there again (before the fix the whole log was replayed into it)."""
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    instance = instance_id(config.data_dir)
    log_file = config.data_dir / "logs" / "a:latest.log"
    first = DockerRuntime(runtime_setup(config, LogBook(), instance=instance))
    backend = await first.start(LaunchSpec("a:latest", models_dir / "a.gguf", ("--ctx-size", "512")))
    try:
        async with asyncio.timeout(60):
            while "listening on" not in (log_file.read_text() if log_file.exists() else ""):
                await asyncio.sleep(0.1)
        # A second controller takes over the data dir as the first left it (the first one, which keeps writing
        # to its own copy, plays no further part).
        second_config = validate_config(docker_config(tmp_path / "second", {"a": {"path": str(models_dir / "a.gguf")}}))
        second_log = second_config.data_dir / "logs" / "a:latest.log"
        second_log.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log_file, second_log)  # with its time of last write
        before = second_log.read_text()
        second = DockerRuntime(runtime_setup(second_config, LogBook(), instance=instance))
        try:
            assert [b.handle for b in await second.list_managed()] == [backend.handle]
            async with httpx.AsyncClient() as client:
                answer = await client.post(f"{backend.url}/completion", json={"prompt": "x", "n_predict": 2})
                assert answer.status_code == 200
            async with asyncio.timeout(30):
                while "print_timing" not in second_log.read_text():  # its new output is followed
                    await asyncio.sleep(0.1)
            after = second_log.read_text()
            assert after.startswith(before)
            assert "listening on" not in after[len(before) :], "the log already kept was written again"
        finally:
            await second.stop(backend, 2)
            await second.close()
    finally:
        await first.close()
    assert ours(engine, tmp_path) == []


async def test_docker_labels_kept_after_creation_are_read_back_on_adoption(
    tmp_path: Path, engine: docker.DockerClient, llama_server_image: str, models_dir: Path
) -> None:
    """Docker's labels are fixed at creation: what is kept later (the keep_alive in force) is in a file of the
    container's id in the data dir, read back by the next controller and removed with the container."""
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    instance = instance_id(config.data_dir)
    first = DockerRuntime(runtime_setup(config, LogBook(), instance=instance))
    labels = {"ctx_size": "512"}
    backend = await first.start(LaunchSpec("a:latest", models_dir / "a.gguf", ("--ctx-size", "512"), labels=labels))
    await first.keep_labels(backend, {"keep_alive": "inf"})
    await first.close()
    second = DockerRuntime(runtime_setup(config, LogBook(), instance=instance))
    try:
        [adopted] = await second.list_managed()
        assert adopted.handle == backend.handle and adopted.labels == {"ctx_size": "512", "keep_alive": "inf"}
    finally:
        await second.stop(backend, 2)
        await second.close()
    assert ours(engine, tmp_path) == []
    assert list((config.data_dir / "containers").iterdir()) == []


async def test_docker_a_container_that_cannot_start_fails_each_start_alike(
    tmp_path: Path, engine: docker.DockerClient, llama_server_image: str, models_dir: Path
) -> None:
    """The engine refuses to start the container (a GPU it has no runtime for): every start says so and leaves
    nothing, the second as the first (its exit watch, set before the start, is dropped with it)."""
    if "nvidia" in (engine.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime")
    config = validate_config(docker_config(tmp_path, {"a": {"path": str(models_dir / "a.gguf")}}))
    runtime = DockerRuntime(runtime_setup(config, LogBook()))
    try:
        for _ in range(2):
            with pytest.raises(BackendStartFailed, match="NVIDIA Container Toolkit"):
                await runtime.start(LaunchSpec("a:latest", models_dir / "a.gguf", gpus="all"))
        assert list(runtime._exits.waiting()) == [] and runtime._drained == {}
    finally:
        await runtime.close()
    assert ours(engine, tmp_path) == []
