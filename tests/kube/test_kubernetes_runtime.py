"""`runtime.kind: kubernetes` against an emulated API server (tests/support/kubecluster.py): what the runtime
creates, watches, deletes and adopts, and how each way a pod can fail reaches the lifecycle.

The kubelet here is inert (pods are reported running, nothing runs); test_kubernetes_serve.py runs the real
llama-server behind the same emulated API.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.errors import BackendStartFailed, BackendStopFailed, KubernetesUnavailable
from controller.config import Config, validate_config
from controller.runtime import kube_api, kubernetes, runtime_setup
from controller.runtime.base import LaunchSpec
from controller.runtime.keys import BackendKeys
from controller.runtime.kube_objects import BACKEND, INSTANCE, MANAGED_BY, MODEL_NAME, REQUIREMENTS, RUN, backend_name
from controller.runtime.kubernetes import KubernetesRuntime
from controller.runtime.logs import LogBook
from tests.support.kubecluster import Cluster, emulated_cluster, eventually

NAMESPACE = "llm"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path / "cluster", gpus=1) as emulated:
        yield emulated


def kube_config(tmp_path: Path, cluster: Cluster, big: dict[str, Any] | None = None, **kubernetes: Any) -> Config:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    (models / "a.gguf").write_bytes(b"GGUF")
    settings = {
        "kubeconfig": str(cluster.kubeconfig(tmp_path / "kubeconfig")),
        "instance": "test",
        "models": {"claim_name": "models", "mount_path": str(models)},
        **kubernetes,
    }
    return validate_config(
        {
            "server": {"data_dir": str(tmp_path / "data")},
            "runtime": {"kind": "kubernetes", "stop_timeout": 1, "kubernetes": settings},
            "models": {
                "a:1b": {"path": str(models / "a.gguf")},
                "big": {"path": str(models / "a.gguf"), "gpus": [0, 1], **(big or {})},
            },
        }
    )


@pytest.fixture
async def runtime(tmp_path: Path, cluster: Cluster) -> AsyncIterator[Callable[..., KubernetesRuntime]]:
    made: list[KubernetesRuntime] = []

    def make(**kubernetes: Any) -> KubernetesRuntime:
        made.append(
            KubernetesRuntime(runtime_setup(kube_config(tmp_path, cluster, **kubernetes), LogBook(), instance="unused"))
        )
        return made[-1]

    yield make
    for each in made:
        await each.close()


def spec(tmp_path: Path, model: str = "a:1b", **changes: Any) -> LaunchSpec:
    return LaunchSpec(model=model, model_file=tmp_path / "models" / "a.gguf", args=("--alias", model), **changes)


def pods_of(cluster: Cluster, model: str) -> list[dict[str, Any]]:
    return cluster.find("Pod", {BACKEND: backend_name("test", model)})


async def running_pod(cluster: Cluster, model: str = "a:1b") -> str:
    def running() -> str | None:
        pods = [p for p in pods_of(cluster, model) if p["status"].get("phase") == "Running"]
        return pods[0]["metadata"]["name"] if pods else None

    name: str = await eventually(running)
    return name


async def test_start_creates_a_service_and_a_deployment_and_stop_deletes_both(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    name = backend_name("test", "a:1b")
    assert backend.handle == name and backend.model == "a:1b"
    service = cluster.get("Service", NAMESPACE, name)
    deployment = cluster.get("Deployment", NAMESPACE, name)
    assert service is not None and deployment is not None
    assert backend.url == f"http://{service['spec']['clusterIP']}:8080"
    labels = deployment["metadata"]["labels"]
    assert labels[MANAGED_BY] == "llamacontroller" and labels[INSTANCE] == "test"
    assert deployment["metadata"]["annotations"][MODEL_NAME] == "a:1b"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["--model", "/models/a.gguf"]
    assert await running_pod(cluster)

    await kube.stop(backend, timeout=1)
    assert cluster.get("Deployment", NAMESPACE, name) is None
    assert cluster.get("Service", NAMESPACE, name) is None
    assert pods_of(cluster, "a:1b") == []  # stop returns only once the pod is gone: never two of a model
    assert (await kube.wait_exit(backend)).reason == "stopped"


async def test_the_backends_key_is_in_a_secret_its_pod_reads_and_that_goes_with_the_backend(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    keyed = BackendKeys.ephemeral().issue(spec(tmp_path))
    backend = await kube.start(keyed)
    secret = cluster.get("Secret", NAMESPACE, backend.handle)
    assert secret is not None and base64.b64decode(secret["data"]["api-key"]).decode() == keyed.api_key
    assert cluster.environments[await running_pod(cluster)]["LLAMA_API_KEY"] == keyed.api_key
    assert keyed.api_key not in json.dumps([cluster.find("Deployment"), cluster.find("Service"), cluster.find("Pod")])
    await kube.stop(backend, timeout=1)
    assert cluster.get("Secret", NAMESPACE, backend.handle) is None
    assert ("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets") not in cluster.requests  # never listed


async def test_a_crashed_container_ends_the_backend_with_its_exit(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    cluster.set_container_state(
        pod,
        {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
        lastState={"terminated": {"exitCode": 1, "reason": "Error"}},
        restartCount=1,
    )
    exit_info = await asyncio.wait_for(kube.wait_exit(backend), 5)
    assert exit_info.code == 1 and "exit code 1" in exit_info.reason
    await kube.stop(backend, timeout=1)


async def test_out_of_memory_is_said_in_words(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    cluster.set_container_state(await running_pod(cluster), {"terminated": {"exitCode": 137, "reason": "OOMKilled"}})
    exit_info = await asyncio.wait_for(kube.wait_exit(backend), 5)
    assert exit_info.code == 137 and exit_info.reason.startswith("out of memory") and "OOMKilled" in exit_info.reason
    await kube.stop(backend, timeout=1)


async def test_an_image_that_cannot_be_pulled_fails_the_start(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    message = 'Back-off pulling image "llamacontroller/llama-server:nope"'
    cluster.set_container_state(
        await running_pod(cluster), {"waiting": {"reason": "ImagePullBackOff", "message": message}}
    )
    exit_info = await asyncio.wait_for(kube.wait_exit(backend), 5)
    assert exit_info.reason == f"ImagePullBackOff: {message}"
    await kube.stop(backend, timeout=1)


async def test_an_unschedulable_pod_fails_with_the_schedulers_reason(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path, "big:latest", gpus=(0, 1)))  # two GPUs; the cluster has one
    deployment = cluster.get("Deployment", NAMESPACE, backend.handle)
    assert deployment is not None
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "2"}
    exit_info = await asyncio.wait_for(kube.wait_exit(backend), 5)
    assert exit_info.reason.startswith("no node can run it: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu")
    await kube.stop(backend, timeout=1)
    assert cluster.find("Pod") == [] and cluster.find("Deployment") == []


async def test_with_unschedulable_timeout_a_node_that_joins_in_time_is_waited_for(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    """A cluster autoscaler adding a GPU node: the pod is unschedulable for a while, then runs."""
    kube = runtime(unschedulable_timeout=1.5)
    backend = await kube.start(spec(tmp_path, "big:latest", gpus=(0, 1)))
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    await eventually(
        lambda: any(c.items() >= unschedulable.items() for p in cluster.find("Pod") for c in p["status"]["conditions"])
    )
    cluster.add_gpus(1)
    await running_pod(cluster, "big:latest")
    exit_watch = asyncio.ensure_future(kube.wait_exit(backend))
    await asyncio.sleep(2.0)  # past the timeout: the pod got its node, nothing failed
    assert not exit_watch.done()
    await kube.stop(backend, timeout=1)
    assert (await exit_watch).reason == "stopped"


async def test_with_unschedulable_timeout_a_pod_still_waiting_then_fails_with_the_reason(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime(unschedulable_timeout=0.5)
    backend = await kube.start(spec(tmp_path, "big:latest", gpus=(0, 1)))
    exit_info = await asyncio.wait_for(kube.wait_exit(backend), 5)
    assert exit_info.reason.startswith("no node can run it: 0/3 nodes are available")
    assert exit_info.reason.endswith("(for 0.5s: runtime.kubernetes.unschedulable_timeout)")
    await kube.stop(backend, timeout=1)


async def test_backends_are_owned_by_the_controllers_deployment_and_go_with_it(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    """helm uninstall deletes the controller's Deployment: the garbage collector takes the backends with it."""
    controller = {
        "metadata": {"name": "llm-controller"},
        "spec": {"replicas": 0, "template": {"metadata": {}, "spec": {}}},
    }
    _, owner = cluster.create("Deployment", NAMESPACE, controller)
    kube = runtime(owner_deployment="llm-controller")
    backend = await kube.start(spec(tmp_path))
    await running_pod(cluster)
    for kind in ("Deployment", "Service"):
        found = cluster.get(kind, NAMESPACE, backend.handle)
        assert found is not None
        [reference] = found["metadata"]["ownerReferences"]
        assert (reference["kind"], reference["name"], reference["uid"]) == (
            "Deployment",
            "llm-controller",
            owner["metadata"]["uid"],
        )
    cluster.delete("Deployment", NAMESPACE, "llm-controller", grace=0)
    assert "deleted" in (await asyncio.wait_for(kube.wait_exit(backend), 5)).reason
    await eventually(lambda: not cluster.find("Pod") and not cluster.find("Service") and not cluster.find("Deployment"))


async def test_a_missing_owner_deployment_is_no_reason_to_fail(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime(owner_deployment="not-there")
    backend = await kube.start(spec(tmp_path))
    deployment = cluster.get("Deployment", NAMESPACE, backend.handle)
    assert deployment is not None and "ownerReferences" not in deployment["metadata"]
    await kube.stop(backend, timeout=1)


async def test_a_pod_deleted_by_someone_else_ends_the_backend(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    cluster.delete("Pod", NAMESPACE, pod, grace=0)
    exit_info = await asyncio.wait_for(kube.wait_exit(backend), 5)
    assert "deleted" in exit_info.reason
    await kube.stop(backend, timeout=1)


async def test_an_exit_while_the_api_server_restarts_is_still_seen(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    cluster.drop_watches()  # the stream breaks off; the runtime lists again after a short pause
    cluster.set_container_state(pod, {"terminated": {"exitCode": 2, "reason": "Error"}})  # while nobody watches
    exit_info = await asyncio.wait_for(kube.wait_exit(backend), 10)
    assert exit_info.code == 2
    await kube.stop(backend, timeout=1)


async def test_a_watch_resumed_from_a_compacted_version_gets_410_and_lists_again(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    cluster.create("Service", "elsewhere", {"metadata": {"name": "unrelated"}, "spec": {"selector": {}}})
    cluster.compact()  # the version the runtime would resume from is gone ...
    cluster.drop_watches(cleanly=True)  # ... and its watch ends the normal way: it resumes, gets 410 Gone
    await eventually(lambda: cluster.gone_answers)
    cluster.set_container_state(pod, {"terminated": {"exitCode": 2, "reason": "Error"}})
    exit_info = await asyncio.wait_for(kube.wait_exit(backend), 10)
    assert exit_info.code == 2
    await kube.stop(backend, timeout=1)


async def test_a_restarted_controller_adopts_its_backend_and_deletes_what_no_longer_matches(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    first = runtime()
    kept = await first.start(spec(tmp_path))
    changed = await first.start(spec(tmp_path, "big:latest", gpus="none"))
    await running_pod(cluster)
    await first.close()

    # The next controller runs "big" on another image: that one is deleted, "a:1b" adopted.
    second = runtime(big={"container": {"image": "llamacontroller/llama-server:other"}})
    adopted = await second.list_managed()
    assert [(b.model, b.handle, b.url, b.spec_hash, b.adopted) for b in adopted] == [
        (kept.model, kept.handle, kept.url, kept.spec_hash, True)
    ]
    assert cluster.get("Deployment", NAMESPACE, changed.handle) is None
    assert cluster.get("Service", NAMESPACE, changed.handle) is None
    # The adopted backend is watched: its crash reaches the new controller.
    cluster.set_container_state(await running_pod(cluster), {"terminated": {"exitCode": 3, "reason": "Error"}})
    assert (await asyncio.wait_for(second.wait_exit(adopted[0]), 5)).code == 3
    await second.stop(adopted[0], timeout=1)
    assert cluster.find("Deployment") == [] and cluster.find("Service") == [] and cluster.find("Pod") == []


async def test_an_orphaned_service_is_deleted_and_another_instances_objects_are_left_alone(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    ours = {MANAGED_BY: "llamacontroller", INSTANCE: "test"}
    theirs = {MANAGED_BY: "llamacontroller", INSTANCE: "someone-else"}
    for name, labels in (("llama-orphan-1", ours), ("llama-theirs-1", theirs)):
        cluster.create("Service", NAMESPACE, {"metadata": {"name": name, "labels": labels}, "spec": {"selector": {}}})
    assert await runtime().list_managed() == []
    assert cluster.get("Service", NAMESPACE, "llama-orphan-1") is None
    assert cluster.get("Service", NAMESPACE, "llama-theirs-1") is not None


async def test_a_same_named_object_of_someone_else_is_not_touched(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    name = backend_name("test", "a:1b")
    cluster.create("Service", NAMESPACE, {"metadata": {"name": name, "labels": {"team": "web"}}, "spec": {}})
    with pytest.raises(BackendStartFailed, match="does not manage"):
        await runtime().start(spec(tmp_path))
    assert cluster.get("Service", NAMESPACE, name) is not None


async def test_a_restarted_start_never_mistakes_the_previous_pod_for_its_own(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    first = await kube.start(spec(tmp_path))
    await running_pod(cluster)
    await kube.stop(first, timeout=1)
    second = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    runs = {p["metadata"]["labels"][RUN] for p in pods_of(cluster, "a:1b")}
    assert len(runs) == 1  # only the second start's pod exists
    cluster.set_container_state(pod, {"terminated": {"exitCode": 4, "reason": "Error"}})
    assert (await asyncio.wait_for(kube.wait_exit(second), 5)).code == 4
    await kube.stop(second, timeout=1)


async def test_model_files_outside_the_models_volume_are_refused_before_anything_is_created(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    elsewhere = LaunchSpec(model="a:1b", model_file=Path("/srv/other/a.gguf"))
    with pytest.raises(BackendStartFailed, match=r"outside runtime\.kubernetes\.models\.mount_path"):
        await runtime().start(elsewhere)
    assert cluster.requests == []


async def test_forbidden_says_which_permissions_are_missing(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    """An API that answers 403 (RBAC) is a 503 with what the service account needs."""
    cluster.forbidden = True
    with pytest.raises(KubernetesUnavailable, match="the Role the Helm chart creates"):
        await runtime().start(spec(tmp_path))


async def test_no_configuration_is_a_clear_error(tmp_path: Path, runtime: Callable[..., KubernetesRuntime]) -> None:
    kube = runtime(kubeconfig=str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(KubernetesUnavailable, match="no Kubernetes configuration found"):
        await kube.start(spec(tmp_path))


def say(cluster: Cluster, pod: str, *lines: str) -> None:
    """The pod's container writes ``lines`` to its output."""
    path = cluster.log_path(pod)
    assert path is not None
    with path.open("a") as out:
        out.write("".join(f"{line}\n" for line in lines))


def logged(tmp_path: Path, model: str = "a:1b") -> list[str]:
    """The model's log file as the controller wrote it."""
    path = tmp_path / "data" / "logs" / f"{model}.log"
    return path.read_text().splitlines() if path.exists() else []


async def test_pod_logs_keep_coming_after_a_silence_longer_than_the_api_clients_read_timeout(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend says nothing for a while (no requests): what it says next still reaches its log, on the stream
    opened first. The API client's read timeout (10 s; here 0.5 s) must not apply to a follow stream: it ended
    the stream of any quiet backend."""
    monkeypatch.setattr(kube_api, "TIMEOUT", httpx.Timeout(0.5))
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    say(cluster, pod, "first")
    await eventually(lambda: logged(tmp_path) == ["first"])
    await asyncio.sleep(2.0)  # silence, four times the client's read timeout
    say(cluster, pod, "second")
    await eventually(lambda: logged(tmp_path) == ["first", "second"], timeout=30)
    assert len(log_requests(cluster, pod)) == 1, "the stream was never broken off"
    await kube.stop(backend, timeout=1)


def log_requests(cluster: Cluster, pod: str) -> list[tuple[str, str]]:
    return [(method, path) for method, path in cluster.requests if path.endswith(f"/pods/{pod}/log")]


async def test_a_broken_log_stream_is_followed_again_with_nothing_lost_or_repeated(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    say(cluster, pod, "one", "two")
    await eventually(lambda: logged(tmp_path) == ["one", "two"])
    cluster.drop_logs()  # an API server restart
    say(cluster, pod, "three")
    await eventually(lambda: "three" in logged(tmp_path), timeout=30)
    cluster.drop_logs()
    cluster.drop_logs()
    say(cluster, pod, "four")
    await eventually(lambda: "four" in logged(tmp_path), timeout=30)
    assert logged(tmp_path) == ["one", "two", "three", "four"]
    await kube.stop(backend, timeout=1)


async def test_an_adopted_pods_log_is_followed_from_where_the_last_controller_stopped(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    """What the first controller wrote to the log file is not written again; what the pod said while no
    controller ran is (before the fix adoption replayed the pod's whole log into the file)."""
    first = runtime()
    await first.start(spec(tmp_path))
    pod = await running_pod(cluster)
    say(cluster, pod, "one")
    await eventually(lambda: logged(tmp_path) == ["one"])
    await first.close()
    say(cluster, pod, "two")  # while no controller runs
    second = runtime()
    adopted = await second.list_managed()
    await eventually(lambda: "two" in logged(tmp_path), timeout=30)
    say(cluster, pod, "three")
    await eventually(lambda: "three" in logged(tmp_path), timeout=30)
    assert logged(tmp_path) == ["one", "two", "three"]
    await second.stop(adopted[0], timeout=1)


async def test_labels_kept_after_the_start_are_read_back_on_adoption_and_restart_nothing(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    """The keep_alive in force is patched into the Deployment's annotation (a client's keep_alive -1 survives a
    controller restart); the pod template does not change, so its pod runs on."""
    first = runtime()
    backend = await first.start(spec(tmp_path, labels={"ctx_size": "4096"}))
    pod = await running_pod(cluster)
    await first.keep_labels(backend, {"keep_alive": "inf"})
    await first.close()
    second = runtime()
    [adopted] = await second.list_managed()
    assert adopted.labels == {"ctx_size": "4096", "keep_alive": "inf"}
    assert [p["metadata"]["name"] for p in pods_of(cluster, "a:1b")] == [pod]
    await second.keep_labels(adopted, {"keep_alive": "300.0"})
    deployment = cluster.get("Deployment", NAMESPACE, backend.handle)
    assert deployment is not None
    assert json.loads(deployment["metadata"]["annotations"][REQUIREMENTS]) == {
        "ctx_size": "4096",
        "keep_alive": "300.0",
    }
    await second.stop(adopted, timeout=1)


async def test_a_log_stream_broken_as_the_container_ends_is_read_to_its_end(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    """The container has ended and its stream breaks before its last words came: they are read once more (they
    are often the reason it ended)."""
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    say(cluster, pod, "one")
    await eventually(lambda: logged(tmp_path) == ["one"])
    cluster.set_container_state(pod, {"terminated": {"exitCode": 1, "reason": "Error"}})
    assert (await asyncio.wait_for(kube.wait_exit(backend), 10)).code == 1
    cluster.drop_logs()
    say(cluster, pod, "last words")
    await eventually(lambda: logged(tmp_path) == ["one", "last words"], timeout=30)
    await kube.stop(backend, timeout=1)


async def test_a_lost_pod_watch_that_is_back_asks_the_lifecycle_to_compare_again(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    kube = runtime()
    resyncs: list[float] = []
    kube.on_resync(lambda: resyncs.append(asyncio.get_running_loop().time()))
    backend = await kube.start(spec(tmp_path))
    await running_pod(cluster)
    assert resyncs == []  # the first listing is no resync
    cluster.drop_watches()  # an API server restart: events may be lost until the runtime lists again
    await eventually(lambda: resyncs, timeout=30)
    cluster.drop_watches(cleanly=True)  # a watch's timeout: resumed from its last version, nothing missed
    await asyncio.sleep(1.0)
    assert len(resyncs) == 1
    await kube.stop(backend, timeout=1)


async def test_listing_while_a_backend_starts_or_stops_disturbs_neither(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    """A reconcile pass may list at any moment: between a start's Service and its Deployment, it must not take
    the Service for a leftover; a backend this controller started is its own, not adopted."""
    kube = runtime()
    cluster.create_delays["Deployment"] = 0.5
    starting = asyncio.ensure_future(kube.start(spec(tmp_path)))
    name = backend_name("test", "a:1b")
    await eventually(lambda: cluster.get("Service", NAMESPACE, name))
    listed = await kube.list_managed()  # waits for the start: what it lists is whole
    backend = await starting
    assert [(b.handle, b.adopted) for b in listed] == [(name, False)]
    assert cluster.get("Service", NAMESPACE, name) is not None
    await running_pod(cluster)
    exit_watch = asyncio.ensure_future(kube.wait_exit(backend))
    assert [(b.handle, b.adopted) for b in await kube.list_managed()] == [(name, False)]
    stopping = asyncio.ensure_future(kube.stop(backend, timeout=1))
    while not stopping.done():
        await kube.list_managed()
        await asyncio.sleep(0.02)
    await stopping
    assert (await exit_watch).reason == "stopped"
    assert await kube.list_managed() == []
    assert cluster.find("Deployment") == cluster.find("Service") == cluster.find("Pod") == []


async def test_a_stop_raises_while_a_delete_is_refused_or_a_pod_stays_and_releases_all_in_the_end(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kubernetes, "GONE_SLACK", 0.2)
    monkeypatch.setattr(kubernetes, "FORCED_GONE_TIMEOUT", 0.5)
    kube = runtime()
    backend = await kube.start(spec(tmp_path))
    pod = await running_pod(cluster)
    cluster.refuse_deletes("Deployment")
    with pytest.raises(BackendStopFailed, match="500"):
        await kube.stop(backend, timeout=1)
    cluster.keep_pods_terminating()
    with pytest.raises(BackendStopFailed, match=f"{pod}.*still terminating"):
        await kube.stop(backend, timeout=1)
    assert cluster.find("Pod") != [] and cluster.get("Service", NAMESPACE, backend.handle) is not None
    cluster.let_pods_go()
    await kube.stop(backend, timeout=1)
    assert cluster.find("Deployment") == cluster.find("Service") == cluster.find("Pod") == []
    assert cluster.find("Secret") == []


async def test_an_exit_is_told_after_the_pods_last_log_lines(
    tmp_path: Path, cluster: Cluster, runtime: Callable[..., KubernetesRuntime]
) -> None:
    """The watch tells of the exit before the log stream brings the last lines (they come 0.5 s late here):
    wait_exit answers once they are in, so the error can quote them."""
    logbook = LogBook()
    kube = KubernetesRuntime(runtime_setup(kube_config(tmp_path, cluster), logbook, instance="unused"))
    try:
        backend = await kube.start(spec(tmp_path))
        pod = await running_pod(cluster)
        cluster.log_delay = 0.5
        say(cluster, pod, "loading", "fatal: out of cheese")
        cluster.end_container(pod, exit_code=3)
        exit_info = await asyncio.wait_for(kube.wait_exit(backend), 10)
        assert exit_info.code == 3
        assert logbook.tail("a:1b", 1) == ["fatal: out of cheese"]
        await kube.stop(backend, timeout=1)
    finally:
        await kube.close()
