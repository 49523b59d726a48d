"""How the docker runtime realises a LaunchSpec as a container: names, labels, mounts, devices (pure), and
where Docker SDK exceptions become ours (``map_docker_errors``, used only around SDK calls).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import BackendStartFailed, DockerUnavailable
from controller.config_schema import ContainerSettings, DockerConfig
from controller.runtime import contract
from controller.runtime.base import GpuSelection, LaunchSpec, Placement
from controller.runtime.contract import (
    API_KEY_ENV,
    BACKEND_UID,
    DEFAULT_IMAGE,
    MODELS_MOUNT,
    container_args,
    name_digest,
    slug,
)

LABEL = "io.llamacontroller"
MANAGED, MODEL, SPEC, INSTANCE = f"{LABEL}.managed", f"{LABEL}.model", f"{LABEL}.spec", f"{LABEL}.instance"
REALISED, REQUIREMENTS = f"{LABEL}.container", f"{LABEL}.requirements"
MMPROJ_MOUNT = "/mmproj"  # a projector in another directory than its model's
NVIDIA_TOOLKIT_HELP = (
    "the Docker engine has no NVIDIA runtime, so it cannot give GPUs to containers: install the NVIDIA Container "
    "Toolkit on the host (nvidia-ctk runtime configure --runtime=docker, then restart dockerd), or set gpus: none "
    "for this model (CPU only)"
)


@dataclass(frozen=True)
class ContainerPlan:
    """Everything ``containers.create`` gets for one model."""

    name: str
    image: str
    command: list[str]
    labels: dict[str, str]
    environment: dict[str, str]
    mounts: list[tuple[str, str]]  # (host path, container path), read-only
    gpus: GpuSelection
    memory: int | None
    shm_size: int | None
    ulimits: dict[str, int] = field(default_factory=dict)
    user: str = f"{BACKEND_UID}:{BACKEND_UID}"


def container_name(instance: str, model: str) -> str:
    """The slug alone is not unique (``a:b-c`` and ``a-b:c`` both read ``a-b-c``): a short hash of the canonical
    name keeps them apart, as kube_objects.backend_name does. Only for people reading ``docker ps``: adoption
    goes by labels, so containers named the older way (no hash) are still adopted or removed."""
    return f"llamacontroller-{instance[:8]}-{slug(model, dns_label=False)}-{name_digest(instance, model)}"


def settings_for(base: DockerConfig, placement: Placement) -> ContainerSettings:
    """``runtime.docker`` with the model's own ``container`` settings over it."""
    override = placement.container
    merged = ContainerSettings(
        image=base.image, memory=base.memory, shm_size=base.shm_size, ulimits=base.ulimits, env=base.env
    )
    if override is None:
        return merged
    return merged.model_copy(
        update={
            "image": override.image or merged.image,
            "memory": override.memory if override.memory is not None else merged.memory,
            "shm_size": override.shm_size if override.shm_size is not None else merged.shm_size,
            "ulimits": {**merged.ulimits, **override.ulimits},
            "env": {**merged.env, **override.env},
            "user": override.user,
        }
    )


def host_path(path: Path, path_map: Mapping[str, str]) -> str:
    """``path`` as the Docker host sees it (the controller may see the models at another place)."""
    text = str(path)
    for inside, outside in sorted(path_map.items(), key=lambda item: -len(item[0])):
        if text == inside or text.startswith(inside.rstrip("/") + "/"):
            return outside.rstrip("/") + text[len(inside.rstrip("/")) :]
    return text


def plan(spec: LaunchSpec, settings: ContainerSettings, instance: str, path_map: Mapping[str, str]) -> ContainerPlan:
    """A model's directory is mounted read-only (never ``/``); llama-server reads the file from there, and a
    projector in another directory from a second mount."""
    mounts = [(host_path(spec.model_file.parent, path_map), MODELS_MOUNT)]
    if spec.mmproj is not None and spec.mmproj.parent != spec.model_file.parent:
        mounts.append((host_path(spec.mmproj.parent, path_map), MMPROJ_MOUNT))

    def seen_as(path: Path) -> str:
        return str(PurePosixPath(MODELS_MOUNT if path.parent == spec.model_file.parent else MMPROJ_MOUNT) / path.name)

    image = settings.image or DEFAULT_IMAGE
    labels = {
        MANAGED: "true",
        MODEL: spec.model,
        SPEC: spec.spec_hash,
        INSTANCE: instance,
        REQUIREMENTS: json.dumps(dict(spec.labels), sort_keys=True),
    }
    labels[REALISED] = realisation_hash(settings)
    return ContainerPlan(
        name=container_name(instance, spec.model),
        image=image,
        command=container_args(spec, seen_as),
        labels=labels,
        environment={**settings.env, **spec.env, **api_key_env(spec)},
        mounts=mounts,
        gpus=spec.gpus,
        memory=settings.memory,
        shm_size=settings.shm_size,
        ulimits=dict(settings.ulimits),
        user=settings.user or f"{BACKEND_UID}:{BACKEND_UID}",
    )


def api_key_env(spec: LaunchSpec) -> dict[str, str]:
    """llama-server reads its API key from the environment too: there it stays out of the argv that every
    user of the host sees in ``ps`` (a container's processes are the host's). ``docker inspect`` shows it, to
    those who hold the Docker socket, who own the host anyway."""
    return {API_KEY_ENV: spec.api_key} if spec.api_key else {}


def realisation_hash(settings: ContainerSettings) -> str:
    """How the container is run (image, resources, its own environment) — what the spec hash does not cover:
    a leftover realised otherwise is not adopted."""
    payload: list[Any] = [settings.image, settings.memory, settings.shm_size, sorted(settings.ulimits.items())]
    payload.append(sorted(settings.env.items()))
    if settings.user is not None:  # only when set: the default keeps the hashes of containers made before it
        payload.append(settings.user)
    return contract.realisation_hash(payload)


def device_request_kwargs(gpus: GpuSelection, engine_has_nvidia: bool) -> list[dict[str, Any]]:
    """Arguments of docker.types.DeviceRequest for ``gpus``: auto asks for every GPU only where it can."""
    if gpus == "none" or (gpus == "auto" and not engine_has_nvidia):
        return []
    if gpus in ("all", "auto"):
        return [{"count": -1, "capabilities": [["gpu"]]}]
    return [{"device_ids": [str(gpu) for gpu in gpus], "capabilities": [["gpu"]]}]


def exit_reason(code: int | None, oom: bool, memory: int | None) -> str | None:
    """The out-of-memory case in words; None for the rest (exits.describe_exit words those)."""
    if not oom:
        return None
    limit = f" of {memory / 2**20:.0f} MiB" if memory else ""
    return f"out of memory: llama-server exceeded the container's memory limit{limit} and was killed"


@contextmanager
def map_docker_errors(action: str) -> Iterator[None]:
    """Docker SDK (and its HTTP layer) failures as our errors, with what to do about them."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise BackendStartFailed(f"{action}: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        text = str(exc.explanation or exc)
        if "could not select device driver" in text:
            raise BackendStartFailed(f"{action}: {NVIDIA_TOOLKIT_HELP}") from exc
        if exc.status_code == 409 and "already in use" in text:
            raise BackendStartFailed(
                f"{action}: {text}. A container of that name exists that this controller does not manage "
                "(another controller, or a hand-made one): remove it (docker rm -f NAME) or give this "
                "controller another data dir"
            ) from exc
        if "port is already allocated" in text or "address already in use" in text:
            raise BackendStartFailed(f"{action}: a port is taken: {text}") from exc
        raise BackendStartFailed(f"{action}: the Docker engine refused: {text}") from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        text = str(exc)
        if "Permission denied" in text or isinstance(exc, PermissionError):
            raise DockerUnavailable(
                f"{action}: permission denied on the Docker socket: run the controller as a member of the "
                "docker group, or give its container the socket's group (compose: group_add)"
            ) from exc
        raise DockerUnavailable(
            f"{action}: the Docker engine does not answer ({text[:200]}): is dockerd running? "
            "(DOCKER_HOST or runtime.docker.base_url say where it is)"
        ) from exc
