"""Docker runtime: each backend is a llama-server container, created through the Docker Engine API (docker SDK).

Why it looks like this:
- Every SDK call blocks, so each runs in a thread (``_call``); errors are mapped there and nowhere else.
- Crashes come from the engine's event stream (``die``, ``oom``), read by one thread with its own client and no
  read timeout (the SDK's default of 60 s would end a quiet stream silently). When the stream breaks — the engine
  restarted — the thread reconnects with backoff and inspects every watched container, so an exit during the
  outage is not missed.
- Each container's output is followed by a thread with its own client, into the per-model ring buffer and the
  same per-model log file the process runtime writes, so logs outlive the container.
- Labels ``io.llamacontroller.managed|model|spec|instance`` (+ how the container is realised, + the requirements)
  make adoption possible and keep two controllers on one engine apart (instance = this data dir's identity).
- Networking: when the controller itself runs in a container of this engine, backends join its user-defined
  network and are reached by name; otherwise they publish on 127.0.0.1 with a port the engine chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import DeviceRequest, Mount, Ulimit

from common.background import Background
from common.errors import BackendStartFailed, LlamaControllerError
from controller.config import Config
from controller.runtime.base import Backend, ExitInfo, LaunchSpec, epoch_seconds, write_json_atomically
from controller.runtime.containers import (
    INSTANCE,
    MANAGED,
    MODEL,
    PORT,
    REALISED,
    REQUIREMENTS,
    SPEC,
    ContainerPlan,
    device_request_kwargs,
    exit_reason,
    map_docker_errors,
    plan,
    realisation_hash,
    settings_for,
)
from controller.runtime.exits import describe_exit
from controller.runtime.logs import START_MARKER, LogBook, LogFile, last_written, read_log

log = logging.getLogger(__name__)

T = TypeVar("T")
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)
CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}")
BUILTIN_NETWORKS = frozenset({"bridge", "host", "none"})


class DockerRuntime:
    name = "docker"

    def __init__(self, config: Config, logbook: LogBook, instance: str) -> None:
        self._config = config
        self._settings = config.runtime.docker
        self._logbook = logbook
        self._instance = instance
        self._log_dir = config.data_dir / "logs"
        self._log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Labels kept after creation (keep_labels), one file per container: Docker's own are fixed at creation.
        self._kept_dir = config.data_dir / "containers"
        self._kept_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._client: docker.DockerClient | None = None
        self._engine_has_nvidia: bool | None = None
        self._network: str | None = None
        self._network_decided = False
        self._exits: dict[str, asyncio.Future[ExitInfo]] = {}  # container id → its exit (answered or not)
        self._latest: dict[str, str] = {}  # model → the id of its last watched container
        self._memory: dict[str, int | None] = {}
        self._oom: set[str] = set()
        self._followers: dict[str, threading.Thread] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: threading.Thread | None = None
        self._closing = threading.Event()
        self._event_stream: Any = None
        self._background = Background()
        self._resync: Callable[[], None] = lambda: None  # the lifecycle compares again (on_resync)

    # ------------------------------------------------------------------ the engine

    def _new_client(self, timeout: int | None = 60) -> docker.DockerClient:
        base_url = self._settings.base_url
        if base_url:
            return docker.DockerClient(base_url=base_url, version="auto", timeout=timeout)  # type: ignore[arg-type]
        return docker.from_env(version="auto", timeout=timeout)  # type: ignore[arg-type]

    def _engine(self) -> docker.DockerClient:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    async def _call(self, action: str, work: Callable[[], T]) -> T:
        def run() -> T:
            with map_docker_errors(action):
                return work()

        return await asyncio.to_thread(run)

    def _has_nvidia(self) -> bool:
        if self._engine_has_nvidia is None:
            runtimes = self._engine().info().get("Runtimes") or {}
            self._engine_has_nvidia = "nvidia" in runtimes
        return self._engine_has_nvidia

    def _backend_network(self) -> str | None:
        """The network backends join (the controller runs in a container), else None (publish a port)."""
        if not self._network_decided:
            wanted = self._settings.in_container
            if wanted is not False:
                self._network = self._settings.network or self._own_network(required=wanted is True)
            self._network_decided = True
        return self._network

    def _own_network(self, required: bool) -> str | None:
        try:
            me = self._engine().containers.get(socket.gethostname())
        except docker.errors.NotFound:
            if required:
                raise BackendStartFailed(
                    "runtime.docker.in_container is true but this host name is no container of the engine: "
                    "set runtime.docker.network"
                ) from None
            return None
        networks = [n for n in me.attrs["NetworkSettings"]["Networks"] if n not in BUILTIN_NETWORKS]
        if not networks:
            raise BackendStartFailed(
                "the controller runs in a container on no user-defined network: backends cannot reach it by "
                "name; put it on one (compose does) or set runtime.docker.network"
            )
        return str(sorted(networks)[0])

    # ------------------------------------------------------------------ start and stop

    async def start(self, spec: LaunchSpec) -> Backend:
        self._ensure_watching()
        container_plan = plan(spec, settings_for(self._config, spec.model), self._instance, self._settings.path_map)
        action = f"starting a container for {spec.model}"
        created = await self._call(action, lambda: self._create(container_plan))
        container_id = created.id or ""
        # Watched before it starts: a container that dies at once (a bad flag, a file it cannot read) sends its
        # ``die`` event while the start call is still returning, and an exit nobody waits for yet is dropped —
        # the load would then wait out the whole startup timeout.
        self._watch(container_id, container_plan.memory, spec.model)
        try:
            container = await self._call(action, lambda: self._start_created(created))
        except BaseException:
            self._unwatch(container_id)
            raise
        self._logbook.append(spec.model, f"{START_MARKER} container {container.name} ({container_id[:12]})")
        self._follow(container, spec.model)
        state = container.attrs["State"]
        if not state.get("Running"):  # gone before its port could be read: no backend to return
            code, oom = state.get("ExitCode"), bool(state.get("OOMKilled"))
            reason = exit_reason(code, oom, container_plan.memory) or describe_exit(code)
            self._exited(container_id, code, oom)
            raise BackendStartFailed(
                f"the container for {spec.model} exited as soon as it started: {reason} (its log says why)"
            )
        backend = self._backend(container, adopted=False)
        log.info("started container %s for %s at %s", container.name, spec.model, backend.url)
        return backend

    def _create(self, container_plan: ContainerPlan) -> Container:
        client = self._engine()
        self._ensure_image(container_plan.image)
        network = self._backend_network()
        requests = [
            DeviceRequest(**kwargs) for kwargs in device_request_kwargs(container_plan.gpus, self._has_nvidia())
        ]
        options: dict[str, Any] = {
            "name": container_plan.name,
            "command": container_plan.command,
            "labels": container_plan.labels,
            "environment": container_plan.environment,
            "mounts": [Mount(target, source, type="bind", read_only=True) for source, target in container_plan.mounts],
            "device_requests": requests or None,
            "init": True,
            "detach": True,
            "shm_size": container_plan.shm_size,
            "mem_limit": container_plan.memory,
            "ulimits": [Ulimit(name=n, soft=v, hard=v) for n, v in container_plan.ulimits.items()] or None,
        }
        if network is None:
            options["ports"] = {f"{PORT}/tcp": ("127.0.0.1", None)}
        else:
            options["network"] = network
        self._remove_stale(container_plan.name)
        return client.containers.create(container_plan.image, **options)

    @staticmethod
    def _start_created(container: Container) -> Container:
        try:
            container.start()
            container.reload()
        except BaseException:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)  # created but not running: leave nothing behind
            raise
        return container

    def _ensure_image(self, image: str) -> None:
        client = self._engine()
        try:
            client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        try:
            client.images.pull(image)
        except docker.errors.APIError as exc:
            raise BackendStartFailed(
                f"the image {image} is not on this Docker engine and could not be pulled ({exc.explanation}): "
                "build it here with `llamacontroller images build` (no registry needed), or pull it where a "
                "registry is reachable (docker pull)"
            ) from exc

    def _remove_stale(self, name: str) -> None:
        """A stopped container of ours with this name (an earlier crash) is removed; anyone else's is left."""
        try:
            old = self._engine().containers.get(name)
        except docker.errors.NotFound:
            return
        if old.labels.get(INSTANCE) == self._instance and old.status != "running":
            self._remove(old.id or name)

    def _backend(self, container: Container, adopted: bool) -> Backend:
        labels = container.labels
        network = self._backend_network()
        if network is None:
            bindings = container.attrs["NetworkSettings"]["Ports"].get(f"{PORT}/tcp") or []
            if not bindings:
                raise BackendStartFailed(f"container {container.name} published no port for llama-server")
            url = f"http://127.0.0.1:{bindings[0]['HostPort']}"
        else:
            url = f"http://{container.name}:{PORT}"
        started = container.attrs["State"].get("StartedAt", "")
        return Backend(
            model=labels.get(MODEL, ""),
            url=url,
            handle=container.id or "",
            spec_hash=labels.get(SPEC, ""),
            started_at=epoch_seconds(started),
            adopted=adopted,
            labels=json.loads(labels.get(REQUIREMENTS, "{}")),
        )

    async def stop(self, backend: Backend, timeout: float) -> None:
        def stop_and_remove() -> None:
            try:
                container = self._engine().containers.get(backend.handle)
                container.stop(timeout=max(1, round(timeout)))  # SIGTERM, then SIGKILL
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: it is being removed already (it died meanwhile)
                    raise
            self._remove(backend.handle)

        await self._call(f"stopping container {backend.handle[:12]}", stop_and_remove)

    async def wait_exit(self, backend: Backend) -> ExitInfo:
        future = self._exits.get(backend.handle)
        if future is None:
            future = self._watch(backend.handle, None, backend.model)
        return await asyncio.shield(future)

    async def list_managed(self) -> list[Backend]:
        self._ensure_watching()
        return await self._call("listing the containers of a previous run", self._leftovers)

    def _leftovers(self) -> list[Backend]:
        found = []
        filters: dict[str, str | list[str] | bool] = {"label": [f"{MANAGED}=true", f"{INSTANCE}={self._instance}"]}
        for container in self._engine().containers.list(all=True, filters=filters):
            model = container.labels.get(MODEL, "")
            expected = realisation_hash(settings_for(self._config, model))
            if container.status != "running" or container.labels.get(REALISED) != expected:
                why = "it is not running" if container.status != "running" else "its image or resources changed"
                log.info("removing container %s left by a previous run: %s", container.name, why)
                self._remove(container.id or container.name or "")
                continue
            backend = self._backend(container, adopted=True)
            backend = replace(backend, labels={**backend.labels, **self._read_kept(backend.handle)})
            self._loop_call(self._watch, backend.handle, settings_for(self._config, model).memory, model)
            self._follow(container, model, since=last_written(self._log_dir / f"{model}.log"))
            found.append(backend)
        running = {backend.handle for backend in found}
        for path in self._kept_dir.glob("*.json"):  # of containers gone while no controller ran
            if path.stem not in running:
                path.unlink(missing_ok=True)
        return found

    def on_resync(self, callback: Callable[[], None]) -> None:
        self._resync = callback

    async def keep_labels(self, backend: Backend, labels: Mapping[str, str]) -> None:
        """Into a file of the container's id in the data dir (which compose keeps in a volume), read back with
        its labels on adoption and removed with the container. Where the data dir is not kept, an adopted
        container has the labels it was created with."""
        path = self._kept_path(backend.handle)
        if path is None:
            return

        def write() -> None:
            write_json_atomically(path, {**self._read_kept(backend.handle), **labels}, sort_keys=True)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            raise LlamaControllerError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def _kept_path(self, container_id: str) -> Path | None:
        return self._kept_dir / f"{container_id}.json" if CONTAINER_ID.fullmatch(container_id) else None

    def _read_kept(self, container_id: str) -> dict[str, str]:
        path = self._kept_path(container_id)
        try:
            kept = json.loads(path.read_text()) if path is not None else {}
        except (OSError, ValueError):
            return {}
        return {str(key): str(value) for key, value in kept.items()} if isinstance(kept, dict) else {}

    def logs(self, model: str) -> AsyncIterator[bytes]:
        return read_log(self._log_dir / f"{model}.log")

    async def close(self) -> None:
        await self._background.drain()
        self._closing.set()
        stream = self._event_stream
        if stream is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(stream.close)
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    # ------------------------------------------------------------------ exits (the events stream)

    def _loop_call(self, function: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(function, *args)

    def _watch(self, container_id: str, memory: int | None, model: str) -> asyncio.Future[ExitInfo]:
        future = self._exits.get(container_id)
        if future is None:
            future = self._exits[container_id] = asyncio.get_running_loop().create_future()
            self._memory[container_id] = memory
            # An answered exit stays until the model's next container is watched (``wait_exit`` may come after
            # the exit): one per model, never one per crash.
            previous = self._latest.get(model, container_id)
            answered = self._exits.get(previous) if previous != container_id else None
            if answered is not None and answered.done():
                self._unwatch(previous)
            self._latest[model] = container_id
        return future

    def _unwatch(self, container_id: str) -> None:
        self._exits.pop(container_id, None)
        self._memory.pop(container_id, None)
        self._oom.discard(container_id)

    def _exited(self, container_id: str, code: int | None, oom: bool) -> None:
        future = self._exits.get(container_id)
        if future is not None and not future.done():
            memory = self._memory.get(container_id)
            reason = exit_reason(code, oom or container_id in self._oom, memory) or describe_exit(code)
            future.set_result(ExitInfo(code, reason))
        self._oom.discard(container_id)
        # A dead container is of no more use (its output is in the log file): nothing is left behind.
        self._background.spawn(self._call("removing an exited container", lambda: self._remove(container_id)), "rm")

    def _remove(self, container_id: str, deadline: float = 10.0) -> None:
        """Remove a container and return once it is gone (a removal already in progress is waited for)."""
        give_up = time.monotonic() + deadline
        while True:
            try:
                self._engine().containers.get(container_id).remove(force=True)
            except docker.errors.NotFound:
                if (kept := self._kept_path(container_id)) is not None:
                    kept.unlink(missing_ok=True)
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409 or time.monotonic() > give_up:  # 409: being removed already
                    raise
            time.sleep(0.05)

    def _ensure_watching(self) -> None:
        if self._events is None:
            self._loop = asyncio.get_running_loop()
            self._events = threading.Thread(target=self._read_events, name="docker-events", daemon=True)
            self._events.start()

    def _read_events(self) -> None:
        filters = {"type": "container", "label": [f"{MANAGED}=true", f"{INSTANCE}={self._instance}"]}
        attempt = 0
        since = int(time.time())
        while not self._closing.is_set():
            try:
                client = self._new_client(timeout=None)  # no read timeout: a quiet stream is no EOF
                self._event_stream = client.events(decode=True, filters=filters, since=since)
                self._recheck_watched(client)
                attempt = 0
                for event in self._event_stream:
                    since = int(event.get("time", since))
                    self._on_event(event)
            except Exception as exc:  # the engine went away: reconnect, never give up
                if self._closing.is_set():
                    return
                delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
                log.warning("docker events stream lost (%s); reconnecting in %.1fs", exc.__class__.__name__, delay)
                attempt += 1
                time.sleep(delay)

    def _on_event(self, event: dict[str, Any]) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        container_id = str(event.get("id", ""))
        if action == "oom":
            self._loop_call(self._oom.add, container_id)
        elif action == "die":
            attributes = event.get("Actor", {}).get("Attributes", {})
            code = int(attributes["exitCode"]) if str(attributes.get("exitCode", "")).isdigit() else None
            self._loop_call(self._exited, container_id, code, False)

    def _recheck_watched(self, client: docker.DockerClient) -> None:
        """After a (re)connect: containers that exited while nobody listened are reported now."""
        for container_id, future in list(self._exits.items()):
            if future.done():  # answered already
                continue
            try:
                state = client.containers.get(container_id).attrs["State"]
            except docker.errors.NotFound:
                self._loop_call(self._exited, container_id, None, False)
                continue
            if not state.get("Running"):
                self._loop_call(self._exited, container_id, state.get("ExitCode"), bool(state.get("OOMKilled")))

    # ------------------------------------------------------------------ logs

    def _follow(self, container: Container, model: str, since: float | None = None) -> None:
        """Its output from ``since`` (seconds since the epoch; None = all of it) into the model's ring buffer and
        log file. An adopted container's output up to the log file's last write is in the file already: following
        it all again would write it twice."""
        container_id = container.id or ""
        log_file = LogFile(self._log_dir / f"{model}.log")
        options: dict[str, Any] = {"stream": True, "follow": True}
        if since is not None:
            options["since"] = since

        def read() -> None:
            client = self._new_client(timeout=None)
            partial = b""
            try:
                for data in client.containers.get(container_id).logs(**options):
                    lines = (partial + data).split(b"\n")
                    partial = lines.pop()
                    for raw in lines:
                        line = raw.decode("utf-8", "replace").rstrip("\r")
                        log_file.write(line)
                        self._loop_call(self._logbook.append, model, line)
            except Exception as exc:  # the container is gone; its last lines are already in
                log.debug("log follower of %s ended: %s", container_id[:12], exc.__class__.__name__)
            finally:
                client.close()

        thread = threading.Thread(target=read, name=f"docker-logs:{model}", daemon=True)
        self._followers[container_id] = thread
        thread.start()
