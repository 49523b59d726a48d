"""Which controller acts on the runtime when several run (``server.leader_election``): one leads, the others wait.

Two controllers never both act on the runtime: before the leader's supervisor lists, adopts, starts or stops
anything it holds the lease, the runtime it acts through is fenced by the lease (``fence.py``: every call is
refused once the lease can no longer be proven), and a leader that loses its lease stops acting at once and ends
its process (controller/app.py), leaving the backends to the next leader, which adopts them.

``Leadership`` is what the app needs; ``make_leadership`` builds the kind the config names: ``none`` (one
controller, it leads at once), ``redis`` (a lock in the store's Redis), ``kubernetes`` (a Lease).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from typing import Protocol

from controller.config import Config
from controller.leadership.term import LeaseTiming


class Leadership(Protocol):
    kind: str
    identity: str  # this controller, as the lease names its holder: host name, pid and a random part
    lost: asyncio.Event  # set when this controller can no longer prove that it leads
    reason: str | None  # why it was lost
    fencing_token: int | None  # the current term's number: every acquisition's is larger than the last one's

    @property
    def leading(self) -> bool:
        """Whether this controller may act on the runtime now."""

    async def try_acquire(self) -> bool:
        """One try to lead; True when this controller leads."""

    async def acquire(self) -> int:
        """Wait until this controller leads (renewing from then on in the background); the fencing token."""

    async def release(self) -> None:
        """Stop acting and hand the lease over at once (a clean shutdown)."""

    async def close(self) -> None:
        """Stop renewing without handing over."""


class NoLeadership:
    """A single controller (``kind: none``, the default): it leads at once and never loses."""

    kind = "none"

    def __init__(self) -> None:
        self.identity = holder_identity()
        self.lost = asyncio.Event()
        self.reason: str | None = None
        self.fencing_token: int | None = None

    @property
    def leading(self) -> bool:
        return self.fencing_token is not None

    async def try_acquire(self) -> bool:
        self.fencing_token = 0
        return True

    async def acquire(self) -> int:
        self.fencing_token = 0
        return 0

    async def release(self) -> None:
        self.fencing_token = None

    async def close(self) -> None:
        return None


def holder_identity() -> str:
    """Unique per process and start: two controllers on one host (or one restarted with the same pid) differ."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def make_leadership(config: Config) -> Leadership:
    election = config.server.leader_election
    timing = LeaseTiming(election.lease_duration, election.renew_interval)
    if election.kind == "redis":
        from controller.leadership.redis import RedisLeadership

        return RedisLeadership(config.store.redis_url, election.name, timing, holder_identity())
    if election.kind == "kubernetes":
        from controller.leadership.kubernetes import KubernetesLeadership
        from controller.runtime.kube_api import KubeApi

        settings = config.runtime.kubernetes

        def connect() -> KubeApi:
            return KubeApi(settings.namespace, settings.kubeconfig, settings.context)

        return KubernetesLeadership(connect, election.name, timing, holder_identity())
    return NoLeadership()
