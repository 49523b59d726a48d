"""``serve`` with gateway workers: a small supervisor of the controller, N gateway processes and the Caddy edge.

    serve (this process: binds the sockets, restarts what dies, orders the shutdown)
    ├── controller   (``serve --role controller``) on a loopback socket of its own: lifecycle, control API, page
    ├── gateway (N)  (``serve --role gateway``) sharing the public socket (server.listen): the data plane
    └── caddy        (edge.enabled) in front of the gateways

The sockets are bound here, once, and inherited: a restarted child serves the same ports, with no window in
which a connection is refused. A controller that dies (SIGKILL, a crash) is started again; the new one adopts
the backends the old one left (the process runtime's pid files) and configures the same Caddy, while the gateways
go on serving the loaded models from their copy of the directory. A gateway that dies ends only its own
requests and is started again. Caddy is this process's child, not the controller's, so it outlives a controller.

A deliberate stop (SIGTERM, Ctrl-C) goes in order: the gateways finish their requests (up to
runtime.stop_timeout), then the controller stops the backends, then Caddy stops: nothing is left behind. If this
process itself is killed, the kernel kills its children (PR_SET_PDEATHSIG) and the backends stay for the next
start to adopt, as after a killed single-process ``serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common.upstream import Timeouts, Upstream
from controller.auth.secrets import internal_secret
from controller.config import Config
from controller.edge.child import CaddyChild, find_caddy
from controller.edge.edge import caddy_home, edge_settings
from controller.leadership.office import EXIT_LEADERSHIP_LOST, EXIT_TAKE_OVER_FAILED
from controller.runtime.process import dying_with_parent

log = logging.getLogger("llamacontroller.serve")

RESTART_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)  # between restarts of a child that keeps dying
HEALTHY_AFTER = 30.0  # a child that ran this long starts its backoff again from the first delay
# A controller that ends with one of these is not started again: the whole of serve ends with its status, for
# whatever runs serve (systemd, a kubelet) to decide — a config that cannot load, a lead lost or not taken.
FINAL_STATUSES = frozenset({2, EXIT_LEADERSHIP_LOST, EXIT_TAKE_OVER_FAILED})
CONTROLLER_START_WAIT = 120.0  # for the controller's first answer before the gateways start anyway
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus_client keeps a process's samples in files
GATEWAY_METRICS_ENV = "LLAMACONTROLLER_GATEWAY_METRICS_DIR"  # tells the controller where to add them up
METRICS_PREFIX = "llamacontroller-metrics-"  # then the supervisor's pid: <prefix><pid>-<random>


class Child:
    """One supervised process: started again, with backoff, whenever it ends unasked."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], fds: Sequence[int]) -> None:
        self.name, self.argv, self.env, self.fds = name, argv, env, tuple(fds)
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            pass_fds=self.fds,
            start_new_session=True,  # signals are this supervisor's to send: it orders the shutdown
            preexec_fn=dying_with_parent(os.getpid()),
        )
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def next_delay(self) -> float:
        if time.monotonic() - self.started >= HEALTHY_AFTER:
            self.failures = 0
        delay = RESTART_DELAYS[min(self.failures, len(RESTART_DELAYS) - 1)]
        self.failures += 1
        return delay

    def signal(self, number: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(number)

    async def wait(self) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait)

    async def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await self.wait()
        except TimeoutError:
            log.warning("%s (pid %d) did not stop within %gs; killing it", self.name, self.process.pid, grace)
            self.signal(signal.SIGKILL)
            await self.wait()


class ServeSupervisor:
    def __init__(self, config: Config, child_args: list[str], workers: int) -> None:
        self.config = config
        self.child_args = child_args  # serve's own arguments, passed on to every child
        self.workers = workers
        self.stopping = asyncio.Event()
        self.children: list[Child] = []
        self.caddy: CaddyChild | None = None
        self._cleanup: list[Callable[[], None]] = []
        self.status = 0

    def _argv(self, role: str, fd: int, *more: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "llamacontroller",
            "serve",
            *self.child_args,
            "--role",
            role,
            "--fd",
            str(fd),
            *more,
        ]

    @staticmethod
    def _metrics_dir() -> Path:
        """Where the gateways keep their metrics (memory-mapped files): in memory (/dev/shm) where there is one,
        never on the data dir's disk — a full disk turns a write into a mapped file into SIGBUS. Named after this
        supervisor's pid, so that the folders of supervisors that were killed (and could not remove theirs) are
        removed by the next one."""
        memory = Path("/dev/shm")  # noqa: S108 - private folders (0700) made by mkdtemp
        parent = memory if memory.is_dir() else Path(tempfile.gettempdir())
        for folder in parent.glob(f"{METRICS_PREFIX}*"):
            owner = folder.name.removeprefix(METRICS_PREFIX).split("-", 1)[0]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists() and folder.stat().st_uid == os.getuid():
                shutil.rmtree(folder, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-", dir=parent))

    async def run(self, public: socket.socket) -> int:
        internal_secret(self.config.secrets_dir)  # made once here, before the children race to make it
        control = _loopback_socket()
        controller_url = f"http://127.0.0.1:{control.getsockname()[1]}"
        metrics = self._metrics_dir()
        self._cleanup.append(lambda: shutil.rmtree(metrics, ignore_errors=True))
        env = dict(os.environ)
        env.pop(METRICS_ENV, None)
        controller = Child(
            "controller",
            self._argv("controller", control.fileno()),
            {**env, GATEWAY_METRICS_ENV: str(metrics)},
            [control.fileno()],
        )
        gateways = [
            Child(
                f"gateway {n + 1}",
                self._argv("gateway", public.fileno(), "--controller-url", controller_url),
                {**env, METRICS_ENV: str(metrics)},
                [public.fileno()],
            )
            for n in range(self.workers)
        ]
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, self.stopping.set)
        try:
            await self._start_caddy()
            controller.start()
            await self._wait_for(controller_url, controller)
            for gateway in gateways:
                gateway.start()
            self.children = [controller, *gateways]
            watchers = [asyncio.create_task(self._keep(child)) for child in self.children]
            await self.stopping.wait()
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            grace = self.config.runtime.stop_timeout + 5
            await asyncio.gather(*(gateway.stop(grace) for gateway in gateways))
            # The controller stops every backend first: give it each one's stop timeout and then some.
            await controller.stop(grace + 30)
        finally:
            if self.caddy is not None:
                await self.caddy.stop()
            control.close()
            for cleanup in self._cleanup:
                cleanup()
        return self.status

    async def _start_caddy(self) -> None:
        edge = self.config.edge
        if not (edge.enabled and edge.supervise):
            return
        settings = edge_settings(self.config)
        self.caddy = CaddyChild(find_caddy(edge.binary), caddy_home(self.config), settings.admin_listen, lambda: None)
        await self.caddy.start()

    async def _wait_for(self, url: str, controller: Child) -> None:
        """Until the controller answers /healthz (its start-up and adoption done), so that the gateways' first
        requests find a directory; a controller that takes longer does not hold them back for ever."""
        client = Upstream(Timeouts(connect=1.0, write=1.0, response=5.0, stall=5.0))
        deadline = time.monotonic() + CONTROLLER_START_WAIT
        try:
            while time.monotonic() < deadline and not self.stopping.is_set():
                assert controller.process is not None
                if controller.process.poll() is not None:
                    return  # it failed: _keep restarts it (and says so)
                with contextlib.suppress(Exception):
                    async with client.request("GET", f"{url}/healthz", None) as answer:
                        await answer.read()
                        if answer.status == 200:
                            return
                await asyncio.sleep(0.05)
        finally:
            await client.close()

    async def _keep(self, child: Child) -> None:
        while True:
            code = await child.wait()
            if self.stopping.is_set():
                return
            if child.name == "controller" and code in FINAL_STATUSES:
                log.error("the controller ended with status %d; stopping serve with it", code)
                self.status = code
                self.stopping.set()
                return
            delay = child.next_delay()
            log.error(
                "%s (pid %s) exited with code %s; starting it again in %gs",
                child.name,
                child.process and child.process.pid,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            if self.stopping.is_set():
                return
            child.start()


def _loopback_socket() -> socket.socket:
    """The controller's own listener: loopback, on a port the kernel picks (no race with another program)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    return sock


def supervise(config: Config, child_args: list[str], public: socket.socket, workers: int) -> int:
    """Run the controller, ``workers`` gateway processes on ``public`` and the edge until SIGTERM or Ctrl-C."""
    public.set_inheritable(True)
    return asyncio.run(ServeSupervisor(config, child_args, workers).run(public))
