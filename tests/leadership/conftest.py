"""What the leader election tests share: a real redis-server and the emulated Kubernetes API, each behind one small
``Arena`` (make a contender, take its lease away, make the store unreachable) so that one set of tests runs on both."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from controller.leadership.kubernetes import KubernetesLeadership, micro_time
from controller.leadership.redis import RedisLeadership, lock_key
from controller.leadership.term import LeaseTiming, Term
from controller.runtime.kube_api import KubeApi
from tests.support.kubecluster import Cluster, emulated_cluster
from tests.support.redis_server import redis_server

NAMESPACE = "llm"
_names = itertools.count(1)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path_factory.mktemp("cluster")) as emulated:
        yield emulated


class Arena(Protocol):
    kind: str
    name: str  # this test's lease: its own, so tests share the store without meeting

    def contender(self, identity: str, timing: LeaseTiming) -> Term: ...

    def steal(self) -> None:
        """Another holder writes the lease over the current one's."""

    def delete(self) -> None: ...

    def outage(self) -> contextlib.AbstractContextManager[None]:
        """The store answers no call while the block runs."""


class RedisArena:
    kind = "redis"

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"election-{next(_names)}"
        self.client = redis.Redis.from_url(url)

    def contender(self, identity: str, timing: LeaseTiming) -> Term:
        return RedisLeadership(self.url, self.name, timing, identity)

    def steal(self) -> None:
        self.client.set(lock_key(self.name), "thief", px=60_000)

    def delete(self) -> None:
        self.client.delete(lock_key(self.name))

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        # Every client's writes wait (the lease's scripts are writes); WRITE, not ALL: under ALL (Redis 7.0) the
        # UNPAUSE would wait too.
        self.client.client_pause(60_000, all=False)
        try:
            yield
        finally:
            self.client.client_unpause()


class KubernetesArena:
    kind = "kubernetes"

    def __init__(self, cluster: Cluster, kubeconfig: Path) -> None:
        self.cluster = cluster
        self.kubeconfig = kubeconfig
        self.name = f"election-{next(_names)}"

    def contender(self, identity: str, timing: LeaseTiming) -> Term:
        return KubernetesLeadership(lambda: KubeApi(None, self.kubeconfig, None), self.name, timing, identity)

    def lease(self) -> dict[str, Any]:
        found = self.cluster.get("Lease", NAMESPACE, self.name)
        assert found is not None
        return found

    def steal(self) -> None:
        spec = {"holderIdentity": "thief", "renewTime": micro_time(), "leaseDurationSeconds": 60}
        self.cluster.patch("Lease", NAMESPACE, self.name, {"spec": spec})

    def delete(self) -> None:
        self.cluster.delete("Lease", NAMESPACE, self.name, None)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self.cluster.forbidden = True  # every call answered 403, as to a service account whose Role went away
        try:
            yield
        finally:
            self.cluster.forbidden = False


@pytest.fixture(params=["redis", "kubernetes"])
def arena(request: pytest.FixtureRequest, tmp_path: Path) -> Arena:
    if request.param == "redis":
        return RedisArena(request.getfixturevalue("redis_url"))
    cluster: Cluster = request.getfixturevalue("cluster")
    return KubernetesArena(cluster, cluster.kubeconfig(tmp_path / "kubeconfig", NAMESPACE))
