"""An emulated Kubernetes cluster for the kubernetes runtime's tests: no real API server can run here.

It speaks the API's JSON over real HTTP on 127.0.0.1 (create, get, list with label selectors, replace with the
resourceVersion precondition (409 Conflict), merge patch, delete with grace periods, watch streams with resource
versions and 410 Gone, pod logs) for Deployments, Services, Secrets, Pods and Leases (the leader election's), and
plays the parts of the rest of a cluster just enough to exercise the runtime:

- the deployment controller makes one Pod per Deployment, and deleting the Deployment deletes it;
- the scheduler places it on one of ``nodes`` nodes, or marks it Unschedulable when it asks for more
  ``nvidia.com/gpu`` than the cluster has free (with the scheduler's own wording);
- the kubelet builds the container's environment (values, and Secret items: a missing Secret is a
  CreateContainerConfigError) and either runs the container for real (``kubelet="real"``: the real
  llama-server binary, its ``/models`` path mapped to a host folder, listening on the cluster IP of the Service
  that selects the pod — kube-proxy's part, on a 127.x loopback address) or only reports it running
  (``kubelet="inert"``). A real container that exits is reported the way a kubelet does: terminated, then
  CrashLoopBackOff.

Pod logs are served line by line as a kubelet does, each line stamped with the time the API first served it
(``timestamps``, ``sinceTime``, ``sinceSeconds``: a line written while no one followed gets the time of its first
reading, which keeps "since" true for a client that resumes).

Faults are injected by the tests: ``set_container_state`` (OOMKilled, ImagePullBackOff...), ``end_container``
(an inert container exits: its log stream ends), ``compact`` (old resource versions answer 410 Gone),
``drop_watches`` (an API server restart, seen by clients), ``drop_logs`` (every open log stream broken off),
``refuse_deletes`` (the next deletes of a kind answer 500), ``keep_pods_terminating`` (a deleted pod stays, as
on a node that no longer answers, until ``let_pods_go``), ``log_delay`` (each chunk of a log stream comes that
many seconds late) and ``create_delays`` (a create of a kind takes that long).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.server import answers

ROUTES = {  # (api prefix, plural) → kind
    ("api/v1", "pods"): "Pod",
    ("api/v1", "services"): "Service",
    ("api/v1", "secrets"): "Secret",
    ("apis/apps/v1", "deployments"): "Deployment",
    ("apis/coordination.k8s.io/v1", "leases"): "Lease",
}
GROUPS = {"Deployment": "apps", "Lease": "coordination.k8s.io"}  # the API group each kind's messages name
GPU = "nvidia.com/gpu"
STARTUP_SECONDS = 600  # the longest a real container is given to answer /health


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def rfc3339_nano(nanos: int) -> str:
    """As the kubelet writes a log line's time: RFC 3339 in UTC with up to nine digits, trailing zeros dropped."""
    whole = datetime.fromtimestamp(nanos // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos % 10**9:09d}".rstrip("0")
    return f"{whole}.{fraction}Z" if fraction else f"{whole}Z"


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def parse_selector(text: str) -> dict[str, str]:
    """Equality-based selectors (``a=b,c=d``) — the only kind the runtime uses."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    return {key.rstrip("="): value.lstrip("=") for key, value in pairs}


@dataclass
class Container:
    process: subprocess.Popen[bytes] | None
    log_path: Path
    gpus: int = 0
    stopping: bool = False
    ended: bool = False  # an inert container that exited (end_container): its log stream ends


@dataclass
class Cluster:
    kubelet: str = "inert"  # "real": run llama-server; "inert": only report it running
    binary: str | None = None  # llama-server, for kubelet="real"
    volumes: dict[str, Path] = field(default_factory=dict)  # claim name or hostPath → the folder it holds
    gpus: int = 0
    nodes: int = 3
    work_dir: Path = Path("/tmp")
    start_delay: float = 0.05  # seconds between scheduling and the container running (inert)
    forbidden: bool = False  # answer 403 to everything, as an API server does to a service account without RBAC

    def __post_init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (kind, namespace, name) → object
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (version, kind, type, object)
        self.oldest = 0  # versions at or below this answer 410 Gone
        self.version = itertools.count(100)
        self.last_version = 100
        self.changed = threading.Condition()
        self.watch_generation = 0
        self.clean_end = False
        self.log_generation = 0
        self.line_times: dict[str, list[int]] = {}  # pod name → when each line of its log was first served (ns)
        self.containers: dict[str, Container] = {}
        self.environments: dict[str, dict[str, str]] = {}  # pod name → the environment its container got
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call, for assertions
        self.gone_answers = 0  # watches answered 410 Gone
        self.ips = itertools.count(1)
        self.free_gpus = self.gpus
        self.refusals: dict[str, int] = {}  # kind → deletes still to answer 500
        self.pods_released = threading.Event()  # cleared: deleted pods stay terminating
        self.pods_released.set()
        self.log_delay = 0.0
        self.create_delays: dict[str, float] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.closing = False
        threading.Thread(target=self.server.serve_forever, name="kube-api", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path, namespace: str = "llm") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
            "users": [{"name": "controller", "user": {"token": "emulated-cluster-token"}}],
            "contexts": [
                {"name": "emulated", "context": {"cluster": "emulated", "user": "controller", "namespace": namespace}}
            ],
            "current-context": "emulated",
        }
        path.write_text(json.dumps(config))
        return path

    def close(self) -> None:
        self.closing = True
        self.pods_released.set()
        for name in list(self.containers):
            self._stop_container(name, grace=2)
        with self.changed:
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ the store

    def _commit(self, kind: str, event: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.changed:
            version = next(self.version)
            self.last_version = version
            obj["metadata"]["resourceVersion"] = str(version)
            key = (kind, obj["metadata"]["namespace"], obj["metadata"]["name"])
            if event == "DELETED":
                self.objects.pop(key, None)
            else:
                self.objects[key] = obj
            self.history.append((version, kind, event, json.loads(json.dumps(obj))))
            self.changed.notify_all()
        return obj

    def find(self, kind: str, selector: dict[str, str] | None = None) -> list[dict[str, Any]]:
        with self.changed:
            return [
                json.loads(json.dumps(obj))
                for (k, _, _), obj in self.objects.items()
                if k == kind and selects(selector or {}, obj["metadata"].get("labels") or {})
            ]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.changed:
            found = self.objects.get((kind, namespace, name))
            return json.loads(json.dumps(found)) if found else None

    def compact(self) -> None:
        """Forget the history: a watch resumed from an older version is answered 410 Gone."""
        with self.changed:
            self.oldest = self.last_version
            self.history.clear()

    def drop_watches(self, cleanly: bool = False) -> None:
        """End every open watch stream: broken off, as an API server restart does, or ``cleanly``, as when a
        watch's timeoutSeconds runs out (a client then resumes from the last version it saw)."""
        with self.changed:
            self.watch_generation += 1
            self.clean_end = cleanly
            self.changed.notify_all()

    def drop_logs(self) -> None:
        """Break off every open log stream (an API server or kubelet restart, a proxy in between timing out)."""
        with self.changed:
            self.log_generation += 1

    def refuse_deletes(self, kind: str, times: int = 1) -> None:
        """The next ``times`` deletes of ``kind`` answer 500, as an API server whose etcd times out does."""
        with self.changed:
            self.refusals[kind] = times

    def keep_pods_terminating(self) -> None:
        """Deleted pods stay, terminating, their containers running on (a node that no longer answers, a stuck
        finalizer), a forced delete with no grace period included, until ``let_pods_go``."""
        self.pods_released.clear()

    def let_pods_go(self) -> None:
        self.pods_released.set()

    def _line_time(self, pod_name: str, index: int) -> int:
        with self.changed:
            times = self.line_times.setdefault(pod_name, [])
            while len(times) <= index:
                times.append(time.time_ns())
            return times[index]

    # ------------------------------------------------------------------ what the API does

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        metadata = body.setdefault("metadata", {})
        name = metadata.get("name")
        if not name:
            return 422, status(422, "Invalid", f"{kind} is invalid: metadata.name: Required value")
        if self.get(kind, namespace, name) is not None:
            return 409, status(409, "AlreadyExists", f'{kind.lower()}s "{name}" already exists')
        metadata.update(namespace=namespace, uid=secrets.token_hex(16), creationTimestamp=now(), generation=1)
        if kind == "Service":
            number = next(self.ips)
            body["spec"]["clusterIP"] = f"127.77.{number // 250}.{number % 250 + 1}"
            body["spec"]["clusterIPs"] = [body["spec"]["clusterIP"]]
        if kind == "Deployment":
            body["status"] = {"replicas": 0}
        created = self._commit(kind, "ADDED", body)
        if kind == "Deployment" and body["spec"].get("replicas", 1) > 0:
            threading.Thread(target=self._make_pod, args=(created,), daemon=True).start()
        return 201, created

    def replace(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A PUT: the whole object, refused with 409 when ``metadata.resourceVersion`` names an older version."""
        found = self.get(kind, namespace, name)
        if found is None:
            return 404, status(404, "NotFound", f'{kind.lower()}s "{name}" not found')
        metadata = body.setdefault("metadata", {})
        wanted = metadata.get("resourceVersion")
        if wanted and wanted != found["metadata"]["resourceVersion"]:
            plural = f"{kind.lower()}s.{GROUPS[kind]}" if kind in GROUPS else f"{kind.lower()}s"
            message = (
                f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; please apply '
                "your changes to the latest version and try again"
            )
            return 409, status(409, "Conflict", message)
        before = found["metadata"]
        metadata.update({key: before[key] for key in ("uid", "creationTimestamp", "generation") if key in before})
        metadata.update(name=name, namespace=namespace)
        return 200, self._commit(kind, "MODIFIED", body)

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A JSON merge patch (RFC 7386), the only kind the runtime sends."""
        found = self.get(kind, namespace, name)
        if found is None:
            return 404, status(404, "NotFound", f'{kind.lower()}s "{name}" not found')
        return 200, self._commit(kind, "MODIFIED", merge_patch(found, body))

    def delete(
        self, kind: str, namespace: str, name: str, grace: int | None, orphan: bool = False
    ) -> tuple[int, dict[str, Any]]:
        """Delete, and what it owns with it; ``orphan`` leaves what it owns (``kubectl delete --cascade=orphan``)."""
        found = self.get(kind, namespace, name)
        if found is None:
            return 404, status(404, "NotFound", f'{kind.lower()}s "{name}" not found')
        if kind == "Pod":
            self._delete_pod(found, grace)
            return 200, found
        self._commit(kind, "DELETED", found)
        if not orphan:
            self._collect_garbage(found["metadata"]["uid"], grace)
        return 200, found

    def _collect_garbage(self, uid: str, grace: int | None) -> None:
        """The garbage collector: what names the deleted object as its owner goes too (in the background)."""
        for kind in ("Deployment", "Service", "Secret", "Pod"):
            for dependant in self.find(kind):
                if any(owner.get("uid") == uid for owner in dependant["metadata"].get("ownerReferences") or []):
                    meta = dependant["metadata"]
                    self.delete(kind, meta["namespace"], meta["name"], grace)

    def _delete_pod(self, pod: dict[str, Any], grace: int | None) -> None:
        template_grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        grace = template_grace if grace is None else grace
        if "deletionTimestamp" not in pod["metadata"]:
            pod["metadata"]["deletionTimestamp"] = now()
            pod["metadata"]["deletionGracePeriodSeconds"] = grace
            self._commit("Pod", "MODIFIED", pod)

        def finish() -> None:
            self.pods_released.wait()
            self._stop_container(pod["metadata"]["name"], grace)
            current = self.get("Pod", pod["metadata"]["namespace"], pod["metadata"]["name"])
            if current is not None:
                self._commit("Pod", "DELETED", current)

        threading.Thread(target=finish, daemon=True).start()

    # ------------------------------------------------------------------ controllers, scheduler, kubelet

    def _make_pod(self, deployment: dict[str, Any]) -> None:
        template = deployment["spec"]["template"]
        meta = deployment["metadata"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{secrets.token_hex(5)}-{secrets.token_hex(3)[:5]}",
                "labels": dict(template["metadata"].get("labels") or {}),
                "annotations": dict(template["metadata"].get("annotations") or {}),
                "ownerReferences": [
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": meta["name"], "uid": meta["uid"]}
                ],
            },
            "spec": json.loads(json.dumps(template["spec"])),
            "status": {"phase": "Pending", "conditions": []},
        }
        _, pod = self.create("Pod", meta["namespace"], pod)
        self._schedule(pod)

    def _schedule(self, pod: dict[str, Any]) -> None:
        wanted = sum(int((c.get("resources") or {}).get("limits", {}).get(GPU, 0)) for c in pod["spec"]["containers"])
        with self.changed:
            fits = wanted <= self.free_gpus
            if fits:
                self.free_gpus -= wanted
        if not fits:
            nodes = self.nodes
            message = (
                f"0/{nodes} nodes are available: {nodes} Insufficient {GPU}. preemption: 0/{nodes} nodes are "
                f"available: {nodes} No preemption victims found for incoming pod."
            )
            condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
            pod["status"]["conditions"] = [condition]
            self._commit("Pod", "MODIFIED", pod)
            return
        pod["spec"]["nodeName"] = "node-1"
        pod["status"]["conditions"] = [{"type": "PodScheduled", "status": "True"}]
        pod = self._commit("Pod", "MODIFIED", pod)
        self._run_container(pod, wanted)

    def add_gpus(self, count: int) -> None:
        """A node with ``count`` more GPUs joins (a cluster autoscaler's work): pending pods are scheduled again."""
        with self.changed:
            self.free_gpus += count
        for pod in self.find("Pod"):
            if "nodeName" not in pod["spec"] and "deletionTimestamp" not in pod["metadata"]:
                threading.Thread(target=self._schedule, args=(pod,), daemon=True).start()

    def _run_container(self, pod: dict[str, Any], gpus: int) -> None:
        name = pod["metadata"]["name"]
        log_path = self.work_dir / f"{name}.log"
        log_path.touch()
        process, argv = None, []
        environment = self._environment(pod)
        if environment is None:  # the kubelet cannot build the container: a Secret it names is missing
            missing = "a Secret the container's environment names was not found"
            waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": missing}}
            pod["status"]["containerStatuses"] = [{"name": "llama-server", "ready": False, "state": waiting}]
            self._commit("Pod", "MODIFIED", pod)
            return
        if self.kubelet == "real":
            argv = self._argv(pod)
            with log_path.open("ab") as out:
                process = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, **environment},
                )
        else:
            time.sleep(self.start_delay)
        self.containers[name] = Container(process, log_path, gpus)
        current = self.get("Pod", pod["metadata"]["namespace"], name)
        if current is None or "deletionTimestamp" in current["metadata"]:
            return
        current["status"].update(
            phase="Running",
            podIP="10.244.0.10",
            containerStatuses=[
                {
                    "name": "llama-server",
                    "ready": self.kubelet == "inert",
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now()}},
                    "image": pod["spec"]["containers"][0]["image"],
                }
            ],
        )
        self._commit("Pod", "MODIFIED", current)
        if process is not None:
            threading.Thread(target=self._supervise, args=(current, process, argv), daemon=True).start()

    def _environment(self, pod: dict[str, Any]) -> dict[str, str] | None:
        """The container's environment as the kubelet builds it: values, and items of Secrets (None: one is
        missing, which the kubelet reports as CreateContainerConfigError)."""
        environment: dict[str, str] = {}
        for item in pod["spec"]["containers"][0].get("env") or []:
            reference = (item.get("valueFrom") or {}).get("secretKeyRef")
            if reference is None:
                environment[item["name"]] = item.get("value", "")
                continue
            secret = self.get("Secret", pod["metadata"]["namespace"], reference["name"])
            if secret is None or reference["key"] not in (secret.get("data") or {}):
                return None
            environment[item["name"]] = base64.b64decode(secret["data"][reference["key"]]).decode()
        self.environments[pod["metadata"]["name"]] = environment
        return environment

    def _argv(self, pod: dict[str, Any]) -> list[str]:
        assert self.binary, "kubelet='real' needs the llama-server binary"
        spec = pod["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        source = volume.get("persistentVolumeClaim", {}).get("claimName") or volume["hostPath"]["path"]
        folder = self.volumes[source]
        args = list(spec["containers"][0]["args"])
        service = next(
            (s for s in self.find("Service") if selects(s["spec"]["selector"], pod["metadata"]["labels"])), None
        )
        host = service["spec"]["clusterIP"] if service else "127.0.0.1"
        for index, arg in enumerate(args):
            if arg.startswith("/models/"):
                args[index] = str(folder / arg.removeprefix("/models/"))
            if index and args[index - 1] == "--host":
                args[index] = host
        return [self.binary, *args]

    def _supervise(self, pod: dict[str, Any], process: subprocess.Popen[bytes], argv: list[str]) -> None:
        """Readiness from /health, and an exit reported the way a kubelet does (then CrashLoopBackOff)."""
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        url = f"http://{argv[argv.index('--host') + 1]}:{argv[argv.index('--port') + 1]}/health"
        if answers(url, process, STARTUP_SECONDS):
            self._update_container(namespace, name, {"ready": True})
        code = process.wait()
        container = self.containers.get(name)
        if container is None or container.stopping or self.closing:
            return
        terminated = {"exitCode": code if code >= 0 else 128 - code, "reason": "Error", "finishedAt": now()}
        if code < 0:
            terminated["signal"] = -code
        self._update_container(
            namespace,
            name,
            {
                "ready": False,
                "restartCount": 1,
                "lastState": {"terminated": terminated},
                "state": {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off 10s restarting failed container=llama-server pod={name}",
                    }
                },
            },
        )

    def _update_container(self, namespace: str, name: str, changes: dict[str, Any]) -> None:
        pod = self.get("Pod", namespace, name)
        if pod is None or not pod["status"].get("containerStatuses"):
            return
        pod["status"]["containerStatuses"][0].update(changes)
        self._commit("Pod", "MODIFIED", pod)

    def set_container_state(self, pod_name: str, state: dict[str, Any], **changes: Any) -> None:
        """Fault injection: e.g. ``{"terminated": {"exitCode": 137, "reason": "OOMKilled"}}``."""
        pod = next(p for p in self.find("Pod") if p["metadata"]["name"] == pod_name)
        self._update_container(pod["metadata"]["namespace"], pod_name, {"state": state, **changes})

    def end_container(self, pod_name: str, exit_code: int = 1) -> None:
        """The inert container in ``pod_name`` exits with ``exit_code``: reported terminated, its log ends."""
        container = self.containers[pod_name]
        container.ended = True
        terminated = {"exitCode": exit_code, "reason": "Error", "finishedAt": now()}
        self.set_container_state(pod_name, {"terminated": terminated}, ready=False)

    def kill(self, pod_name: str) -> None:
        """SIGKILL the real llama-server in ``pod_name`` (a crash)."""
        container = self.containers[pod_name]
        assert container.process is not None
        container.process.send_signal(signal.SIGKILL)

    def _stop_container(self, name: str, grace: float) -> None:
        container = self.containers.pop(name, None)
        if container is None:
            return
        container.stopping = True
        with self.changed:
            self.free_gpus += container.gpus
        process = container.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=max(grace, 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_path(self, pod_name: str) -> Path | None:
        container = self.containers.get(pod_name)
        return container.log_path if container else (self.work_dir / f"{pod_name}.log")

    # ------------------------------------------------------------------ HTTP

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in separate writes: with Nagle's algorithm and delayed ACKs each call
            # would wait 40 ms for nothing.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                cluster._serve(self, "GET")

            def do_POST(self) -> None:
                cluster._serve(self, "POST")

            def do_DELETE(self) -> None:
                cluster._serve(self, "DELETE")

            def do_PATCH(self) -> None:
                cluster._serve(self, "PATCH")

            def do_PUT(self) -> None:
                cluster._serve(self, "PUT")

        return Handler

    def _serve(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(request.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        self.requests.append((method, parts.path))
        length = int(request.headers.get("Content-Length") or 0)
        body = json.loads(request.rfile.read(length)) if length else {}
        route = self._route(parts.path)
        if self.forbidden:
            message = f'{parts.path} is forbidden: User "system:serviceaccount:llm:controller" cannot {method.lower()}'
            self._send(request, 403, status(403, "Forbidden", message))
            return
        if route is None:
            self._send(request, 404, status(404, "NotFound", f"the server could not find {parts.path}"))
            return
        kind, namespace, name, sub = route
        if method == "DELETE" and self._refused(kind):
            self._send(request, 500, status(500, "InternalError", "etcdserver: request timed out"))
        elif method == "POST" and name is None:
            time.sleep(self.create_delays.get(kind, 0.0))
            self._send(request, *self.create(kind, namespace, body))
        elif method == "PATCH" and name is not None and sub is None:
            self._send(request, *self.patch(kind, namespace, name, body))
        elif method == "PUT" and name is not None and sub is None:
            self._send(request, *self.replace(kind, namespace, name, body))
        elif method == "DELETE" and name is not None:
            grace = query.get("gracePeriodSeconds", body.get("gracePeriodSeconds"))
            self._send(request, *self.delete(kind, namespace, name, None if grace is None else int(grace)))
        elif method == "GET" and name is not None and sub == "log":
            self._stream_log(request, name, query)
        elif method == "GET" and name is not None:
            found = self.get(kind, namespace, name)
            if found is None:
                self._send(request, 404, status(404, "NotFound", f'{kind.lower()}s "{name}" not found'))
            else:
                self._send(request, 200, found)
        elif method == "GET" and query.get("watch") == "true":
            self._watch(request, kind, namespace, query)
        elif method == "GET":
            selector = parse_selector(query.get("labelSelector", ""))
            items = [o for o in self.find(kind, selector) if o["metadata"]["namespace"] == namespace]
            listing = {
                "apiVersion": "v1",
                "kind": f"{kind}List",
                "items": items,
                "metadata": {"resourceVersion": str(self.last_version)},
            }
            self._send(request, 200, listing)
        else:
            self._send(request, 405, status(405, "MethodNotAllowed", "method not allowed"))

    def _refused(self, kind: str) -> bool:
        with self.changed:
            left = self.refusals.get(kind, 0)
            if left:
                self.refusals[kind] = left - 1
            return left > 0

    @staticmethod
    def _route(path: str) -> tuple[str, str, str | None, str | None] | None:
        for (prefix, plural), kind in ROUTES.items():
            head = f"/{prefix}/namespaces/"
            if not path.startswith(head):
                continue
            rest = path[len(head) :].split("/")
            if len(rest) >= 2 and rest[1] == plural:
                name = rest[2] if len(rest) > 2 else None
                sub = rest[3] if len(rest) > 3 else None
                return kind, rest[0], name, sub
        return None

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        request.send_response(code)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    @staticmethod
    def _start_chunks(request: BaseHTTPRequestHandler, content_type: str) -> None:
        request.send_response(200)
        request.send_header("Content-Type", content_type)
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()

    @staticmethod
    def _chunk(request: BaseHTTPRequestHandler, data: bytes) -> None:
        request.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        request.wfile.flush()

    def _watch(self, request: BaseHTTPRequestHandler, kind: str, namespace: str, query: dict[str, str]) -> None:
        selector = parse_selector(query.get("labelSelector", ""))
        since = int(query.get("resourceVersion") or self.last_version)
        deadline = time.monotonic() + int(query.get("timeoutSeconds") or 1800)
        generation = self.watch_generation
        self._start_chunks(request, "application/json")
        try:
            if since < self.oldest:
                self.gone_answers += 1
                gone = status(410, "Expired", f"too old resource version: {since} ({self.oldest})")
                self._chunk(request, json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            else:
                for event in self._events(kind, namespace, selector, since, deadline, generation):
                    self._chunk(request, json.dumps(event).encode() + b"\n")
            if self.watch_generation != generation and not self.clean_end:
                request.close_connection = True
                return  # a restart: the stream breaks off with no last chunk
            self._chunk(request, b"")
        except OSError:
            request.close_connection = True

    def _events(
        self, kind: str, namespace: str, selector: dict[str, str], since: int, deadline: float, generation: int
    ) -> Iterator[dict[str, Any]]:
        while time.monotonic() < deadline and not self.closing and self.watch_generation == generation:
            with self.changed:
                fresh = [entry for entry in self.history if entry[0] > since]
                if not fresh:
                    self.changed.wait(timeout=0.5)
                    continue
            for version, event_kind, event, obj in fresh:
                since = version
                metadata = obj["metadata"]
                if (
                    event_kind == kind
                    and metadata["namespace"] == namespace
                    and selects(selector, metadata.get("labels") or {})
                ):
                    yield {"type": event, "object": obj}

    def _stream_log(self, request: BaseHTTPRequestHandler, pod_name: str, query: dict[str, str]) -> None:
        path = self.log_path(pod_name)
        if path is None or not path.exists():
            self._send(
                request,
                400,
                status(400, "BadRequest", f'container "llama-server" in pod "{pod_name}" is waiting to start'),
            )
            return
        follow, stamped = query.get("follow") == "true", query.get("timestamps") == "true"
        since: int | None = None
        if "sinceTime" in query:
            since = int(datetime.fromisoformat(query["sinceTime"].replace("Z", "+00:00")).timestamp()) * 10**9
        elif "sinceSeconds" in query:
            since = time.time_ns() - int(query["sinceSeconds"]) * 10**9
        generation = self.log_generation
        self._start_chunks(request, "text/plain")
        try:
            with path.open("rb") as source:
                partial, index = b"", 0
                while True:
                    if self.log_generation != generation:
                        request.close_connection = True
                        return  # broken off: no last chunk, nothing more
                    data = source.read(65536)
                    if data:
                        lines = (partial + data).split(b"\n")
                        partial = lines.pop()
                        out = []
                        for line in lines:
                            stamp = self._line_time(pod_name, index)
                            index += 1
                            if since is None or stamp >= since:
                                out.append((rfc3339_nano(stamp) + " " if stamped else "").encode() + line + b"\n")
                        if out:
                            time.sleep(self.log_delay)
                            self._chunk(request, b"".join(out))
                        continue
                    running = pod_name in self.containers and self._running(pod_name)
                    if not follow or not running or self.closing:
                        if partial:  # a last line with no newline
                            self._chunk(
                                request, (rfc3339_nano(time.time_ns()) + " " if stamped else "").encode() + partial
                            )
                        break
                    time.sleep(0.05)
            self._chunk(request, b"")
        except OSError:
            request.close_connection = True

    def _running(self, pod_name: str) -> bool:
        container = self.containers.get(pod_name)
        if container is None or container.ended:
            return False
        return container.process is None or container.process.poll() is None


@contextlib.contextmanager
def emulated_cluster(work_dir: Path, **options: Any) -> Iterator[Cluster]:
    work_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(work_dir=work_dir, **options)
    try:
        yield cluster
    finally:
        cluster.close()


async def eventually(check: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy (a test helper; the runtime itself never polls)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        value = check()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"not within {timeout}s: {getattr(check, '__name__', check)}")
