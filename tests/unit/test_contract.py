"""The container contract every runtime shares, pinned: a newer controller adopts the containers and Deployments
an older one left only when it names them, labels them and hashes them as that one did."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidModelName
from controller.catalog.entries import CatalogEntry
from controller.catalog.profile import build_profile
from controller.catalog.requirements import Requirements
from controller.config import Config, validate_config
from controller.config_schema import ContainerSettings
from controller.runtime import containers, kube_objects, runtime_setup
from controller.runtime.base import LaunchSpec, RuntimeSetup
from controller.runtime.containers import container_name
from controller.runtime.kube_objects import backend_name
from controller.runtime.logs import LogBook
from controller.runtime.process import ProcessRuntime

INSTANCE = "0123456789abcdef0123456789abcdef"

# model → (docker container name, Kubernetes backend name), as the controller has always written them.
NAMES = {
    "a:b-c": ("llamacontroller-01234567-a-b-c-0abcbede", "llama-a-b-c-769a43b0"),
    "a-b:c": ("llamacontroller-01234567-a-b-c-959ef2b9", "llama-a-b-c-22e4cd5e"),
    "Qwen2.5-7B:Q4_K_M": ("llamacontroller-01234567-qwen2.5-7b-q4_k_m-28882f74", "llama-qwen2-5-7b-q4-k-m-0820154d"),
    "gemma3:270m": ("llamacontroller-01234567-gemma3-270m-1097f5e7", "llama-gemma3-270m-d2b66de4"),
    "tiny": ("llamacontroller-01234567-tiny-latest-4109827f", "llama-tiny-latest-5f31a65d"),
    "a_-b.c:d": ("llamacontroller-01234567-a_-b.c-d-6a5c2fc1", "llama-a-b-c-d-32355f5a"),
    "a.b_:c_": ("llamacontroller-01234567-a.b_-c_-29e0d30e", "llama-a-b-c-d7cb909f"),
    "x" * 90 + ":1": (
        "llamacontroller-01234567-" + "x" * 90 + "-1-b7194e9a",
        "llama-" + "x" * 48 + "-6d2b3812",
    ),
}


@pytest.mark.parametrize("model", sorted(NAMES))
def test_container_and_deployment_names_are_what_older_controllers_wrote(model: str) -> None:
    """Docker keeps ``_`` and ``.`` in a name, Kubernetes (a DNS label) does not: each runtime's rule stays its own."""
    docker_name, kube_name = NAMES[model]
    assert container_name(INSTANCE, model) == docker_name
    assert backend_name("release-a", model) == kube_name


def test_a_name_that_is_no_model_name_is_refused_by_both() -> None:
    """``hf.co/org/model:tag`` is no valid model name (``/``): neither runtime makes a name of it."""
    with pytest.raises(InvalidModelName):
        container_name(INSTANCE, "hf.co/org/model:tag")
    with pytest.raises(InvalidModelName):
        backend_name("release-a", "hf.co/org/model:tag")


def config() -> Config:
    kubernetes = {"models": {"claim_name": "m", "mount_path": "/srv/models"}}
    model = {
        "path": "/srv/models/m.gguf",
        "container": {"memory": "1GiB", "env": {"A": "b"}},
        "kubernetes": {"node_selector": {"k": "v"}},
        "startup_timeout": 60,
    }
    return validate_config({"runtime": {"kind": "kubernetes", "kubernetes": kubernetes}, "models": {"m:1": model}})


def docker_settings(made: Config, model: str) -> ContainerSettings:
    """As the docker runtime judges a leftover of ``model`` (its setup's placement of it)."""
    return containers.settings_for(made.runtime.docker, runtime_setup(made, LogBook(), instance="i").placement(model))


def pod_settings(made: Config, model: str) -> kube_objects.PodPlanSettings:
    setup = runtime_setup(made, LogBook(), instance="i")
    return kube_objects.settings_for(setup, setup.placement(model))


def test_realisation_hashes_are_what_older_controllers_wrote() -> None:
    """A model with its own settings and one without, in both container runtimes."""
    made = config()
    assert containers.realisation_hash(docker_settings(made, "m:1")) == "beb4149c49bb6be4"
    assert containers.realisation_hash(docker_settings(made, "x:1")) == "4e285397f5ffb233"
    assert pod_settings(made, "m:1").realisation() == "d1dfa5d30d240725"
    assert pod_settings(made, "x:1").realisation() == "153e08977ac74a75"


def test_a_backend_is_started_as_its_leftover_is_judged() -> None:
    """The placement a model's profile puts on its LaunchSpec (start) is the one its setup gives (adoption)."""
    made = config()
    entry = CatalogEntry("m:1", Path("/srv/models/m.gguf"), (), "config", made.models["m:1"], 1, 1, None, None)
    spec = build_profile(entry, made).spec(Requirements())
    assert spec.placement == runtime_setup(made, LogBook(), instance="i").placement("m:1")
    assert spec.placement.container is not None and spec.placement.startup_timeout == 60


def test_each_runtime_gives_llama_server_the_same_arguments_where_it_sees_the_files(tmp_path: Path) -> None:
    made = config()
    spec = LaunchSpec("m:1", Path("/srv/models/m.gguf"), ("--ctx-size", "512"), mmproj=Path("/srv/other/p.gguf"))
    in_container = ["--ctx-size", "512", "--host", "0.0.0.0", "--port", "8080"]
    docker = containers.plan(spec, docker_settings(made, "m:1"), "i", {"/srv": "/host"})
    assert docker.command == ["--model", "/models/m.gguf", "--mmproj", "/mmproj/p.gguf", *in_container]
    assert docker.mounts == [("/host/models", "/models"), ("/host/other", "/mmproj")]
    beside = LaunchSpec("m:1", Path("/srv/models/m.gguf"), ("--ctx-size", "512"), mmproj=Path("/srv/models/p.gguf"))
    assert containers.plan(beside, docker_settings(made, "m:1"), "i", {}).command[:4] == [
        "--model",
        "/models/m.gguf",
        "--mmproj",
        "/models/p.gguf",
    ]
    pod = kube_objects.plan(beside, pod_settings(made, "m:1"), "i", "r")
    args = pod.deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--model", "/models/m.gguf", "--mmproj", "/models/p.gguf", *in_container]
    process = ProcessRuntime(RuntimeSetup(tmp_path, LogBook(), binary=lambda: "/bin/llama-server"))
    argv, _ = process.command(spec, 4321)
    assert argv == [
        "/bin/llama-server",
        *["--model", "/srv/models/m.gguf", "--mmproj", "/srv/other/p.gguf", "--ctx-size", "512"],
        *["--host", "127.0.0.1", "--port", "4321"],
    ]


def test_a_docker_backend_runs_as_65532_unless_its_model_says_who() -> None:
    """Not root by default; a model whose files only another user may read names that user, which also makes a
    container realised the old way (another user) a leftover not to adopt."""
    made = config()
    spec = LaunchSpec("x:1", Path("/srv/models/x.gguf"))
    assert containers.plan(spec, docker_settings(made, "x:1"), "i", {}).user == "65532:65532"
    owned = made.model_copy(
        update={"models": {"m:1": made.models["m:1"].model_copy(update={"container": ContainerSettings(user="1000")})}}
    )
    settings = docker_settings(owned, "m:1")
    assert containers.plan(spec, settings, "i", {}).user == "1000"
    assert containers.realisation_hash(settings) != containers.realisation_hash(
        settings.model_copy(update={"user": None})
    )
