"""The runtime as the supervisor sees it: every call that lists or changes backends goes through only while this
controller leads, asked at the moment of the call. A standby, and a leader past the end of its lease's trust
(even one whose renewing task is stuck), is refused before anything reaches the engine or the cluster.

What it does not do: recall a call already made when the lease ended (it was made while the lease was still
trusted, which ends a margin before anyone else may take it: term.py), nor stop what a runtime does by itself
with a backend that has already exited (the docker runtime removes its container): that decides nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping

from common.errors import NotLeader
from controller.runtime.base import Backend, ExitInfo, LaunchSpec, Runtime


class FencedRuntime:
    def __init__(self, runtime: Runtime, leading: Callable[[], bool]) -> None:
        self.inner = runtime
        self.name = runtime.name
        self._leading = leading

    def _check(self, action: str) -> None:
        if not self._leading():
            raise NotLeader(f"not {action}: this controller does not lead (another controller acts on the runtime)")

    async def start(self, spec: LaunchSpec) -> Backend:
        self._check(f"starting {spec.model}")
        return await self.inner.start(spec)

    async def stop(self, backend: Backend, timeout: float) -> None:
        self._check(f"stopping backend {backend.handle}")
        await self.inner.stop(backend, timeout)

    async def list_managed(self) -> list[Backend]:
        self._check("listing backends")
        return await self.inner.list_managed()

    async def keep_labels(self, backend: Backend, labels: Mapping[str, str]) -> None:
        self._check(f"labelling backend {backend.handle}")
        await self.inner.keep_labels(backend, labels)

    async def wait_exit(self, backend: Backend) -> ExitInfo:
        return await self.inner.wait_exit(backend)

    async def torn_down(self) -> bool:
        return await self.inner.torn_down()

    def on_resync(self, callback: Callable[[], None]) -> None:
        self.inner.on_resync(callback)

    def logs(self, model: str) -> AsyncIterator[bytes]:
        return self.inner.logs(model)

    async def close(self) -> None:
        await self.inner.close()
