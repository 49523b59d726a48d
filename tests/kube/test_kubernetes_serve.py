"""`llamacontroller serve` with `runtime.kind: kubernetes`, the real llama-server behind an emulated cluster.

The controller is the real one, in its own process, talking to the emulated API server through a kubeconfig.
The emulated kubelet runs each pod's container as the real llama-server (the args the Deployment carries, its
``/models`` mapped to the claim's folder) on the Service's cluster IP, so the real `ollama` client's requests
go through the gateway to the backend the way they would in a cluster.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest

from controller.runtime.kube_objects import BACKEND, INSTANCE, MANAGED_BY, backend_name
from controller.runtime.process import free_port
from tests.support.kubecluster import Cluster, emulated_cluster
from tests.support.ollama_checks import GEMMA, gemma_stream_embed_and_ps
from tests.support.server import ServeProcess, llama_server_or_skip, serve_processes

INSTANCE_NAME = "serve-test"
pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(tmp_path: Path, models_dir: Path) -> Iterator[Cluster]:
    binary = llama_server_or_skip()
    with emulated_cluster(tmp_path / "cluster", kubelet="real", binary=binary, volumes={"models": models_dir}) as made:
        yield made


def kube_config(tmp_path: Path, cluster: Cluster, models: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(tmp_path / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "models_dir": str(tmp_path / "none"),
        "runtime": {
            "kind": "kubernetes",
            "stop_timeout": 5,
            "kubernetes": {
                "kubeconfig": str(cluster.kubeconfig(tmp_path / "kubeconfig")),
                "instance": INSTANCE_NAME,
                "models": {"claim_name": "models", "mount_path": str(tmp_path / "models")},
            },
        },
        "edge": {"enabled": False},
        "defaults": {"ctx_size": 2048, "max_concurrent": 2, "startup_timeout": 60},
        "models": models,
    }


@pytest.fixture
def serve(tmp_path: Path, cluster: Cluster) -> Iterator[Callable[..., ServeProcess]]:
    """Every controller started is stopped; afterwards nothing of this instance may be left in the cluster."""
    with serve_processes(tmp_path) as start:
        yield start
    assert left(cluster) == [], "a clean stop must delete every Deployment, Service and Pod it made"


def left(cluster: Cluster) -> list[str]:
    ours = {MANAGED_BY: "llamacontroller", INSTANCE: INSTANCE_NAME}
    return [
        f"{kind}/{o['metadata']['name']}" for kind in ("Deployment", "Service", "Pod") for o in cluster.find(kind, ours)
    ]


def running_pods(cluster: Cluster, model: str) -> list[dict[str, Any]]:
    pods = cluster.find("Pod", {BACKEND: backend_name(INSTANCE_NAME, model)})
    return [p for p in pods if "deletionTimestamp" not in p["metadata"]]


def test_kubernetes_ollama_client_end_to_end_with_gemma(
    tmp_path: Path, serve: Callable[..., ServeProcess], cluster: Cluster, models_dir: Path, gemma_model: Path
) -> None:
    gemma = models_dir / gemma_model.name
    os.link(gemma_model, gemma)  # onto the "claim", without copying 253 MB
    models = {GEMMA: {"path": str(gemma)}, "a": {"path": str(models_dir / "a.gguf")}}
    served = serve(kube_config(tmp_path, cluster, models))
    with ollama.Client(host=served.url, headers=served.headers, timeout=120) as client:
        reply = client.chat(GEMMA, messages=[{"role": "user", "content": "Say hi."}], options={"num_predict": 8})
        assert reply.done and reply.message.content  # loaded on demand: a Deployment, a Service, a pod
        [pod] = running_pods(cluster, GEMMA)
        args = pod["spec"]["containers"][0]["args"]
        assert args[:2] == ["--model", f"/models/{gemma.name}"]
        gemma_stream_embed_and_ps(client)  # embeddings: a new Deployment with --embeddings
        client.chat("a", messages=[{"role": "user", "content": "x"}], options={"num_predict": 2})  # a switch
        assert [o["metadata"]["name"] for o in cluster.find("Deployment")] == [backend_name(INSTANCE_NAME, "a:latest")]
        # The pod's own output, followed through the API into the model's log.
        deadline = time.monotonic() + 10
        while "print_timing" not in (logs := served.http.get("/control/v1/models/a/logs").text):
            assert time.monotonic() < deadline, logs[-500:]
            time.sleep(0.1)
        client.generate("a", keep_alive=0)  # unload: Deployment, Service and pod deleted
    assert left(cluster) == []


def test_kubernetes_crash_fails_fast_and_the_next_request_starts_a_new_pod(
    tmp_path: Path, serve: Callable[..., ServeProcess], cluster: Cluster, models_dir: Path
) -> None:
    served = serve(kube_config(tmp_path, cluster, {"a": {"path": str(models_dir / "a.gguf")}}))
    assert served.http.post("/control/v1/models/a/load").status_code == 200
    [first] = running_pods(cluster, "a:latest")
    cluster.kill(first["metadata"]["name"])
    killed = time.monotonic()
    while (state := served.http.get("/control/v1/models/a").json())["state"] != "failed":
        assert time.monotonic() - killed < 3, state
        time.sleep(0.02)
    assert "llama-server exited (signal 9" in state["error"]
    answer = served.http.post(
        "/api/generate", json={"model": "a", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
    )
    assert answer.status_code == 200
    [second] = running_pods(cluster, "a:latest")
    assert second["metadata"]["name"] != first["metadata"]["name"]


def test_kubernetes_restarted_controller_adopts_instead_of_duplicating(
    tmp_path: Path, serve: Callable[..., ServeProcess], cluster: Cluster, models_dir: Path
) -> None:
    config = kube_config(tmp_path, cluster, {"a": {"path": str(models_dir / "a.gguf"), "keep_alive": -1}})
    first = serve(config, name="first")
    assert first.http.post("/control/v1/models/a/load").status_code == 200
    [pod] = running_pods(cluster, "a:latest")
    first.process.send_signal(signal.SIGKILL)  # nothing cleaned up: the next controller finds it
    first.process.wait()
    second = serve(config, name="second")
    [model] = [m for m in second.http.get("/control/v1/models").json()["models"] if m["name"] == "a"]
    assert model["adopted"] and model["state"] == "ready"
    answer = second.http.post(
        "/api/generate", json={"model": "a", "prompt": "x", "stream": False, "options": {"num_predict": 2}}
    )
    assert answer.status_code == 200
    assert [p["metadata"]["name"] for p in running_pods(cluster, "a:latest")] == [pod["metadata"]["name"]]
