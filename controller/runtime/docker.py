"""Docker runtime: each backend is a llama-server container, created through the Docker Engine API (docker SDK).

Why it looks like this:
- Every SDK call blocks, so each runs in a thread (``_call``); errors are mapped there and nowhere else.
- Crashes come from the engine's event stream (``die``, ``oom``), read by one thread with its own client and no
  read timeout (the SDK's default of 60 s would end a quiet stream silently). When the stream breaks — the engine
  restarted — the thread reconnects with backoff, inspects every followed container, so an exit during the
  outage is not missed, and tells the lifecycle to compare again (``on_resync``). The end of a container's log
  stream is looked at too: an exit whose event never came is still seen.
- Each container's output is followed by a thread with its own client, into the per-model ring buffer and the
  same per-model log file the process runtime writes, so logs outlive the container. An exit is answered once
  that follower has drained the container's last lines (``watching.ExitBook``, bounded by ``DRAIN_BOUND``), and
  the dead container is removed only then: the error a caller sees quotes llama-server's own reason.
- ``stop`` returns only once the container is removed and raises ``BackendStopFailed`` while it may still exist;
  the lifecycle tries again. No helper leaves a running container of this instance behind: a container of the
  model's name still there when a new one is created is removed first (the lifecycle starts a model only once
  its previous backend is confirmed gone), instead of the create failing with 409 Conflict.
- ``list_managed`` runs at any time (each reconcile pass), in a thread, concurrently with starts and stops: what
  this runtime is starting, stopping or follows is reported as it is and never removed by the listing; only
  leftovers nobody follows are adopted or removed. One lock (``_guard``) keeps those books for both sides.
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
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from common.background import Background
from common.errors import BackendStartFailed, BackendStopFailed, LlamaControllerError
from controller.runtime.base import Backend, ExitInfo, LaunchSpec, RuntimeSetup, epoch_seconds, write_json_atomically
from controller.runtime.containers import (
    INSTANCE,
    MANAGED,
    MODEL,
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
from controller.runtime.contract import PORT
from controller.runtime.exits import describe_exit
from controller.runtime.logs import START_MARKER, LineSplitter, LogFile, last_written, log_hint, read_log
from controller.runtime.watching import DRAIN_BOUND, Backoff, ExitBook

log = logging.getLogger(__name__)

T = TypeVar("T")
CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}")
BUILTIN_NETWORKS = frozenset({"bridge", "host", "none"})
# Processes and threads in one backend container: llama-server runs a thread per core and per HTTP slot.
PIDS_LIMIT = 4096
COMPOSE_PROJECT = "com.docker.compose.project"  # the labels compose puts on its services' containers
COMPOSE_SERVICE = "com.docker.compose.service"
GATEWAY_SERVICE = "gateway"  # compose.yaml's gateway service: it depends on the controller


class DockerRuntime:
    name = "docker"

    def __init__(self, setup: RuntimeSetup) -> None:
        self._settings = setup.settings.docker
        self._placement = setup.placement  # how the config places a model now: leftovers are judged by it
        self._logbook = setup.logbook
        self._instance = setup.instance
        self._log_dir = setup.folder("logs")
        # Labels kept after creation (keep_labels), one file per container: Docker's own are fixed at creation.
        self._kept_dir = setup.folder("containers")
        self._client: docker.DockerClient | None = None
        self._engine_has_nvidia: bool | None = None
        self._network: str | None = None
        self._network_decided = False
        self._exits = ExitBook()  # container id → its exit, answered once its last log lines are in
        self._memory: dict[str, int | None] = {}
        self._oom: set[str] = set()
        self._drained: dict[str, asyncio.Future[None]] = {}  # container id → done once its log follower ended
        self._exiting: set[str] = set()  # exits being answered and their containers removed
        # What this runtime holds, shared with the listing and events threads: a listing never removes it.
        self._guard = threading.Lock()
        self._starting: set[str] = set()  # names of containers being created and started
        self._followed: dict[str, bool] = {}  # container id → adopted (False: started here), until gone
        self._stopping: set[str] = set()  # ids of containers being stopped
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

    @contextlib.contextmanager
    def _holding(self, books: set[str], key: str) -> Iterator[None]:
        with self._guard:
            books.add(key)
        try:
            yield
        finally:
            with self._guard:
                books.discard(key)

    def _track(self, container_id: str, adopted: bool) -> None:
        with self._guard:
            self._followed[container_id] = adopted

    def _untrack(self, container_id: str) -> None:
        with self._guard:
            self._followed.pop(container_id, None)

    async def start(self, spec: LaunchSpec) -> Backend:
        self._ensure_watching()
        settings = settings_for(self._settings, spec.placement)
        container_plan = plan(spec, settings, self._instance, self._settings.path_map)
        with self._holding(self._starting, container_plan.name):  # no listing removes it half-started
            return await self._start(spec, container_plan)

    async def _start(self, spec: LaunchSpec, container_plan: ContainerPlan) -> Backend:
        action = f"starting a container for {spec.model}"
        created = await self._call(action, lambda: self._create(container_plan))
        container_id = created.id or ""
        # Watched before it starts: a container that dies at once (a bad flag, a file it cannot read) sends its
        # ``die`` event while the start call is still returning, and an exit nobody waits for yet is dropped —
        # the load would then wait out the whole startup timeout.
        self._watch(container_id, container_plan.memory, spec.model)
        self._track(container_id, adopted=False)
        # Its exit waits for its output from here on (the follower starts once it runs): an early ``die`` must not
        # answer, and remove the container, before its last lines are read.
        self._drained[container_id] = asyncio.get_running_loop().create_future()
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
            await self._drain(container_id)  # its last lines say why: the error quotes them
            hint = log_hint(self._logbook.tail(spec.model, 200)) or " (its log says why)"
            raise BackendStartFailed(f"the container for {spec.model} exited as soon as it started: {reason}{hint}")
        try:
            backend = self._backend(container, adopted=False)
        except LlamaControllerError:
            with contextlib.suppress(LlamaControllerError):  # else a stray: a later listing reports it, unbooked
                await self._call(action, lambda: self._remove(container_id))
            raise
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
            # As the kubernetes runtime's pods: not root, no capabilities, nothing to gain by setuid, a root file
            # system it cannot change (/tmp in memory), and a bound on processes and threads.
            "user": container_plan.user,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "read_only": True,
            "tmpfs": {"/tmp": "rw,noexec,nosuid,size=64m"},  # noqa: S108 - the container's own
            "pids_limit": PIDS_LIMIT,
            # The follower reads the engine's log (json-file can be read back, and a since= follow works on it);
            # rotated, because llama-server's output is kept by the controller's log book anyway.
            "log_config": LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"}),
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
        """A container of ours with this name is the model's earlier one, which nobody holds any more (the lifecycle
        starts a model only once its previous backend is confirmed gone, and a leftover for a model that starts is
        never adopted): it is removed, running or not, or the create would fail with 409 Conflict. Anyone else's is
        left, and the create says whose it is."""
        try:
            old = self._engine().containers.get(name)
        except docker.errors.NotFound:
            return
        if old.labels.get(INSTANCE) != self._instance:
            return
        if old.status == "running":
            log.warning("removing container %s: it still runs, but no model of this controller holds it", name)
        self._remove(old.id or "")
        self._untrack(old.id or "")

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
        """Stop (SIGTERM, then SIGKILL after ``timeout``) and remove; return only once the engine says the container
        is gone. Whatever else happens (an engine timeout, an API error, a removal in progress that does not end)
        raises BackendStopFailed: the container may still run, and the lifecycle tries again."""
        handle = backend.handle
        action = f"stopping container {handle[:12]}"
        with self._holding(self._stopping, handle):  # no listing removes or adopts it meanwhile
            try:
                await self._call(action, lambda: self._stop_and_remove(handle, timeout))
            except LlamaControllerError as exc:
                raise BackendStopFailed(f"{exc.message}; the container may still run") from exc
        self._untrack(handle)
        self._exited_if_watched(handle, None, False)  # for a wait_exit whose event has not come

    def _stop_and_remove(self, handle: str, timeout: float) -> None:
        try:
            container = self._engine().containers.get(handle)
        except docker.errors.NotFound:
            self._drop_kept(handle)
            return
        try:
            container.stop(timeout=max(1, round(timeout)))  # SIGTERM, then SIGKILL
        except docker.errors.NotFound:
            pass  # removed meanwhile (its exit was handled): confirmed below
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: it is being removed already (it died meanwhile): waited for below
                raise
        self._remove(handle)

    async def wait_exit(self, backend: Backend) -> ExitInfo:
        future = self._exits.get(backend.handle)
        if future is None:  # nothing follows it: looked at once, then its events tell
            self._ensure_watching()
            future = self._watch(backend.handle, None, backend.model)
            handle = backend.handle
            self._background.spawn(asyncio.to_thread(lambda: self._check_exited(self._engine(), handle)), "exit-check")
        return await asyncio.shield(future)

    async def list_managed(self) -> list[Backend]:
        """What runs for this instance. Containers this runtime starts, stops or follows are reported as they are
        (those it started with ``adopted`` False) and never removed here; leftovers of a previous run are adopted
        (followed and watched from now on) or, when not running or realised otherwise, removed."""
        self._ensure_watching()
        listed = await self._call("listing the containers of this instance", self._list)
        for backend, container in listed:
            if container is not None:  # adopted by this listing: followed from the end of its log file
                model = backend.model
                self._watch(backend.handle, settings_for(self._settings, self._placement(model)).memory, model)
                self._follow(container, model, since=last_written(self._log_dir / f"{model}.log"))
        return [backend for backend, _ in listed]

    def _list(self) -> list[tuple[Backend, Container | None]]:
        """(backend, the container when this listing adopts it) for every running container of this instance."""
        found: list[tuple[Backend, Container | None]] = []
        filters: dict[str, str | list[str] | bool] = {"label": [f"{MANAGED}=true", f"{INSTANCE}={self._instance}"]}
        listed = self._engine().containers.list(all=True, filters=filters)
        for container in listed:
            container_id = container.id or ""
            running = container.status == "running"
            expected = realisation_hash(settings_for(self._settings, self._placement(container.labels.get(MODEL, ""))))
            usable = running and container.labels.get(REALISED) == expected
            with self._guard:  # decided and claimed at once: a start, stop or other listing sees the claim
                held = (
                    container_id in self._followed or container_id in self._stopping or container.name in self._starting
                )
                adopted = self._followed.get(container_id, container.name not in self._starting)
                if not held and usable:
                    self._followed[container_id] = adopted = True
            if held:  # its start, stop or exit is handled where it happens: reported while it runs, never removed
                if running:
                    found.append((self._labelled(self._backend(container, adopted)), None))
            elif usable:
                found.append((self._labelled(self._backend(container, adopted=True)), container))
            else:
                why = "it is not running" if not running else "its image or resources changed"
                log.info("removing container %s left by a previous run: %s", container.name, why)
                try:
                    self._remove(container_id)
                except docker.errors.DockerException as exc:  # the next pass meets it again
                    log.warning("could not remove container %s (%s)", container.name, exc.__class__.__name__)
        with self._guard:
            known = {container.id for container in listed} | set(self._followed)
        for path in self._kept_dir.glob("*.json"):  # of containers gone while no controller ran
            if path.stem not in known:
                path.unlink(missing_ok=True)
        return found

    def _labelled(self, backend: Backend) -> Backend:
        return replace(backend, labels={**backend.labels, **self._read_kept(backend.handle)})

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

    async def torn_down(self) -> bool:
        """In compose, the gateway service depends on the controller, so ``docker compose down`` (or ``stop``)
        stops the gateways first: a controller stopping while none of its project's gateways runs is a teardown;
        while they run (``docker compose restart controller``, an upgrade of the controller alone), a restart.
        Outside compose (``serve`` with the docker runtime, stopped by its operator), a teardown."""

        def decide() -> bool:
            engine = self._engine()
            try:
                me = engine.containers.get(socket.gethostname())  # a container's host name is its id
            except docker.errors.NotFound:
                return True
            project = (me.labels or {}).get(COMPOSE_PROJECT)
            if project is None:
                return True
            wanted = [f"{COMPOSE_PROJECT}={project}", f"{COMPOSE_SERVICE}={GATEWAY_SERVICE}"]
            return not engine.containers.list(filters={"label": wanted, "status": "running"})

        return await self._call("telling a restart from a teardown", decide)

    async def close(self) -> None:
        await self._exits.close()  # exits still draining are answered now: shutdown waits for no log line
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
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            loop.call_soon_threadsafe(function, *args)

    def _watch(self, container_id: str, memory: int | None, model: str) -> asyncio.Future[ExitInfo]:
        if container_id not in self._exits:
            self._memory[container_id] = memory
        future = self._exits.watch(container_id, model)
        for known in [known for known in self._memory if known not in self._exits]:  # one per model, not per crash
            del self._memory[known]
        return future

    def _unwatch(self, container_id: str) -> None:
        self._exits.forget(container_id)
        self._memory.pop(container_id, None)
        self._oom.discard(container_id)
        self._drained.pop(container_id, None)
        self._untrack(container_id)

    def _exited(self, container_id: str, code: int | None, oom: bool) -> None:
        """It exited: answered once its last log lines are in, then removed (its output is in the log file)."""
        if container_id in self._exiting:
            return
        self._exiting.add(container_id)
        reason = exit_reason(code, oom or container_id in self._oom, self._memory.get(container_id))
        self._oom.discard(container_id)
        self._exits.answer_when_drained(
            container_id, ExitInfo(code, reason or describe_exit(code)), self._drained.get(container_id)
        )
        self._background.spawn(self._release(container_id), f"rm:{container_id[:12]}")

    async def _drain(self, container_id: str) -> None:
        """Until the exit of ``container_id`` is answered (so its last log lines are in), bounded."""
        future = self._exits.get(container_id)
        if future is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_BOUND + 1.0):
                    await asyncio.shield(future)

    async def _release(self, container_id: str) -> None:
        try:
            await self._drain(container_id)
            self._untrack(container_id)
            self._drained.pop(container_id, None)
            try:
                await self._call("removing an exited container", lambda: self._remove(container_id))
            except LlamaControllerError as exc:  # a dead container: the next listing removes it
                log.warning("could not remove exited container %s: %s", container_id[:12], exc.message)
        finally:
            self._exiting.discard(container_id)

    def _remove(self, container_id: str, deadline: float = 10.0) -> None:
        """Remove a container and return once it is gone (a removal already in progress is waited for)."""
        give_up = time.monotonic() + deadline
        while True:
            try:
                self._engine().containers.get(container_id).remove(force=True)
            except docker.errors.NotFound:
                self._drop_kept(container_id)
                return
            except docker.errors.APIError as exc:
                if exc.status_code != 409 or time.monotonic() > give_up:  # 409: being removed already
                    raise
            time.sleep(0.05)

    def _drop_kept(self, container_id: str) -> None:
        if (kept := self._kept_path(container_id)) is not None:
            kept.unlink(missing_ok=True)

    def _ensure_watching(self) -> None:
        if self._events is None:
            self._loop = asyncio.get_running_loop()
            self._events = threading.Thread(target=self._read_events, name="docker-events", daemon=True)
            self._events.start()

    def _read_events(self) -> None:
        filters = {"type": "container", "label": [f"{MANAGED}=true", f"{INSTANCE}={self._instance}"]}
        backoff = Backoff()
        since = int(time.time())
        connected = False
        while not self._closing.is_set():
            client: docker.DockerClient | None = None
            try:
                client = self._new_client(timeout=None)  # no read timeout: a quiet stream is no EOF
                self._event_stream = client.events(decode=True, filters=filters, since=since)
                self._recheck_followed(client)
                if connected:  # an event may have been missed meanwhile: the lifecycle compares again
                    log.info("docker events stream is back")
                    self._loop_call(self._resynced)
                connected = True
                backoff.reset()
                for event in self._event_stream:
                    since = int(event.get("time", since))
                    self._on_event(event)
                raise ConnectionError("the events stream ended")
            except Exception as exc:  # the engine went away: reconnect, never give up
                if self._closing.is_set():
                    return
                delay = backoff.next_delay()
                log.warning("docker events stream lost (%s); reconnecting in %.1fs", exc.__class__.__name__, delay)
                self._closing.wait(delay)
            finally:
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()

    def _resynced(self) -> None:
        self._resync()

    def _on_event(self, event: dict[str, Any]) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        container_id = str(event.get("id", ""))
        if action == "oom":
            self._loop_call(self._oom.add, container_id)
        elif action == "die":
            attributes = event.get("Actor", {}).get("Attributes", {})
            code = int(attributes["exitCode"]) if str(attributes.get("exitCode", "")).isdigit() else None
            self._loop_call(self._exited, container_id, code, False)

    def _recheck_followed(self, client: docker.DockerClient) -> None:
        """After a (re)connect: containers that exited while nobody listened are reported now."""
        with self._guard:
            followed = list(self._followed)
        for container_id in followed:
            self._check_exited(client, container_id)

    def _check_exited(self, client: docker.DockerClient, container_id: str) -> None:
        """Report ``container_id``'s exit if it has exited (or is gone); one never started yet is left alone."""
        try:
            state = client.containers.get(container_id).attrs["State"]
        except docker.errors.NotFound:
            self._loop_call(self._exited_if_watched, container_id, None, False)
            return
        if not state.get("Running") and state.get("Status") != "created":
            code, oom = state.get("ExitCode"), bool(state.get("OOMKilled"))
            self._loop_call(self._exited_if_watched, container_id, code, oom)

    def _exited_if_watched(self, container_id: str, code: int | None, oom: bool) -> None:
        future = self._exits.get(container_id)
        if future is not None and not future.done():
            self._exited(container_id, code, oom)

    # ------------------------------------------------------------------ logs

    def _follow(self, container: Container, model: str, since: float | None = None) -> None:
        """Its output from ``since`` (seconds since the epoch; None = all of it) into the model's ring buffer and
        log file. An adopted container's output up to the log file's last write is in the file already: following
        it all again would write it twice. When the output ends, the container has stopped (or the engine went
        away): its exit is looked at, in case its event never comes."""
        container_id = container.id or ""
        log_file = LogFile(self._log_dir / f"{model}.log")
        options: dict[str, Any] = {"stream": True, "follow": True}
        if since is not None:
            options["since"] = since
        drained = self._drained.get(container_id)
        if drained is None or drained.done():
            drained = self._drained[container_id] = asyncio.get_running_loop().create_future()

        def line(text: str) -> None:
            log_file.write(text)
            self._loop_call(self._logbook.append, model, text)

        def read() -> None:
            client = self._new_client(timeout=None)
            lines = LineSplitter()
            ended = False
            try:
                for data in client.containers.get(container_id).logs(**options):
                    for text in lines.feed(data):
                        line(text)
                ended = True
            except docker.errors.NotFound:  # gone before it could be followed
                ended = True
            except Exception as exc:  # the engine went away
                log.debug("log follower of %s ended: %s", container_id[:12], exc.__class__.__name__)
            finally:
                with contextlib.suppress(Exception):
                    for text in lines.rest():
                        line(text)
                self._loop_call(self._follower_ended, drained)
                if ended:
                    with contextlib.suppress(Exception):
                        self._check_exited(client, container_id)
                client.close()

        threading.Thread(target=read, name=f"docker-logs:{model}", daemon=True).start()

    @staticmethod
    def _follower_ended(drained: asyncio.Future[None]) -> None:
        if not drained.done():
            drained.set_result(None)
