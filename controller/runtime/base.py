"""The boundary between the lifecycle and whatever runs llama-server: local processes, Docker containers or
Kubernetes Deployments.

A runtime starts a backend from a ``LaunchSpec``, stops it, tells when it exits, and lists what it left
running so a restarted controller can adopt or remove it. It never decides *when*: that is the
lifecycle's job. Blocking calls (SDKs, file system scans) must run off the event loop.

A ``LaunchSpec`` says what llama-server is asked to do (model file, flags, GPUs), never how: the process
runtime turns it into an argv and environment, a container runtime into an image, a command, mounts and
device requests. So its ``spec_hash`` means the same thing in every runtime, and its ``argv`` is llama-server's
argument list in every runtime, given where that runtime lets llama-server see the files and listen. Beside it
travels the model's ``Placement`` (its own container and pod settings), so that no runtime looks a model up in
the config; every runtime is built from one ``RuntimeSetup`` (``controller.runtime.make_runtime``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from common.errors import BackendStartFailed
from controller.config_schema import ContainerSettings, ModelConfig, ModelDefaults, PodSettings, RuntimeConfig
from controller.runtime.logs import LogBook

GpuSelection = Literal["auto", "all", "none"] | tuple[int, ...]


def visible_devices(gpus: GpuSelection) -> str | None:
    """The device list a backend sees (``CUDA_VISIBLE_DEVICES`` / ``NVIDIA_VISIBLE_DEVICES``); None = all."""
    if gpus in ("auto", "all"):
        return None
    if gpus == "none":
        return ""
    return ",".join(str(gpu) for gpu in gpus)


def epoch_seconds(stamp: str) -> float:
    """An RFC 3339 UTC time as Docker and Kubernetes write it (``2026-11-26T12:50:01.123456789Z``, the fraction
    optional) in seconds since the epoch; now when it cannot be read (a backend's start is then this moment)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    try:
        moment = datetime.fromisoformat(whole).replace(tzinfo=UTC)
    except ValueError:
        return time.time()
    return moment.timestamp() + float(f"0.{fraction[:6] or 0}")


def write_json_atomically(path: Path, data: object, *, sort_keys: bool = False) -> None:
    """``data`` as JSON at ``path`` through a temporary file and a rename: a crash never leaves half a file
    (pid files, the Caddy record, kept labels)."""
    temporary = path.with_suffix(".tmp")
    try:
        temporary.write_text(json.dumps(data, sort_keys=sort_keys))
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Placement:
    """A model's own settings for how a container runtime runs it (its ``container`` and ``kubernetes`` config,
    its startup timeout), over the runtime's own. The profile puts them on the LaunchSpec, so that a runtime never
    looks a model up in the config; not part of ``spec_hash``: a container runtime hashes them, with its own
    settings, into the realisation label instead."""

    container: ContainerSettings | None = None
    pod: PodSettings | None = None
    startup_timeout: float | None = None  # None: the config's default (RuntimeSetup.defaults)

    @classmethod
    def of(cls, model: ModelConfig | None) -> Placement:
        """The placement of a model with this ``models:`` entry (None: a model found in models_dir)."""
        if model is None:
            return cls()
        return cls(model.container, model.kubernetes, model.startup_timeout)


@dataclass(frozen=True)
class LaunchSpec:
    """What one llama-server is asked to do for one model; host, port and binary are the runtime's."""

    model: str  # canonical model name: the identity used for adoption, logs and pid files
    model_file: Path
    args: tuple[str, ...] = ()  # llama-server flags besides --model/--mmproj/--host/--port; never a shell string
    mmproj: Path | None = None
    gpus: GpuSelection = "auto"
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment from the config
    fingerprint: str = ""  # file identity (size, mtime) so a replaced model file is not adopted
    labels: Mapping[str, str] = field(default_factory=dict)  # kept with the backend, read back on adoption
    # The backend's own API key (runtime/keys.py): a new one per start, so never part of spec_hash; each runtime
    # hands it to llama-server without putting it on a command line, and it never appears in a repr.
    api_key: str = field(default="", repr=False)
    placement: Placement = field(default_factory=Placement)  # container runtimes only; never part of spec_hash

    def argv(self, seen_as: Callable[[Path], str], host: str, port: int) -> list[str]:
        """llama-server's arguments (the binary not included), built here for every runtime: ``seen_as`` gives a
        file's path as llama-server sees it (in its container, its pod, or as it is), ``host`` and ``port`` where
        it listens."""
        argv = ["--model", seen_as(self.model_file)]
        if self.mmproj is not None:
            argv += ["--mmproj", seen_as(self.mmproj)]
        return [*argv, *self.args, "--host", host, "--port", str(port)]

    @property
    def spec_hash(self) -> str:
        """Stable digest of what would run: a backend with another hash is not adopted."""
        payload = json.dumps(
            [
                self.model,
                str(self.model_file),
                str(self.mmproj or ""),
                list(self.args),
                self.gpus if isinstance(self.gpus, str) else list(self.gpus),
                sorted(self.env.items()),
                self.fingerprint,
            ]
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _no_binary() -> str:
    raise BackendStartFailed("this runtime was given no llama-server binary")


def _unplaced(model: str) -> Placement:
    return Placement()


@dataclass(frozen=True)
class RuntimeSetup:
    """What every runtime is built with (``controller.runtime.make_runtime``): the ``runtime`` settings and this
    controller's identity, never the config itself. A backend is started as its LaunchSpec says; ``placement``
    is how the config places a model now, by which a leftover of an earlier controller is judged."""

    data_dir: Path  # logs/, run/ (pid files), containers/ (kept labels)
    logbook: LogBook
    settings: RuntimeConfig = field(default_factory=RuntimeConfig)
    defaults: ModelDefaults = field(default_factory=ModelDefaults)  # for a model that sets none of its own
    instance: str = ""  # labels what a container runtime starts (runtime/instance.py)
    binary: Callable[[], str] = _no_binary  # where llama-server is (the process runtime)
    placement: Callable[[str], Placement] = _unplaced

    def folder(self, name: str) -> Path:
        """``data_dir/name`` (``logs``: each model's log, one file in every runtime), private to this user."""
        path = self.data_dir / name
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path


@dataclass(frozen=True)
class Backend:
    """One running llama-server as the runtime sees it."""

    model: str
    url: str  # base URL, e.g. http://127.0.0.1:40123
    handle: str  # runtime-specific id: a pid, a container id
    spec_hash: str
    started_at: float  # wall clock, seconds since the epoch
    adopted: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    api_key: str = field(default="", repr=False)  # what the gateway and the probes send it (runtime/keys.py)


@dataclass(frozen=True)
class ExitInfo:
    code: int | None  # None when the runtime cannot know (adopted process)
    reason: str


class Runtime(Protocol):
    """What the lifecycle needs from a way of running llama-server.

    The lifecycle is level-triggered (lifecycle/reconcile.py): it compares what ``list_managed`` says runs with
    its books at start-up, on a slow timer and after every reconnect of the runtime's event stream, and retries a
    ``stop`` until the runtime confirms it. So every runtime keeps three promises: ``stop`` returns only once the
    backend and what it holds are gone, and raises otherwise; ``list_managed`` may be called at any time without
    disturbing a backend it runs or is starting; ``wait_exit`` answers only after the backend's last log lines are
    in the log book (bounded: runtime/watching.py)."""

    name: str

    async def start(self, spec: LaunchSpec) -> Backend:
        """Launch and return at once (readiness is the lifecycle's concern); raise BackendStartFailed."""

    async def stop(self, backend: Backend, timeout: float) -> None:
        """Ask politely (SIGTERM), then force (SIGKILL) after ``timeout`` seconds, and release what the backend
        holds (container, Deployment, Service, pid file). Idempotent: a backend that has exited, or was never
        there, is released the same way. Raise a LlamaControllerError when it cannot confirm the backend is
        gone: the lifecycle keeps the model in ``stopping`` and tries again."""

    async def wait_exit(self, backend: Backend) -> ExitInfo:
        """Return when the backend has exited, for whatever reason, with its last log lines read."""

    async def list_managed(self) -> list[Backend]:
        """Every backend of this instance the runtime runs now: those it started (``adopted`` False) and those
        a previous controller left (``adopted`` True), which it follows and watches from here on. Leftovers it
        cannot use (exited, realised differently) are removed; nothing it started or is starting is touched."""

    def on_resync(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) whenever the runtime's watch of its backends was lost and is
        back: an event may have been missed meanwhile, so the lifecycle compares again."""

    async def keep_labels(self, backend: Backend, labels: Mapping[str, str]) -> None:
        """Keep ``labels`` with the running ``backend``, over those it was started with, so that a controller
        that adopts it later reads them back in ``Backend.labels``; raise a LlamaControllerError on failure."""

    def logs(self, model: str) -> AsyncIterator[bytes]:
        """The whole log of ``model``'s backends (this run and earlier ones, as far as kept), for download."""

    async def torn_down(self) -> bool:
        """Asked as the controller stops (``runtime.keep_backends_on_exit: auto``): is the deployment being taken
        down, so that its backends go with it, or is only this controller restarting, so that they stay for the
        next one to adopt? (docs/deployment.md, "What survives what")"""

    async def close(self) -> None:
        """Release the runtime's own resources (not the backends)."""
