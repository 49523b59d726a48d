"""The level-triggered lifecycle on the kubernetes runtime (the emulated API of tests/support/kubecluster.py, its
kubelet inert): a stop the API does not confirm is tried again until the Deployment, Service and pod are gone; a
failed backend releases them (its GPU with its pod) before the model reads failed; a backend deleted while no
controller ran is noticed by the next controller's first pass. (tests/integration/test_reconcile_real.py has the
same for the process runtime.)"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import BackendStartFailed
from controller.catalog.entries import Catalog
from controller.config import Config, validate_config
from controller.events import Event, ModelStateChanged, ModelStopFailed
from controller.lifecycle import model as managed_model
from controller.lifecycle.supervisor import Supervisor
from controller.runtime import kubernetes, runtime_setup
from controller.runtime.base import Backend
from controller.runtime.kube_objects import BACKEND, INSTANCE, MANAGED_BY, backend_name
from controller.runtime.kubernetes import KubernetesRuntime
from controller.runtime.logs import LogBook
from tests.support.kubecluster import Cluster, emulated_cluster, eventually

NAMESPACE = "llm"
INSTANCE_NAME = "test"
A = "a:latest"
NAME = backend_name(INSTANCE_NAME, A)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path / "cluster", gpus=1) as emulated:  # one GPU: a pod left behind keeps it
        yield emulated


def kube_config(tmp_path: Path, cluster: Cluster, tiny_model: Path, **runtime: Any) -> Config:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    shutil.copy(tiny_model, models / "a.gguf")
    kubernetes_settings = {
        "kubeconfig": str(cluster.kubeconfig(tmp_path / "kubeconfig")),
        "instance": INSTANCE_NAME,
        "models": {"claim_name": "models", "mount_path": str(models)},
        "gpu_count": 1,
    }
    return validate_config(
        {
            "server": {"data_dir": str(tmp_path / "data")},
            "models_dir": str(tmp_path / "none"),
            "auth": {"enabled": False},
            "edge": {"enabled": False},
            "runtime": {
                "kind": "kubernetes",
                "stop_timeout": 1,
                "reconcile_interval": 3600,  # passes come when a test asks for them
                "kubernetes": kubernetes_settings,
                **runtime,
            },
            "models": {"a": {"path": str(models / "a.gguf")}},
        }
    )


class Cast:
    """The rest of the controller around the runtime: a /health probe (a backend answers once its pod's
    container is ready, unless ``loading``), and every event the lifecycle publishes."""

    def __init__(self, cluster: Cluster, on_event: Callable[[Event], None] = lambda _: None) -> None:
        self.cluster = cluster
        self.loading = False
        self.on_event = on_event
        self.events: list[Event] = []
        self.seen: list[tuple[str, list[str]]] = []  # each model state, with what of the backend existed then

    async def probe(self, backend: Backend, timeout: float) -> bool:
        if self.loading:
            return False
        return any(
            "deletionTimestamp" not in pod["metadata"]
            and any(status.get("ready") for status in pod["status"].get("containerStatuses") or [])
            for pod in self.cluster.find("Pod", {BACKEND: backend.handle})
        )

    def publish(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, ModelStateChanged):
            self.seen.append((event.state, left(self.cluster)))
        self.on_event(event)

    def stop_failures(self) -> list[ModelStopFailed]:
        return [event for event in self.events if isinstance(event, ModelStopFailed)]


def left(cluster: Cluster) -> list[str]:
    """What of this instance's backends the cluster holds (the Secret included)."""
    ours = {MANAGED_BY: "llamacontroller", INSTANCE: INSTANCE_NAME}
    return [
        f"{kind}/{found['metadata']['name']}"
        for kind in ("Deployment", "Service", "Pod", "Secret")
        for found in cluster.find(kind, ours)
    ]


def live_pods(cluster: Cluster) -> list[str]:
    pods = cluster.find("Pod", {BACKEND: NAME})
    return [pod["metadata"]["name"] for pod in pods if "deletionTimestamp" not in pod["metadata"]]


@contextlib.asynccontextmanager
async def supervisor(config: Config, cast: Cast) -> AsyncIterator[Supervisor]:
    logbook = LogBook()
    runtime = KubernetesRuntime(runtime_setup(config, logbook, instance="unused"))
    made = Supervisor(config, runtime, Catalog(config), logbook, cast.probe, cast.publish)
    await made.start()
    try:
        yield made
    finally:
        await made.close()


async def test_kubernetes_stop_that_fails_twice_releases_everything_and_never_reads_stopped_before(
    tmp_path: Path, cluster: Cluster, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first stop's Deployment delete is refused (500), the second's pod stays terminating past the bound;
    the model stays stopping meanwhile, reconcile passes running all the while disturb nothing, and the third
    try deletes everything. The next load makes one pod, which gets the one GPU."""
    monkeypatch.setattr(managed_model, "STOP_RETRY_DELAYS", (0.2,))
    monkeypatch.setattr(kubernetes, "GONE_SLACK", 0.2, raising=False)
    monkeypatch.setattr(kubernetes, "FORCED_GONE_TIMEOUT", 0.5, raising=False)

    def fault(event: Event) -> None:
        if isinstance(event, ModelStopFailed) and event.failures == 1:
            cluster.keep_pods_terminating()  # the second try meets a pod that will not go
        if isinstance(event, ModelStopFailed) and event.failures == 2:
            cluster.let_pods_go()

    cast = Cast(cluster, fault)
    async with supervisor(kube_config(tmp_path, cluster, tiny_model), cast) as running:
        await running.load("a")
        [first_pod] = live_pods(cluster)

        async def passes() -> None:
            while True:
                await running.reconcile()
                await asyncio.sleep(0.05)

        reconciling = asyncio.ensure_future(passes())
        try:
            cluster.refuse_deletes("Deployment")
            async with asyncio.timeout(60):
                await running.unload("a")
        finally:
            reconciling.cancel()
        assert running.view("a").state == "stopped"
        failures = cast.stop_failures()
        assert [event.failures for event in failures] == [1, 2]
        assert "500" in failures[0].error and "still terminating" in failures[1].error
        assert left(cluster) == []
        assert ("stopping", []) not in cast.seen[:-1], "stopping until the stop is confirmed"
        assert all(state != "stopped" or not held for state, held in cast.seen), cast.seen

        await running.load("a")  # the GPU is free again: no "Insufficient nvidia.com/gpu"
        [second_pod] = live_pods(cluster)
        assert second_pod != first_pod
        assert [d["metadata"]["name"] for d in cluster.find("Deployment")] == [NAME]


async def test_kubernetes_deployment_deleted_while_no_controller_runs_is_noticed_by_the_first_pass(
    tmp_path: Path, cluster: Cluster, tiny_model: Path
) -> None:
    """Someone deletes the Deployment while no controller runs, orphaning its pod (``kubectl delete
    --cascade=orphan``): the next controller's first pass adopts nothing and releases the Service, the Secret and
    the pod with its GPU, so the next load gets it."""
    config = kube_config(tmp_path, cluster, tiny_model, keep_backends_on_exit=True)
    cast = Cast(cluster)
    async with supervisor(config, cast) as first:
        await first.load("a")
        [pod] = live_pods(cluster)
    assert left(cluster) != []  # kept for the next controller
    cluster.delete("Deployment", NAMESPACE, NAME, grace=0, orphan=True)
    assert live_pods(cluster) == [pod]

    async with supervisor(config, Cast(cluster)) as second:
        found = second.view("a")
        assert found.state == "stopped" and found.handle is None, "not adopted: its Deployment is gone"
        assert left(cluster) == [], "the first pass released what was left"
        await second.load("a")
        assert len(live_pods(cluster)) == 1


async def test_kubernetes_failed_backend_is_deleted_and_the_error_quotes_its_last_log_line(
    tmp_path: Path, cluster: Cluster, tiny_model: Path
) -> None:
    """The container exits while loading; its last words reach the log stream after the watch tells of the exit
    (0.5 s late here). The load fails quoting them, with the Deployment, Service and pod already deleted, and
    the next load gets the GPU."""
    cast = Cast(cluster)
    cast.loading = True
    async with supervisor(kube_config(tmp_path, cluster, tiny_model), cast) as running:
        loading = asyncio.ensure_future(running.load("a"))
        pod: str = await eventually(lambda: next(iter(live_pods(cluster)), None))
        await eventually(lambda: cluster.containers.get(pod))
        cluster.log_delay = 0.5
        path = cluster.log_path(pod)
        assert path is not None
        with path.open("a") as out:
            out.write("llama_model_loader: loaded meta data\nunknown model architecture: 'gemma9'\n")
        cluster.end_container(pod, exit_code=1)
        with pytest.raises(BackendStartFailed) as failed:
            async with asyncio.timeout(60):
                await loading
        assert "unknown model architecture: 'gemma9'" in failed.value.message
        assert "exit code 1" in failed.value.message
        assert left(cluster) == [], "released before the model reads failed"
        assert running.view("a").state == "failed"

        cluster.log_delay = 0.0
        cast.loading = False
        await running.load("a")
        assert len(live_pods(cluster)) == 1
