"""compose.yaml for real: brought up on the local engine with the images built here, the real `ollama` client
over HTTPS through the edge and the gateway services with a token made the documented way (`docker compose exec
controller llamacontroller token create`), Gemma 3 270M in a model container, a controller that is killed (the
gateway serves the loaded model meanwhile) and comes back adopting its model (not duplicating it), a controller
restarted (its model container kept), and a teardown that leaves nothing behind.

The compose v2 plugin cannot be installed on these machines; Debian's docker-compose 1.29 reads the same
Compose Specification file (scripts/system-deps.sh installs it). The file has no v1-only keys."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import ollama
import pytest
from docker.models.containers import Container

from controller.runtime.containers import MANAGED
from controller.runtime.process import free_port
from tests.docker.conftest import images_source
from tests.support.local_images import build_redis_image
from tests.support.server import require

ROOT = images_source()


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    require(found is not None, "neither `docker compose` nor docker-compose is installed (scripts/system-deps.sh)")
    assert found is not None
    return [found]


@dataclass
class Project:
    command: list[str]
    env_file: Path
    override: Path
    name: str
    https_port: int

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(ROOT / "compose.yaml"), "-f", str(self.override)]
        result = subprocess.run(
            [*self.command, "--env-file", str(self.env_file), *files, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"


def wait_until(check: Callable[[], object], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError, ValueError):  # ValueError: the edge's empty 502 while the app restarts
            pass
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds:.0f} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory,
    engine: docker.DockerClient,
    gemma_model: Path,
    llama_server_image: str,
    app_image: str,
    edge_image: str,
) -> Iterator[Project]:
    command = compose_command()
    redis_image = build_redis_image(engine)
    folder = tmp_path_factory.mktemp("compose")
    models = folder / "models"
    models.mkdir()
    shutil.copy(gemma_model, models / "gemma3-270m.gguf")
    name = f"lc-compose-{secrets.token_hex(3)}"
    password = secrets.token_hex(16)
    https_port = free_port()
    settings = {
        "MODELS_DIR": str(models),
        "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
        "REDIS_PASSWORD": password,
        "HTTPS_PORT": str(https_port),
        "HTTP_PORT": str(free_port()),
        "GPUS": "none",
        "APP_IMAGE": app_image,
        "EDGE_IMAGE": edge_image,
        "LLAMA_SERVER_IMAGE": llama_server_image,
        "REDIS_IMAGE": redis_image,
        "COMPOSE_PROJECT_NAME": name,
        "COMPOSE_NETWORK": name,
    }
    env_file = folder / ".env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    # Test only: the Redis image here is Debian's redis-server FROM scratch, whose entrypoint is the server
    # itself; the official image's `command` in compose.yaml starts with "redis-server". Same flags.
    override = folder / "override.yaml"
    override.write_text(
        "services:\n  redis:\n    entrypoint: ['/usr/bin/redis-server']\n"
        f"    command: ['--bind', '0.0.0.0', '--dir', '/data', '--appendonly', 'yes', '--requirepass', '{password}']\n"
    )
    chosen = Project(command, env_file, override, name, https_port)
    try:
        chosen.run("up", "-d")
        wait_until(lambda: httpx.get(f"{chosen.url}/readyz", verify=False).status_code == 200, 120, "the edge")
        yield chosen
    finally:
        chosen.run("down", "-v", "--remove-orphans", check=False)
        leftovers = engine.containers.list(all=True, filters={"label": f"com.docker.compose.project={name}"})
        leftovers += engine.containers.list(all=True, filters={"label": f"{MANAGED}=true", "network": name})
        for container in leftovers:
            container.remove(force=True)
        for volume in engine.volumes.list(filters={"label": f"com.docker.compose.project={name}"}):
            volume.remove(force=True)
        for network in engine.networks.list(names=[name]):
            network.remove()


def exec_controller(project: Project, *args: str) -> str:
    return project.run("exec", "-T", "controller", "llamacontroller", *args).stdout


@pytest.fixture(scope="module")
def access(project: Project) -> tuple[str, ssl.SSLContext]:
    """A token and trust in the edge's local CA, made the way docs/deployment.md says."""
    scopes = ("--scope", "inference", "--scope", "models:manage")  # the load below needs the second
    output = exec_controller(project, "token", "create", "--name", "compose-test", *scopes)
    token = re.findall(r"lc_[A-Za-z0-9_-]+", output)[-1]
    pem = exec_controller(project, "edge", "ca")
    assert "BEGIN CERTIFICATE" in pem
    return token, ssl.create_default_context(cadata=pem)


SEEN: set[str] = set()  # every model container this module saw, to be gone after `down`


def model_containers(engine: docker.DockerClient, project: Project) -> list[str]:
    found = engine.containers.list(filters={"label": f"{MANAGED}=true", "network": project.name})
    SEEN.update(container.id for container in found)
    return sorted(container.id for container in found)


def test_compose_first_start_keeps_the_admin_password_out_of_the_log(project: Project) -> None:
    logs = project.run("logs", "controller").stdout
    assert len(re.findall(r"created user 'admin'; its password is in /data/initial-admin-password", logs)) == 1
    password = exec_controller(project, "user", "first-password").strip()
    assert len(password) >= 16 and password not in logs
    assert "HTTPS (Caddy edge): edge listening on 0.0.0.0:443 (its published port)" in logs, "not 127.0.0.1"


def test_compose_ollama_client_over_https(project: Project, access: tuple[str, ssl.SSLContext]) -> None:
    token, trust = access
    with ollama.Client(host=project.url, verify=trust, headers={"Authorization": f"Bearer {token}"}) as client:
        names = [model.model for model in client.list().models]
        assert names == ["gemma3-270m:latest"]
        options = {"num_predict": 8, "temperature": 0}
        reply = client.chat(names[0], messages=[{"role": "user", "content": "Say hi."}], options=options)
        assert reply.message.content and reply.done
        pieces = list(client.chat(names[0], messages=[{"role": "user", "content": "Hi"}], options=options, stream=True))
        assert len(pieces) > 1 and pieces[-1].done
        embedded = client.embed(names[0], input=["one", "two"])
        assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) > 100
        assert [m.model for m in client.ps().models] == names
    refused = httpx.get(f"{project.url}/api/tags", verify=trust)
    assert refused.status_code == 401 and "error" in refused.json()


def test_compose_controller_killed_comes_back_and_adopts_its_model(
    project: Project, access: tuple[str, ssl.SSLContext], engine: docker.DockerClient
) -> None:
    token, trust = access
    headers = {"Authorization": f"Bearer {token}"}
    loaded = httpx.post(f"{project.url}/control/v1/models/gemma3-270m/load", headers=headers, verify=trust, timeout=300)
    assert loaded.status_code == 200, loaded.text
    before = model_containers(engine, project)
    assert len(before) == 1
    # A bounded reply: the question is whether the backend answers, not how long Gemma talks on a busy CPU.
    chat = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "Hi"}], "stream": False}
    chat["options"] = {"num_predict": 8}
    project.run("kill", "controller")  # SIGKILL: its model container keeps running
    meanwhile = httpx.post(f"{project.url}/api/chat", json=chat, headers=headers, verify=trust, timeout=300)
    assert meanwhile.status_code == 200, "the gateway serves the loaded model without the controller"
    control = httpx.get(f"{project.url}/control/v1/models", headers=headers, verify=trust)
    assert control.status_code == 503 and "controller is not answering" in control.json()["error"]
    project.run("up", "-d", "controller")
    wait_until(
        lambda: httpx.get(f"{project.url}/api/ps", headers=headers, verify=trust).json().get("models"), 90, "adoption"
    )
    assert model_containers(engine, project) == before, "adopted, not started again"
    reply = httpx.post(f"{project.url}/api/chat", json=chat, headers=headers, verify=trust, timeout=300)
    assert reply.status_code == 200 and model_containers(engine, project) == before

    # A restart (SIGTERM) while the gateway runs is not a teardown: the model container stays for the next one.
    project.run("restart", "controller")
    model_url = f"{project.url}/control/v1/models/gemma3-270m"
    # Until the new controller answers, the gateway says 503 ({"error": ...}): no "adopted" in it.
    wait_until(
        lambda: httpx.get(model_url, headers=headers, verify=trust).json().get("adopted"),
        90,
        "adoption after a restart",
    )
    assert model_containers(engine, project) == before, "kept through the restart, then adopted"
    reply = httpx.post(f"{project.url}/api/chat", json=chat, headers=headers, verify=trust, timeout=300)
    assert reply.status_code == 200


def test_compose_model_containers_reach_neither_the_edge_nor_the_store_and_logs_rotate(
    project: Project, access: tuple[str, ssl.SSLContext], engine: docker.DockerClient
) -> None:
    """A compromised llama-server must not reconfigure Caddy (its admin API has no authentication) nor read Redis:
    model containers join the models' network only; the edge and Redis each share one network with the controller."""
    token, trust = access
    headers = {"Authorization": f"Bearer {token}"}
    loaded = httpx.post(f"{project.url}/control/v1/models/gemma3-270m/load", headers=headers, verify=trust, timeout=300)
    assert loaded.status_code == 200, loaded.text

    def networks(container: Container) -> set[str]:
        return set(container.attrs["NetworkSettings"]["Networks"])

    def service(name: str) -> Container:
        label = f"com.docker.compose.service={name}"
        [found] = engine.containers.list(filters={"label": [f"com.docker.compose.project={project.name}", label]})
        return found

    [model] = engine.containers.list(filters={"label": f"{MANAGED}=true", "network": project.name})
    SEEN.add(model.id)
    assert networks(model) == {project.name}
    assert networks(service("edge")) == {f"{project.name}_edge"}
    assert networks(service("redis")) == {f"{project.name}_store"}
    assert networks(service("controller")) == {project.name, f"{project.name}_edge", f"{project.name}_store"}
    assert networks(service("gateway")) == {project.name, f"{project.name}_edge", f"{project.name}_store"}
    for name in ("edge", "controller", "gateway", "redis"):  # and each one's log is rotated
        logging = service(name).attrs["HostConfig"]["LogConfig"]
        assert logging == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}, (name, logging)


def test_compose_down_leaves_nothing_behind(project: Project, engine: docker.DockerClient) -> None:
    """Last in this module: `down` stops the gateway, then the controller — which, its gateways gone, takes it for
    a teardown and removes its model containers —, then the services and the network; the named volumes stay
    until `down -v`."""
    project.run("down")
    label = f"com.docker.compose.project={project.name}"
    assert engine.containers.list(all=True, filters={"label": label}) == []
    remaining = {container.id for container in engine.containers.list(all=True)}
    assert SEEN and not SEEN & remaining, "the controller removed its model containers when it stopped"
    assert engine.networks.list(names=[project.name]) == []
    volumes = [v.name for v in engine.volumes.list(filters={"label": label})]
    assert sorted(volumes) == sorted(f"{project.name}_{v}" for v in ("controller-data", "edge-data", "redis-data"))
    project.run("down", "-v")
    assert engine.volumes.list(filters={"label": label}) == []
