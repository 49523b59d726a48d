"""How the kubernetes runtime realises a LaunchSpec: a Deployment and a ClusterIP Service (pure), and what a
pod's status says about a backend that will not serve (pure).

Names and labels: Kubernetes names are DNS labels and label values allow no ``:``, so a model such as
``gemma3:270m`` becomes ``llama-gemma3-270m-<hash>`` (the hash keeps ``a:b`` and ``a-b`` apart, and two
controllers in one namespace apart) and its exact name travels in an annotation.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import BackendStartFailed
from controller.runtime.base import GpuSelection, LaunchSpec, Placement, RuntimeSetup
from controller.runtime.contract import (
    API_KEY_ENV,
    BACKEND_UID,
    MODELS_MOUNT,
    PORT,
    container_args,
    name_digest,
    realisation_hash,
    slug,
)

GROUP = "llamacontroller.io"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "llamacontroller"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
INSTANCE, MODEL, SPEC = f"{GROUP}/instance", f"{GROUP}/model", f"{GROUP}/spec"
BACKEND, RUN, REALISED = f"{GROUP}/backend", f"{GROUP}/run", f"{GROUP}/realisation"
MODEL_NAME, REQUIREMENTS = f"{GROUP}/model-name", f"{GROUP}/requirements"  # annotations: any text
CONTAINER = "llama-server"
API_KEY_ITEM = "api-key"  # the item of the backend's Secret that holds its key
STARTUP_PERIOD = 2  # seconds between startup probes: a ready backend is noticed within this long
# Waiting reasons after which the kubelet will not get the container running by itself soon.
FAILED_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class PodPlanSettings:
    """The runtime's settings with the model's own (``container``, ``kubernetes``) over them."""

    image: str
    image_pull_policy: str
    image_pull_secrets: tuple[str, ...]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    requests: dict[str, str]
    limits: dict[str, str]
    runtime_class_name: str | None
    gpu_resource: str
    gpu_count: int
    memory: int | None
    shm_size: int | None
    env: dict[str, str]
    service_account: str | None
    claim_name: str | None
    host_path: str | None
    sub_path: str
    mount_path: Path
    liveness_period: float
    startup_timeout: float
    stop_timeout: float

    def realisation(self) -> str:
        """How the pod is run (what the spec hash does not cover): a leftover realised otherwise is not adopted."""
        payload = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        return realisation_hash(payload)


@dataclass(frozen=True)
class BackendObjects:
    name: str
    deployment: dict[str, Any]
    service: dict[str, Any]
    secret: dict[str, Any] | None = field(default=None, repr=False)  # the backend's API key, when it has one


def settings_for(setup: RuntimeSetup, placement: Placement) -> PodPlanSettings:
    """``runtime.kubernetes`` with the model's own settings over it."""
    base = setup.settings.kubernetes
    container, pod, startup = placement.container, placement.pod, placement.startup_timeout
    return PodPlanSettings(
        image=(container.image if container and container.image else None) or base.image,
        image_pull_policy=base.image_pull_policy,
        image_pull_secrets=tuple(base.image_pull_secrets),
        node_selector={**base.node_selector, **(pod.node_selector if pod else {})},
        tolerations=[*base.tolerations, *(pod.tolerations if pod else [])],
        requests={**base.resources.requests, **(pod.resources.requests if pod else {})},
        limits={**base.resources.limits, **(pod.resources.limits if pod else {})},
        runtime_class_name=(pod.runtime_class_name if pod else None) or base.runtime_class_name,
        gpu_resource=base.gpu_resource,
        gpu_count=_first_set(pod.gpu_count if pod else None, base.gpu_count, 0),
        memory=container.memory if container and container.memory is not None else None,
        shm_size=container.shm_size if container and container.shm_size is not None else base.shm_size,
        env={**base.env, **(container.env if container else {})},
        service_account=base.service_account,
        claim_name=base.models.claim_name,
        host_path=base.models.host_path,
        sub_path=base.models.sub_path,
        mount_path=base.models.mount_path,
        liveness_period=base.liveness_period,
        startup_timeout=startup if startup is not None else setup.defaults.startup_timeout,
        stop_timeout=setup.settings.stop_timeout,
    )


def _first_set(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def owner_reference(deployment: dict[str, Any]) -> dict[str, Any]:
    """A reference to the controller's own Deployment: it outlives controller pods, not the release."""
    metadata = deployment["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": False,
        "blockOwnerDeletion": False,
    }


def gpu_count(gpus: GpuSelection, configured: int) -> int:
    """GPUs to ask the scheduler for: a list names devices (Kubernetes picks which, so its length counts)."""
    if gpus == "none":
        return 0
    if isinstance(gpus, tuple):
        return len(gpus)
    return configured


def backend_name(instance: str, model: str) -> str:
    """A DNS-1035 label (Service names must be one): starts with a letter, at most 63 characters."""
    return f"llama-{slug(model, dns_label=True)[:48].strip('-')}-{name_digest(instance, model)}"


def owned_labels(instance: str) -> dict[str, str]:
    """What every object of this controller carries: the selector for listing, watching, cleaning up."""
    return {MANAGED_BY: MANAGER, INSTANCE: instance_label(instance)}


def instance_label(instance: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_.-]+", "-", instance)[:63].strip("-_.")
    return text or "default"


def path_in_pod(path: Path, settings: PodPlanSettings) -> str:
    """Where llama-server finds ``path`` in its pod: the same place under the models volume."""
    try:
        relative = path.relative_to(settings.mount_path)
    except ValueError:
        raise BackendStartFailed(
            f"{path} is outside runtime.kubernetes.models.mount_path ({settings.mount_path}): backend pods see "
            "only the models volume, so every model file must be under it"
        ) from None
    return str(PurePosixPath(MODELS_MOUNT) / PurePosixPath(relative.as_posix()))


def plan(
    spec: LaunchSpec, settings: PodPlanSettings, instance: str, run: str, owner: dict[str, Any] | None = None
) -> BackendObjects:
    """The Deployment and Service for one backend; ``run`` marks this start's pods apart from a previous one's.
    ``owner`` (an ownerReference): when that object is deleted (helm uninstall), Kubernetes deletes these too."""
    name = backend_name(instance, spec.model)
    args = container_args(spec, lambda path: path_in_pod(path, settings))
    labels = {
        **owned_labels(instance),
        NAME_LABEL: "llama-server",
        COMPONENT: "model-backend",
        MODEL: slug(spec.model, dns_label=True)[:63].strip("-"),
        SPEC: spec.spec_hash,
        REALISED: settings.realisation(),
        BACKEND: name,
    }
    annotations = {MODEL_NAME: spec.model, REQUIREMENTS: json.dumps(dict(spec.labels), sort_keys=True)}
    metadata: dict[str, Any] = {"name": name, "labels": labels, "annotations": annotations}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    pod_labels = {**owned_labels(instance), BACKEND: name, RUN: run, MODEL: labels[MODEL]}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # never two backends of one model
            "selector": {"matchLabels": {BACKEND: name}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {MODEL_NAME: spec.model}},
                "spec": _pod_spec(spec, settings, args, name),
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": {BACKEND: name},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    secret = None
    if spec.api_key:
        # A Secret, not a plain env value: those who may read Deployments (a "view" role) may not read Secrets.
        encoded = base64.b64encode(spec.api_key.encode()).decode()
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque"}
        secret["data"] = {API_KEY_ITEM: encoded}
    return BackendObjects(name, deployment, service, secret)


def _pod_spec(spec: LaunchSpec, settings: PodPlanSettings, args: list[str], name: str) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    values = sorted({**settings.env, **spec.env}.items())
    env: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in values]
    if spec.api_key:  # from the backend's Secret: never in the Deployment, nor on llama-server's command line
        secret = {"name": name, "key": API_KEY_ITEM}
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": secret}})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": args,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(spec.gpus, settings),
        # Loading a model takes up to startup_timeout; liveness starts only after the startup probe passed.
        "startupProbe": {
            **probe,
            "periodSeconds": STARTUP_PERIOD,
            "failureThreshold": max(1, math.ceil(settings.startup_timeout / STARTUP_PERIOD)),
        },
        "livenessProbe": {**probe, "periodSeconds": max(1, round(settings.liveness_period)), "failureThreshold": 3},
        "readinessProbe": {**probe, "periodSeconds": 5},
        "volumeMounts": [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if not container["env"]:
        del container["env"]
    # The root file system is read-only: /tmp is the one writable place (CUDA's caches, should it want one).
    volumes: list[dict[str, Any]] = [{"name": "models", **_models_source(settings)}, {"name": "tmp", "emptyDir": {}}]
    container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})  # noqa: S108 - the pod's own
    if settings.sub_path:
        container["volumeMounts"][0]["subPath"] = settings.sub_path
    if settings.shm_size:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": str(settings.shm_size)}})
        container["volumeMounts"].append({"name": "shm", "mountPath": "/dev/shm"})  # noqa: S108 - the pod's own
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": max(1, math.ceil(settings.stop_timeout)),
        "automountServiceAccountToken": False,  # llama-server never talks to the API
        "enableServiceLinks": False,  # no environment variable per Service in the namespace
        "securityContext": {"runAsNonRoot": True, "runAsUser": BACKEND_UID, "runAsGroup": BACKEND_UID},
    }
    optional = {
        "nodeSelector": settings.node_selector,
        "tolerations": settings.tolerations,
        "runtimeClassName": settings.runtime_class_name,
        "serviceAccountName": settings.service_account,
        "imagePullSecrets": [{"name": secret} for secret in settings.image_pull_secrets],
    }
    pod.update({key: value for key, value in optional.items() if value})
    return pod


def _resources(gpus: GpuSelection, settings: PodPlanSettings) -> dict[str, dict[str, str]]:
    limits = dict(settings.limits)
    if settings.memory is not None:
        limits["memory"] = str(settings.memory)
    count = gpu_count(gpus, settings.gpu_count)
    if count:
        limits[settings.gpu_resource] = str(count)  # extended resources: the request defaults to the limit
    resources = {"requests": dict(settings.requests), "limits": limits}
    return {key: value for key, value in resources.items() if value}


def _models_source(settings: PodPlanSettings) -> dict[str, Any]:
    if settings.claim_name is not None:
        return {"persistentVolumeClaim": {"claimName": settings.claim_name, "readOnly": True}}
    return {"hostPath": {"path": settings.host_path, "type": "Directory"}}


# ---------------------------------------------------------------------------------------------- pod status


@dataclass(frozen=True)
class PodVerdict:
    """What one pod's status means for its backend: ``failed`` with why, and whether it runs now."""

    failed: str | None
    exit_code: int | None = None
    running: bool = False
    unschedulable: bool = False  # may clear by itself (a cluster autoscaler adding a node)


def judge_pod(pod: dict[str, Any]) -> PodVerdict:
    """A pod's status → a failure reason a person can act on, or None while it is (or may become) fine.

    A backend that has stopped once is failed even though the kubelet would restart it: the controller
    restarts it itself, on demand and with backoff, as with every other runtime.
    """
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
            message = str(condition.get("message") or "no node fits the pod")
            return PodVerdict(f"no node can run it: {message.strip()}", unschedulable=True)
    if status.get("phase") == "Failed":
        reason = status.get("reason") or "Failed"
        return PodVerdict(f"the pod failed ({reason}): {status.get('message') or 'no message'}")
    for container in status.get("containerStatuses") or []:
        if container.get("name") != CONTAINER:
            continue
        state = container.get("state") or {}
        terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated")
        if terminated:
            return PodVerdict(_terminated_reason(terminated), terminated.get("exitCode"))
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FAILED_WAITING:
            message = waiting.get("message") or ""
            return PodVerdict(f"{waiting['reason']}: {message}".rstrip(": "))
        return PodVerdict(None, running="running" in state)
    return PodVerdict(None)


def _terminated_reason(terminated: dict[str, Any]) -> str:
    code = terminated.get("exitCode")
    reason = terminated.get("reason") or ""
    if reason == "OOMKilled":
        return "out of memory: llama-server exceeded its pod's memory limit and was killed (OOMKilled)"
    signal = terminated.get("signal")
    detail = f"exit code {code}" if signal is None else f"signal {signal}"
    message = str(terminated.get("message") or "").strip()
    return f"llama-server exited ({detail}{', ' + reason if reason else ''}){': ' + message if message else ''}"
