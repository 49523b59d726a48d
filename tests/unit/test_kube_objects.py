"""What the kubernetes runtime sends (golden files) and how it reads a pod's status (pure).

Rewrite the golden files after an intended change with ``UPDATE_GOLDEN=1 pytest tests/unit/test_kube_objects.py``;
tests/helm/test_chart.py validates them against the Kubernetes API schemas.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from common.errors import BackendStartFailed, ConfigError
from controller.config import validate_config
from controller.runtime import runtime_setup
from controller.runtime.base import LaunchSpec, Placement
from controller.runtime.kube_objects import backend_name, gpu_count, judge_pod, plan, settings_for
from controller.runtime.logs import LogBook

GOLDEN = Path(__file__).parent / "golden" / "kubernetes"

CASES: dict[str, dict[str, Any]] = {
    "cpu-claim": {
        "runtime": {"models": {"claim_name": "llm-models"}},
        "model": {"path": "/models/gemma/gemma-3-270m-q4_k_m.gguf"},
    },
    "gpu-hostpath": {
        "runtime": {
            "models": {"host_path": "/srv/models", "mount_path": "/data/models"},
            "gpu_count": 1,
            "runtime_class_name": "nvidia",
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
            "image": "registry.example/llama-server:cuda",
            "image_pull_secrets": ["registry-credentials"],
            "env": {"GGML_CUDA_ENABLE_UNIFIED_MEMORY": "0"},
        },
        "model": {
            "path": "/data/models/qwen/qwen3-8b-q4_k_m.gguf",
            "mmproj": "/data/models/qwen/mmproj.gguf",
            "container": {"memory": "24GiB"},
            "kubernetes": {"node_selector": {"gpu.example/class": "l40s"}, "resources": {"limits": {"cpu": "8"}}},
        },
    },
}


def objects_for(case: str) -> dict[str, Any]:
    setup = CASES[case]
    config = validate_config(
        {
            "runtime": {"kind": "kubernetes", "stop_timeout": 20, "kubernetes": setup["runtime"]},
            "defaults": {"startup_timeout": 300},
            "models": {"m:1": setup["model"]},
        }
    )
    model = config.models["m:1"]
    spec = LaunchSpec(
        model="m:1",
        model_file=model.path,
        mmproj=model.mmproj,
        args=("--alias", "m:1", "--ctx-size", "8192", "--parallel", "2", "--metrics"),
        gpus="auto",
        labels={"ctx_size": "4096"},
        placement=Placement.of(model),
    )
    settings = settings_for(runtime_setup(config, LogBook(), instance="release-a"), spec.placement)
    made = plan(spec, settings, instance="release-a", run="0a1b2c3d")
    return {"deployment": made.deployment, "service": made.service}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_objects_sent_match_their_golden_file(case: str) -> None:
    path = GOLDEN / f"{case}.json"
    text = json.dumps(objects_for(case), indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path.name} differs: rerun with UPDATE_GOLDEN=1 if the change is intended"


def test_the_gpu_case_asks_for_gpus_memory_and_placement() -> None:
    pod = objects_for("gpu-hostpath")["deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": str(24 * 2**30), "nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "gpu.example/class": "l40s"}
    assert pod["runtimeClassName"] == "nvidia"
    assert container["args"][:4] == [
        "--model",
        "/models/qwen/qwen3-8b-q4_k_m.gguf",
        "--mmproj",
        "/models/qwen/mmproj.gguf",
    ]
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 300
    assert pod["volumes"][0] == {"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}}


def test_names_are_dns_labels_and_keep_similar_models_apart() -> None:
    names = {backend_name("i", model) for model in ("a:b", "a-b:latest", "A:B", "x" * 90 + ":1")}
    assert len(names) == 3  # "a:b" and "A:B" are one model (names are case-insensitive)
    for name in names:
        assert len(name) <= 63 and name[0].isalpha() and name.replace("-", "").isalnum() and name.islower()
    assert backend_name("one", "a:b") != backend_name("two", "a:b")


@pytest.mark.parametrize(
    ("gpus", "configured", "count"), [("none", 1, 0), ("auto", 1, 1), ("all", 2, 2), ((0, 3), 1, 2), ("auto", 0, 0)]
)
def test_gpu_count(gpus: Any, configured: int, count: int) -> None:
    assert gpu_count(gpus, configured) == count


def test_the_models_volume_or_nothing() -> None:
    with pytest.raises(ConfigError) as refused:
        validate_config({"runtime": {"kind": "kubernetes"}})
    assert "exactly one of claim_name" in str(refused.value.problems)
    config = validate_config({"runtime": {"kind": "kubernetes", "kubernetes": {"models": {"claim_name": "m"}}}})
    settings = settings_for(runtime_setup(config, LogBook(), instance="i"), Placement())
    with pytest.raises(BackendStartFailed, match=r"outside runtime\.kubernetes\.models\.mount_path"):
        plan(LaunchSpec("m:1", Path("/elsewhere/m.gguf")), settings, "i", "r")


def pod(status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": status}


def container(**fields: Any) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "llama-server", **fields}], "phase": "Running"}


@pytest.mark.parametrize(
    ("status", "failed", "code", "running"),
    [
        ({"phase": "Pending"}, None, None, False),
        (container(state={"waiting": {"reason": "ContainerCreating"}}), None, None, False),
        (container(state={"running": {"startedAt": "x"}}), None, None, True),
        (
            container(state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
            "out of memory: llama-server exceeded its pod's memory limit and was killed (OOMKilled)",
            137,
            False,
        ),
        (
            container(
                state={"waiting": {"reason": "CrashLoopBackOff"}},
                lastState={"terminated": {"exitCode": 1, "reason": "Error"}},
            ),
            "llama-server exited (exit code 1, Error)",
            1,
            False,
        ),
        (
            container(state={"waiting": {"reason": "ErrImagePull", "message": "not found"}}),
            "ErrImagePull: not found",
            None,
            False,
        ),
        (
            {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ]
            },
            "no node can run it: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            None,
            False,
        ),
        (
            {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."},
            "the pod failed (Evicted): The node was low on resource: memory.",
            None,
            False,
        ),
    ],
)
def test_what_a_pods_status_means(status: dict[str, Any], failed: str | None, code: int | None, running: bool) -> None:
    verdict = judge_pod(pod(status))
    assert (verdict.failed, verdict.exit_code, verdict.running) == (failed, code, running)
