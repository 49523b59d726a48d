"""This controller's identity: a random id kept in its data dir.

It labels what the controller starts (containers), so two controllers on one Docker engine never adopt or
remove each other's backends, and a controller restarted on the same data dir finds its own.
"""

from __future__ import annotations

import secrets
from pathlib import Path


def instance_id(data_dir: Path) -> str:
    path = data_dir / "instance-id"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if len(existing) == 32 and all(c in "0123456789abcdef" for c in existing):
        return existing
    made = secrets.token_hex(16)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(made + "\n")
    temporary.replace(path)
    return made
