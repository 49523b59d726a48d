"""Leader election with a coordination.k8s.io/v1 Lease in the runtime's namespace (the Helm chart's shape).

The rules of client-go's leader election, in this project's terms:
- Every write is a PUT over the ``resourceVersion`` last read or written: when the API server answers 409, the
  Lease changed meanwhile, so someone else won (a take) or holds it now (a renewal).
- A standby never trusts the holder's clock: it measures a lease from the moment it first saw that version of the
  Lease (its own clock), and takes it over only when no new version came for ``leaseDurationSeconds``.
- ``leaseTransitions`` is the fencing token: each acquisition writes it one higher.
- A release writes the Lease with no holder (and a one-second duration), which a standby takes at once.
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from common.errors import Unavailable
from controller.leadership.term import Claim, LeaseTiming, Term
from controller.runtime.kube_api import KubeApi, kube_errors

API_VERSION = "coordination.k8s.io/v1"


def micro_time(moment: datetime | None = None) -> str:
    """A Lease's time stamp (MicroTime): RFC 3339 in UTC with microseconds."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class KubernetesLeadership(Term):
    kind = "kubernetes"

    def __init__(self, connect: Callable[[], KubeApi], name: str, timing: LeaseTiming, identity: str) -> None:
        super().__init__(timing, identity)
        self.name = name
        self._connect = connect
        self._client: KubeApi | None = None
        self._seconds = math.ceil(timing.duration)  # the API takes whole seconds: rounded up, never shorter
        self._seen: tuple[str, float] | None = None  # (resourceVersion, when this standby first saw it)
        self._lease: dict[str, Any] | None = None  # the Lease as this holder last wrote it

    def _api(self) -> KubeApi:
        if self._client is None:
            self._client = self._connect()
        return self._client

    async def _claim(self) -> Claim:
        with kube_errors(f"reading the leader Lease {self.name}"):
            found = await self._api().get("Lease", self.name)
            if found is None:
                return await self._write(self._new_lease(), 0)
            spec = found.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            transitions = int(spec.get("leaseTransitions") or 0)
            if holder == self.identity:  # a take whose answer was lost: take it again, same term
                return await self._write(found, transitions)
            ends_in = self._ends_in(found)
            if holder and ends_in > 0:
                return Claim(None, ends_in)
            return await self._write(found, transitions + 1)

    def _ends_in(self, lease: dict[str, Any]) -> float:
        """Seconds until the holder's lease ends, measured from when this standby first saw its version."""
        version = lease["metadata"]["resourceVersion"]
        now = asyncio.get_running_loop().time()
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, now)
        seconds = (lease.get("spec") or {}).get("leaseDurationSeconds") or self._seconds
        return self._seen[1] + float(seconds) - now

    def _new_lease(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": "Lease", "metadata": {"name": self.name}, "spec": {}}

    async def _write(self, lease: dict[str, Any], transitions: int) -> Claim:
        """Take ``lease`` as read (or create it): None as the token when someone else wrote it first."""
        now = micro_time()
        body = copy.deepcopy(lease)
        body["spec"] = {
            **body.get("spec", {}),
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self._seconds,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        api = self._api()
        written = await (api.replace(body) if "resourceVersion" in body["metadata"] else api.create_new(body))
        if written is None:
            return Claim(None)
        self._lease = written
        return Claim(transitions)

    async def _extend(self) -> bool:
        assert self._lease is not None
        body = copy.deepcopy(self._lease)
        body["spec"]["renewTime"] = micro_time()
        with kube_errors(f"renewing the leader Lease {self.name}"):
            written = await self._api().replace(body)
            if written is not None:
                self._lease = written
                return True
            found = await self._api().get("Lease", self.name)
        if found is None or (found.get("spec") or {}).get("holderIdentity") != self.identity:
            return False
        self._lease = found  # changed by someone (a label), still ours: the next try writes over this version
        raise Unavailable(f"the Lease {self.name} changed meanwhile")

    async def _give_up(self) -> None:
        if self._lease is None:
            return
        body = copy.deepcopy(self._lease)
        spec = body["spec"]
        spec.pop("holderIdentity", None)
        spec.update(leaseDurationSeconds=1, renewTime=micro_time())
        with kube_errors(f"releasing the leader Lease {self.name}"):
            await self._api().replace(body)  # None: taken or gone already, nothing to hand over

    async def _close_client(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
