"""Each backend's own API key: derived, handed to llama-server off its command line, recovered on adoption."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
from dataclasses import replace
from pathlib import Path

from controller.catalog.entries import Catalog
from controller.config import validate_config
from controller.config_schema import ContainerSettings
from controller.lifecycle.supervisor import Supervisor
from controller.runtime import containers, kube_objects, runtime_setup
from controller.runtime.base import Backend, LaunchSpec, RuntimeSetup
from controller.runtime.fake import FakeRuntime
from controller.runtime.keys import NONCE_LABEL, BackendKeys
from controller.runtime.logs import LogBook
from controller.runtime.process import ProcessRuntime
from tests.support.harness import fake_config, fake_supervisor


def spec_with_key(keys: BackendKeys, model_file: Path = Path("/models/a.gguf")) -> LaunchSpec:
    return keys.issue(LaunchSpec("a:1b", model_file, args=("--alias", "a:1b"), labels={"ctx_size": "4096"}))


def test_each_start_gets_its_own_key_and_an_adopter_derives_it_again(tmp_path: Path) -> None:
    keys = BackendKeys.from_secrets_dir(tmp_path / "secrets")
    first, second = spec_with_key(keys), spec_with_key(keys)
    assert len(first.api_key) == 64 and first.api_key != second.api_key
    assert first.labels["ctx_size"] == "4096" and first.labels[NONCE_LABEL] != second.labels[NONCE_LABEL]
    assert first.spec_hash == second.spec_hash  # a new key is no reason to refuse adoption
    assert first.api_key not in repr(first) and first.api_key not in json.dumps(dict(first.labels))

    # The next controller on the same data dir: the nonce kept with the backend gives the same key.
    adopted = Backend("a:1b", "http://127.0.0.1:1", "1", first.spec_hash, 0.0, True, first.labels)
    again = BackendKeys.from_secrets_dir(tmp_path / "secrets").recover(adopted)
    assert again.api_key == first.api_key and first.api_key not in repr(again)
    # Another secret derives another key; a backend started without a nonce has none.
    assert BackendKeys.ephemeral().recover(adopted).api_key != first.api_key
    assert keys.recover(replace(adopted, labels={})).api_key == ""


async def settled_cmdline(pid: int) -> list[bytes]:
    """The process's argv once its exec is done: read mid-exec (a busy machine), /proc/PID/cmdline is empty."""
    deadline = time.monotonic() + 30
    while not (cmdline := Path(f"/proc/{pid}/cmdline").read_bytes()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return cmdline.split(b"\0")


async def test_process_runtime_passes_the_key_in_a_private_file_not_on_the_command_line(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\nsleep 30\n")  # not exec: its argv stays what the runtime gave
    binary.chmod(0o700)
    runtime = ProcessRuntime(RuntimeSetup(tmp_path / "state", LogBook(), binary=lambda: str(binary)))
    spec = spec_with_key(BackendKeys.ephemeral(), tmp_path / "a.gguf")
    backend = await runtime.start(spec)
    try:
        key_file = runtime.key_path(spec.model)
        assert key_file.read_text().strip() == spec.api_key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        argv = await settled_cmdline(int(backend.handle))
        assert b"--api-key-file" in argv and str(key_file).encode() in argv
        assert not any(spec.api_key.encode() in arg for arg in argv)
        pid_file = (tmp_path / "state" / "run" / f"{spec.model}.json").read_text()
        assert spec.api_key not in pid_file  # only the nonce is kept, for adoption
        assert json.loads(pid_file)["labels"][NONCE_LABEL] == spec.labels[NONCE_LABEL]
    finally:
        await runtime.stop(backend, timeout=2)
        await runtime.close()
    assert not runtime.key_path(spec.model).exists()


def test_process_runtime_without_a_key_passes_no_key_file(tmp_path: Path) -> None:
    runtime = ProcessRuntime(RuntimeSetup(tmp_path / "state", LogBook(), binary=lambda: "/bin/llama-server"))
    argv, _ = runtime.command(LaunchSpec("a:1b", tmp_path / "a.gguf"), 1234)
    assert "--api-key-file" not in argv


def test_docker_passes_the_key_in_the_environment_not_the_command() -> None:
    spec = spec_with_key(BackendKeys.ephemeral())
    plan = containers.plan(spec, ContainerSettings(env={"A": "1"}), "instance", {})
    assert plan.environment == {"A": "1", "LLAMA_API_KEY": spec.api_key}
    assert not any(spec.api_key in arg for arg in plan.command)
    assert spec.api_key not in json.dumps(plan.labels)
    assert containers.plan(replace(spec, api_key=""), ContainerSettings(), "i", {}).environment == {}


def test_kubernetes_keeps_the_key_in_a_secret_the_pod_reads_through_its_environment(tmp_path: Path) -> None:
    config = validate_config(
        {
            "runtime": {"kind": "kubernetes", "kubernetes": {"models": {"claim_name": "m", "mount_path": "/models"}}},
            "models": {"a:1b": {"path": "/models/a.gguf"}},
        }
    )
    spec = spec_with_key(BackendKeys.ephemeral())
    settings = kube_objects.settings_for(runtime_setup(config, LogBook(), instance="i"), spec.placement)
    made = kube_objects.plan(spec, settings, "i", "run")
    assert made.secret is not None and made.secret["kind"] == "Secret"
    assert made.secret["metadata"]["name"] == made.name
    assert base64.b64decode(made.secret["data"]["api-key"]).decode() == spec.api_key
    assert spec.api_key not in json.dumps([made.deployment, made.service])  # nor in the annotations
    container = made.deployment["spec"]["template"]["spec"]["containers"][0]
    reference = {"secretKeyRef": {"name": made.name, "key": "api-key"}}
    assert {"name": "LLAMA_API_KEY", "valueFrom": reference} in container["env"]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"  # llama-server leaves /health open
    assert kube_objects.plan(replace(spec, api_key=""), settings, "i", "r").secret is None


def test_the_key_file_is_never_readable_by_others_even_with_a_lax_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        runtime = ProcessRuntime(RuntimeSetup(tmp_path / "state", LogBook(), binary=lambda: "/bin/true"))
        spec = spec_with_key(BackendKeys.ephemeral(), tmp_path / "a.gguf")
        runtime._write_key_file(spec)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(runtime.key_path(spec.model).stat().st_mode) == 0o600


async def adopt_one(tmp_path: Path, tiny_model: Path, keys: BackendKeys, accepts: bool) -> tuple[str, str, list[str]]:
    """A controller with ``keys`` finds backend ``old-a``, started with a key from the same keys, which it accepts
    (or not); returns the key its leases carry, the key old-a was started with, and what was stopped."""
    config = fake_config(tmp_path, tiny_model, {"a": {}})
    probe_supervisor, _ = fake_supervisor(config)
    await probe_supervisor.catalog.refresh()
    left = keys.issue(probe_supervisor.spec_for("a"))
    leftover = Backend(
        "a:latest", "http://fake.invalid/old-a", "old-a", left.spec_hash, time.time(), labels=left.labels
    )
    runtime = FakeRuntime(leftovers=[leftover])
    checked: list[str] = []

    async def key_check(backend: Backend, timeout: float) -> bool:
        checked.append(backend.api_key)
        return accepts and backend.api_key == left.api_key

    supervisor = Supervisor(
        config, runtime, Catalog(config), LogBook(), runtime.probe, lambda _: None, keys=keys, key_check=key_check
    )
    await supervisor.start()
    async with supervisor.lease("a") as lease:
        key = lease.api_key
    await supervisor.close()
    assert checked == [left.api_key]
    return key, left.api_key, runtime.stops


async def test_an_adopted_backend_is_used_with_the_key_derived_again(tmp_path: Path, tiny_model: Path) -> None:
    keys = BackendKeys.from_secrets_dir(tmp_path / "secrets")
    key, started_with, stops = await adopt_one(tmp_path, tiny_model, keys, accepts=True)
    assert key == started_with and stops == ["old-a"]  # served with its own key; stopped only by close()


async def test_a_backend_that_refuses_the_derived_key_is_replaced_not_served(tmp_path: Path, tiny_model: Path) -> None:
    key, started_with, stops = await adopt_one(tmp_path, tiny_model, BackendKeys.ephemeral(), accepts=False)
    assert stops[0] == "old-a" and len(stops) == 2  # removed at start; the new backend at close
    assert len(key) == 64 and key != started_with


async def test_a_lease_carries_the_key_the_backend_was_started_with(tmp_path: Path, tiny_model: Path) -> None:
    supervisor, runtime = fake_supervisor(fake_config(tmp_path, tiny_model, {"a": {}}))
    await supervisor.start()
    async with supervisor.lease("a") as lease:
        assert lease.api_key == runtime.starts[-1].api_key and len(lease.api_key) == 64
        assert lease.api_key not in repr(lease)
        assert lease.credentials == {"Authorization": f"Bearer {lease.api_key}"}
    ((name, backend),) = supervisor.ready_backends()
    assert name == "a" and backend.api_key == lease.api_key  # the catalog name, as in the metrics
    await supervisor.close()
