"""The controller's own image in a container: with the Docker socket mounted (testcontainers) it starts a model
container on its user-defined network and reaches it by name — the compose shape; with a kubeconfig it runs
the kubernetes runtime — the Helm shape."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from pathlib import Path

import docker
import httpx
import yaml
from testcontainers.core.container import DockerContainer
from testcontainers.core.wait_strategies import HttpWaitStrategy

from controller.config import validate_config
from controller.runtime.containers import MANAGED
from controller.runtime.kube_objects import backend_name
from controller.runtime.process import free_port
from llamacontroller import images
from tests.support.kubecluster import emulated_cluster
from tests.support.server import llama_server_or_skip, provision_token


def test_controller_in_a_container_reaches_its_backends_by_name(
    tmp_path: Path, tiny_model: Path, engine: docker.DockerClient, app_image: str, llama_server_image: str
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "tiny.gguf")
    data = tmp_path / "data"
    config = {
        "models_dir": "/models",
        "runtime": {"kind": "docker", "docker": {"path_map": {"/models": str(models)}}},
        "edge": {"enabled": False},
        "defaults": {"ctx_size": 1024, "max_concurrent": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # The token is made on the host, in the data dir the container will use (as `token create` would).
    token = asyncio.run(provision_token(validate_config({**config, "server": {"data_dir": str(data)}})))
    for folder in [data, *data.rglob("*")]:
        os.chown(folder, images.APP_USER, images.APP_USER)
    network = engine.networks.create(f"lc-test-{secrets.token_hex(4)}", driver="bridge")
    socket_group = os.stat("/var/run/docker.sock").st_gid
    controller = (
        DockerContainer(app_image)
        .with_env("LLAMACONTROLLER_CONFIG", "/etc/llamacontroller/config.yaml")
        .with_volume_mapping(str(tmp_path / "config.yaml"), "/etc/llamacontroller/config.yaml", "ro")
        .with_volume_mapping(str(models), "/models", "ro")
        .with_volume_mapping(str(data), "/data", "rw")
        .with_volume_mapping("/var/run/docker.sock", "/var/run/docker.sock", "rw")
        .with_kwargs(network=network.name, group_add=[socket_group])
        .with_exposed_ports(11434)
        .waiting_for(HttpWaitStrategy(11434, "/readyz").for_status_code(200).with_startup_timeout(60))
    )
    try:
        with controller:
            url = f"http://{controller.get_container_host_ip()}:{controller.get_exposed_port(11434)}"
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                loaded = client.post("/control/v1/models/tiny/load")
                assert loaded.status_code == 200, loaded.text
                backend_url = loaded.json()["backend_url"]
                assert backend_url.startswith("http://llamacontroller-") and backend_url.endswith(":8080")
                backend = engine.containers.list(filters={"label": f"{MANAGED}=true"}, all=True)
                backend = [c for c in backend if backend_url[7:].startswith(c.name)]
                assert list(backend[0].attrs["NetworkSettings"]["Networks"]) == [network.name]
                assert backend[0].attrs["NetworkSettings"]["Ports"] == {"8080/tcp": None}  # nothing published
                chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}
                reply = client.post("/api/chat", json={**chat, "options": {"num_predict": 2}})
                assert reply.status_code == 200 and reply.json()["done"] is True
            controller.get_wrapped_container().stop(timeout=30)  # SIGTERM: a clean stop, as compose does
        left = [c.name for c in engine.containers.list(all=True, filters={"label": f"{MANAGED}=true"})]
        assert not [name for name in left if name == backend[0].name], "the controller's stop removed its backend"
    finally:
        for container in engine.containers.list(all=True, filters={"network": network.name}):
            container.remove(force=True)
        network.remove()


def test_controller_image_runs_the_kubernetes_runtime(
    tmp_path: Path, tiny_model: Path, engine: docker.DockerClient, app_image: str
) -> None:
    """The image the Helm chart runs, with `runtime.kind: kubernetes` against the emulated API server: it starts
    without a llama-server of its own, creates the model's Deployment and Service, serves through it, and
    deletes both when stopped. Host networking stands in for the pod network (the emulated cluster IPs are
    loopback addresses of this machine)."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_model, models / "tiny.gguf")
    data = tmp_path / "data"
    listen = f"127.0.0.1:{free_port()}"
    with emulated_cluster(
        tmp_path / "cluster", kubelet="real", binary=llama_server_or_skip(), volumes={"models": models}
    ) as cluster:
        kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
        kubeconfig.chmod(0o644)
        config = {
            "models_dir": "/models",
            "runtime": {
                "kind": "kubernetes",
                "stop_timeout": 5,
                "kubernetes": {
                    "kubeconfig": "/etc/llamacontroller/kubeconfig",
                    "instance": "image-test",
                    "models": {"claim_name": "models", "mount_path": "/models"},
                },
            },
            "edge": {"enabled": False},
            "defaults": {"ctx_size": 1024, "max_concurrent": 1},
        }
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        token = asyncio.run(provision_token(validate_config({**config, "server": {"data_dir": str(data)}})))
        for folder in [data, *data.rglob("*")]:
            os.chown(folder, images.APP_USER, images.APP_USER)
        controller = engine.containers.run(
            app_image,
            detach=True,
            network_mode="host",
            # The image sets server.listen through its environment (0.0.0.0:11434); on the host's network: a free port.
            environment={
                "LLAMACONTROLLER_CONFIG": "/etc/llamacontroller/config.yaml",
                "LLAMACONTROLLER_SERVER__LISTEN": listen,
            },
            volumes={
                str(tmp_path / "config.yaml"): {"bind": "/etc/llamacontroller/config.yaml", "mode": "ro"},
                str(kubeconfig): {"bind": "/etc/llamacontroller/kubeconfig", "mode": "ro"},
                str(models): {"bind": "/models", "mode": "ro"},
                str(data): {"bind": "/data", "mode": "rw"},
            },
        )
        try:
            url = f"http://{listen}"
            deadline = time.monotonic() + 60
            while not _answers(f"{url}/readyz"):
                controller.reload()
                assert controller.status == "running", controller.logs().decode(errors="replace")[-2000:]
                assert time.monotonic() < deadline, controller.logs().decode(errors="replace")[-2000:]
                time.sleep(0.2)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
                loaded = client.post("/control/v1/models/tiny/load")
                assert loaded.status_code == 200, loaded.text
                assert loaded.json()["backend_url"].startswith("http://127.77.")  # the Service's cluster IP
                assert [d["metadata"]["name"] for d in cluster.find("Deployment")] == [
                    backend_name("image-test", "tiny:latest")
                ]
                chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}
                reply = client.post("/api/chat", json={**chat, "options": {"num_predict": 2}})
                assert reply.status_code == 200 and reply.json()["done"] is True
            controller.stop(timeout=30)  # SIGTERM: the controller deletes what it created
            assert cluster.find("Deployment") == [] and cluster.find("Service") == [] and cluster.find("Pod") == []
        finally:
            controller.remove(force=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
