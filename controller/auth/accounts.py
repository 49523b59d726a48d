"""What signing in (controller/auth/authenticate.py) and administration (controller/auth/admin.py) share: the
rule for user names and the one writer of the audit log."""

from __future__ import annotations

import re
import time
from typing import Any

from common.errors import BadRequest
from controller.store.base import AuditEvent, Store

_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_user_name(name: object) -> bool:
    """Whether ``name`` could name an account at all (no account has any other name)."""
    return isinstance(name, str) and _USER_NAME.fullmatch(name) is not None


def validate_user_name(name: str) -> str:
    if not is_user_name(name):
        shown = repr(name[:65]) + ("…" if len(name) > 65 else "") if isinstance(name, str) else "(not text)"
        raise BadRequest(f"invalid user name {shown}: letters, digits, '.', '_' and '-', at most 64")
    return name


async def audit(store: Store, action: str, actor: str, target: str, detail: dict[str, Any] | None = None) -> None:
    await store.add_audit(AuditEvent(time.time(), action, actor, target, detail or {}))
