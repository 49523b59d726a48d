"""Process runtime: each backend is a ``llama-server`` child on 127.0.0.1 with a free port.

Why it looks like this:
- The child gets its own session (process group), so a Ctrl-C on the controller does not reach it
  and a stop can signal the whole group (SIGTERM, then SIGKILL after the timeout).
- stdout/stderr go straight into a log file, not a pipe: a backend must survive a controller that dies
  (a broken pipe would kill it) so that the next controller can adopt it. A tail task feeds the file
  into the per-model ring buffer.
- A pid file (JSON) records pid, start time, port, model and spec hash. The start time (from
  /proc/<pid>/stat) guards against pid reuse: a pid whose start time differs is not ours.
- An adopted process is not our child, so its exit is watched through a pidfd (falling back to polling).
- The backend's API key reaches llama-server in a file of mode 0600 in the run dir (``--api-key-file``):
  on the command line every local user would read it in ``ps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from common.background import cancel_and_wait
from common.errors import BackendStartFailed, BackendStopFailed, LlamaControllerError
from controller.runtime.base import Backend, ExitInfo, LaunchSpec, RuntimeSetup, visible_devices, write_json_atomically
from controller.runtime.exits import describe_exit
from controller.runtime.logs import ROTATE_BYTES, START_MARKER, LineSplitter, LogBook, read_log, rotated
from controller.settings import child_environment

log = logging.getLogger(__name__)

_TAIL_INTERVAL = 0.2
_POLL_INTERVAL = 0.1
KILL_CONFIRM_TIMEOUT = 10.0  # seconds a SIGKILLed backend may take to be gone before the stop counts as failed


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_ticks: int
    port: int
    model: str
    spec_hash: str
    started_at: float
    log_path: str
    url: str
    labels: dict[str, str] = field(default_factory=dict)


def spawn_detached(
    argv: list[str], log_file: BinaryIO, env: dict[str, str], die_with_parent: bool = False
) -> subprocess.Popen[bytes]:
    """Start a child in its own session with its output in ``log_file`` (not a pipe: it may outlive us).

    Popen, not the event loop's subprocess API: uvloop ignores close_fds, and the server's listening socket
    is inheritable, so a child would otherwise hold the controller's port after the controller exits.
    ``die_with_parent``: the kernel kills the child when the calling thread dies, a SIGKILL included
    (Linux; backends keep the default, so that a new controller can adopt them)."""
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
        env=env,
        # Between fork and exec the child calls only prctl and getppid: no lock that another thread may hold.
        preexec_fn=dying_with_parent(os.getpid()) if die_with_parent and sys.platform == "linux" else None,
    )


_PR_SET_PDEATHSIG = 1


def dying_with_parent(parent: int) -> Callable[[], None]:
    """What the forked child runs before exec: ask for SIGKILL when its parent dies (prctl)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl ran: no signal would ever come
            os._exit(1)

    return set_death_signal


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] == "Z":  # a zombie has exited; only its parent's wait() remains
        return None
    return int(fields[19]) if len(fields) > 19 else None


class _FileTail:
    """Feeds new lines of a log file into the LogBook, polling (cheap: one read per interval)."""

    def __init__(self, path: Path, offset: int, model: str, logbook: LogBook) -> None:
        self._path, self._offset, self._model, self._logbook = path, offset, model, logbook
        self._lines = LineSplitter()
        self._task = asyncio.create_task(self._run(), name=f"log-tail:{model}")

    def read_new(self) -> None:
        try:
            with self._path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return
        if not data:
            return
        self._offset += len(data)
        for line in self._lines.feed(data):
            self._logbook.append(self._model, line)

    async def _run(self) -> None:
        while True:
            self.read_new()
            await asyncio.sleep(_TAIL_INTERVAL)

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self.read_new()
        for line in self._lines.rest():
            self._logbook.append(self._model, line)


class ProcessRuntime:
    """Runs llama-server as local processes; see the module docstring for the why."""

    name = "process"

    def __init__(self, setup: RuntimeSetup) -> None:
        self._binary, self._logbook = setup.binary, setup.logbook
        self._run_dir = setup.folder("run")
        self._log_dir = setup.folder("logs")
        self._host = "127.0.0.1"
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._records: dict[str, PidRecord] = {}
        self._tails: dict[str, _FileTail] = {}

    def log_path(self, model: str) -> Path:
        return self._log_dir / f"{model}.log"

    def _pid_path(self, model: str) -> Path:
        return self._run_dir / f"{model}.json"

    def key_path(self, model: str) -> Path:
        return self._run_dir / f"{model}.key"

    def _write_key_file(self, spec: LaunchSpec) -> None:
        """The key, readable by this user only, written whole before llama-server can look (then renamed)."""
        path = self.key_path(spec.model)
        temporary = path.with_suffix(".key-tmp")
        temporary.unlink(missing_ok=True)
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(spec.api_key + "\n")
            temporary.replace(path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise BackendStartFailed(f"cannot write the key file of {spec.model}: {exc.strerror or exc}") from exc

    def command(self, spec: LaunchSpec, port: int) -> tuple[list[str], dict[str, str]]:
        """The spec realised as a local process: argv (binary first) and environment."""
        try:
            binary = self._binary()
        except LlamaControllerError as exc:
            raise BackendStartFailed(exc.message) from exc
        argv = [binary, *spec.argv(str, self._host, port)]
        if spec.api_key:
            argv += ["--api-key-file", str(self.key_path(spec.model))]
        env = child_environment()  # the controller's own settings never leak into a backend
        env.update(spec.env)
        devices = visible_devices(spec.gpus)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        return argv, env

    async def start(self, spec: LaunchSpec) -> Backend:
        port = free_port(self._host)
        argv, env = self.command(spec, port)
        if spec.api_key:
            self._write_key_file(spec)
        log_path = self.log_path(spec.model)
        if log_path.exists() and log_path.stat().st_size > ROTATE_BYTES:
            log_path.replace(rotated(log_path))
        with log_path.open("ab") as log_file:
            offset = log_file.tell()
            try:
                proc = spawn_detached(argv, log_file, env)
            except OSError as exc:
                self.key_path(spec.model).unlink(missing_ok=True)
                raise BackendStartFailed(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        record = PidRecord(
            pid=proc.pid,
            start_ticks=process_start_ticks(proc.pid) or 0,
            port=port,
            model=spec.model,
            spec_hash=spec.spec_hash,
            started_at=time.time(),
            log_path=str(log_path),
            url=f"http://{self._host}:{port}",
            labels=dict(spec.labels),
        )
        try:
            self._write_pid_file(record)
        except OSError as exc:  # a disk that is full: without its pid file a backend would be an orphan later
            self._kill_unrecorded(proc)
            raise BackendStartFailed(f"cannot write the pid file of {spec.model}: {exc.strerror or exc}") from exc
        handle = str(proc.pid)
        self._children[handle] = proc
        self._records[handle] = record
        self._logbook.append(spec.model, f"{START_MARKER} pid {proc.pid} on port {port}")
        self._tails[handle] = _FileTail(log_path, offset, spec.model, self._logbook)
        log.info("started llama-server for %s: pid %d, port %d", spec.model, proc.pid, port)
        return self._backend(record, adopted=False)

    def _backend(self, record: PidRecord, adopted: bool) -> Backend:
        return Backend(
            model=record.model,
            url=record.url,
            handle=str(record.pid),
            spec_hash=record.spec_hash,
            started_at=record.started_at,
            adopted=adopted,
            labels=record.labels,
        )

    @staticmethod
    def _kill_unrecorded(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (spawn_detached): the group is just it
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def _write_pid_file(self, record: PidRecord) -> None:
        write_json_atomically(self._pid_path(record.model), asdict(record))

    def _remove_pid_file(self, record: PidRecord) -> None:
        path = self._pid_path(record.model)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == record.pid:
                path.unlink()
                self.key_path(record.model).unlink(missing_ok=True)

    def _is_ours(self, record: PidRecord) -> bool:
        ticks = process_start_ticks(record.pid)
        return ticks is not None and (record.start_ticks == 0 or ticks == record.start_ticks)

    async def wait_exit(self, backend: Backend) -> ExitInfo:
        proc = self._children.get(backend.handle)
        record = self._records.get(backend.handle)
        if record is not None:
            await self._wait_gone(record, proc)
        code = proc.returncode if proc is not None else None
        await self._forget(backend.handle)
        return ExitInfo(code=code, reason=describe_exit(code))

    async def _wait_gone(self, record: PidRecord, proc: subprocess.Popen[bytes] | None) -> None:
        """Return once the process has exited (and, for our own child, has been reaped).

        A pidfd where the kernel has one (it works for adopted processes too, which are not our
        children); otherwise a thread blocked in wait() for a child, or polling for anything else.
        """
        try:
            pidfd = os.pidfd_open(record.pid)
        except (OSError, AttributeError):
            if proc is not None:
                await asyncio.to_thread(proc.wait)
                return
            while self._is_ours(record):  # noqa: ASYNC110 - no event exists for a foreign pid
                await asyncio.sleep(_POLL_INTERVAL)
            return
        try:
            if proc is None and not self._is_ours(record):  # exited (or reused) before the open
                return
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, readable)
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
        finally:
            os.close(pidfd)
        if proc is not None:
            proc.wait()  # reaps the zombie; returns at once since the pidfd said it exited

    async def _forget(self, handle: str) -> None:
        tail = self._tails.pop(handle, None)
        if tail is not None:
            await tail.close()
        record = self._records.pop(handle, None)
        self._children.pop(handle, None)
        if record is not None:
            self._remove_pid_file(record)

    async def stop(self, backend: Backend, timeout: float) -> None:
        record = self._records.get(backend.handle)
        if record is None:
            return
        proc = self._children.get(backend.handle)
        if proc is None and not self._is_ours(record):
            await self._forget(backend.handle)
            return
        self._signal(record.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await self._wait_gone(record, proc)
        except TimeoutError:
            log.warning("llama-server for %s ignored SIGTERM for %.0fs; killing it", record.model, timeout)
            self._signal(record.pid, signal.SIGKILL)
            try:
                async with asyncio.timeout(KILL_CONFIRM_TIMEOUT):
                    await self._wait_gone(record, proc)
            except TimeoutError:  # not ours to kill (EPERM), or stuck in the kernel: the lifecycle tries again
                raise BackendStopFailed(
                    f"llama-server for {record.model} (pid {record.pid}) still runs {KILL_CONFIRM_TIMEOUT:g}s "
                    "after SIGKILL"
                ) from None
        await self._forget(backend.handle)

    @staticmethod
    def _signal(pid: int, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signum)  # the whole group: llama-server's own helpers too
            else:
                os.kill(pid, signum)

    def _read_pid_files(self) -> list[tuple[PidRecord, int]]:
        """Live records and the log offset to resume tailing from; stale or broken files are removed."""
        live: list[tuple[PidRecord, int]] = []
        for path in sorted(self._run_dir.glob("*.json")):
            try:
                record = PidRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                log.warning("removing unreadable pid file %s", path)
                path.unlink(missing_ok=True)
                continue
            if str(record.pid) not in self._records and not self._is_ours(record):
                log.info("pid file for %s names a process that is gone; removing it", record.model)
                path.unlink(missing_ok=True)
                self.key_path(record.model).unlink(missing_ok=True)
                continue
            log_path = Path(record.log_path)
            offset = max(0, log_path.stat().st_size - 64 * 1024) if log_path.exists() else 0
            live.append((record, offset))
        return live

    async def list_managed(self) -> list[Backend]:
        found: list[Backend] = []
        for record, offset in await asyncio.to_thread(self._read_pid_files):
            handle = str(record.pid)
            if handle not in self._records:
                self._records[handle] = record
                self._tails[handle] = _FileTail(Path(record.log_path), offset, record.model, self._logbook)
            found.append(self._backend(record, adopted=handle not in self._children))
        return found

    def on_resync(self, callback: Callable[[], None]) -> None:
        """Never called: a pidfd (or wait) per process misses no exit, there is no stream to lose."""

    async def keep_labels(self, backend: Backend, labels: Mapping[str, str]) -> None:
        """Into the pid file, which an adopting controller reads."""
        record = self._records.get(backend.handle)
        if record is None:
            return  # gone: nothing to adopt
        kept = replace(record, labels={**record.labels, **labels})
        try:
            await asyncio.to_thread(self._write_pid_file, kept)
        except OSError as exc:
            raise LlamaControllerError(f"cannot write the pid file of {record.model}: {exc.strerror or exc}") from exc
        if backend.handle in self._records:
            self._records[backend.handle] = kept
        else:  # it exited while the file was written: no pid file for a process that is gone
            self._remove_pid_file(kept)

    def logs(self, model: str) -> AsyncIterator[bytes]:
        return read_log(self.log_path(model))

    async def torn_down(self) -> bool:
        """Yes: a controller that stops is stopped by its operator (``serve`` stopping). One that restarts under
        ``serve`` died without stopping, and its backends stayed for the next one."""
        return True

    async def close(self) -> None:
        for handle in list(self._tails):
            tail = self._tails.pop(handle)
            await tail.close()
