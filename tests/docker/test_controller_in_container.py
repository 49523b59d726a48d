"""The controller's own image in a container (testcontainers), the Docker socket mounted: it starts a model
container on its user-defined network and reaches it by name — the compose shape."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from pathlib import Path

import docker
import httpx
import yaml
from testcontainers.core.container import DockerContainer
from testcontainers.core.wait_strategies import HttpWaitStrategy

from controller import images
from controller.config import validate_config
from controller.runtime.containers import MANAGED
from tests.support.server import provision_token


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
