"""Ways of running llama-server: the Runtime protocol (base.py), local processes, Docker containers, Kubernetes
Deployments and an in-package fake. ``make_runtime`` builds the one the config names, each from the same
``RuntimeSetup``, as ``make_store`` builds the store: the rest of the controller never picks a runtime itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from controller.config import Config
from controller.runtime.base import Placement, Runtime, RuntimeSetup
from controller.runtime.instance import instance_id
from controller.runtime.logs import LogBook
from controller.runtime.process import ProcessRuntime


def runtime_setup(
    config: Config, logbook: LogBook, binary: Callable[[], str] | None = None, instance: str | None = None
) -> RuntimeSetup:
    """The config's ``runtime`` and ``defaults``, and how it places each model now (its ``models:`` entry), which a
    runtime judges leftovers by. A container runtime labels what it starts with the data dir's instance id."""

    def placement(model: str) -> Placement:
        return Placement.of(config.configured_model(model))

    if instance is None:
        instance = "" if config.runtime.kind == "process" else instance_id(config.data_dir)
    setup = RuntimeSetup(config.data_dir, logbook, config.runtime, config.defaults, instance, placement=placement)
    return setup if binary is None else replace(setup, binary=binary)


def make_runtime(config: Config, logbook: LogBook, binary: Callable[[], str]) -> Runtime:
    """The runtime ``runtime.kind`` names (the docker SDK and the Kubernetes client are imported only when used)."""
    setup = runtime_setup(config, logbook, binary)
    if config.runtime.kind == "docker":
        from controller.runtime.docker import DockerRuntime

        return DockerRuntime(setup)
    if config.runtime.kind == "kubernetes":
        from controller.runtime.kubernetes import KubernetesRuntime

        return KubernetesRuntime(setup)
    return ProcessRuntime(setup)
