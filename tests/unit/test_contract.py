"""The container contract every runtime shares, pinned: a newer controller adopts the containers and Deployments
an older one left only when it names them, labels them and hashes them as that one did."""

from __future__ import annotations

import pytest

from common.errors import InvalidModelName
from controller.runtime.containers import container_name
from controller.runtime.kube_objects import backend_name

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
