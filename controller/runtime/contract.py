"""What a llama-server container looks like to every runtime that runs one (docker, kubernetes): its port, where
the models are mounted, the default image, how a model's name becomes part of a container or object name, and
how a realisation is hashed.

One home, because these values outlive a controller: a newer one adopts the containers and Deployments an older
one left only when it names, mounts and hashes them as that one did (tests/unit/test_contract.py pins them).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from common.names import canonical
from controller.config_schema import DEFAULT_IMAGE as DEFAULT_IMAGE  # the config's default, which cannot import this
from controller.runtime.base import LaunchSpec

PORT = 8080  # llama-server's port inside its container or pod
MODELS_MOUNT = "/models"  # where a container or pod sees the models
API_KEY_ENV = "LLAMA_API_KEY"  # llama-server's environment variable for --api-key
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104 - llama-server listens on its own container's network only
# Who llama-server runs as in a container or pod: not root (the distroless "nonroot" ids). The models it reads must
# be readable by it (world-readable, or a per-model container user).
BACKEND_UID = 65532

# Docker container names allow ``_`` and ``.``; Kubernetes names are DNS labels (letters, digits, ``-``).
_NOT_IN_NAME = re.compile(r"[^a-z0-9_.-]+")
_NOT_IN_DNS_LABEL = re.compile(r"[^a-z0-9]+")


def container_args(spec: LaunchSpec, seen_as: Callable[[Path], str]) -> list[str]:
    """llama-server's arguments in a container or pod: the files where it sees them, listening on ``PORT``."""
    return spec.argv(seen_as, EVERY_INTERFACE, PORT)


def slug(model: str, *, dns_label: bool) -> str:
    """The canonical model name as a part of a name: a DNS label's characters (Kubernetes) or, for Docker, those
    and ``_`` and ``.`` too. Not unique (``a:b-c`` and ``a-b:c`` agree): a name adds ``name_digest``."""
    if dns_label:
        return _NOT_IN_DNS_LABEL.sub("-", canonical(model)).strip("-") or "model"
    return _NOT_IN_NAME.sub("-", canonical(model)).strip("-.") or "model"


def name_digest(instance: str, model: str) -> str:
    """Keeps names apart that the slug does not (``a:b-c``, ``a-b:c``), and two controllers' backends too."""
    return hashlib.sha256(f"{instance}\0{canonical(model)}".encode()).hexdigest()[:8]


def realisation_hash(payload: object) -> str:
    """The digest of how a runtime runs a backend (image, resources, placement), kept in a label: what the spec
    hash does not cover. A leftover realised otherwise is not adopted."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
