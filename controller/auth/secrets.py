"""Credentials: API tokens, passwords, key files, and the signed identity header (pure where possible)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passlib.exc import PasswordSizeError
from passlib.hash import argon2

from common.errors import BadRequest, ConfigError

TOKEN_PREFIX = "lc_"  # noqa: S105 - a visible prefix, not a secret
_TOKEN = re.compile(r"lc_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_DURATION = re.compile(r"([0-9]{1,12})\s*([smhdw])")  # bounded: a longer number would overflow a float
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# A real argon2 hash verified when the user does not exist, so timing does not reveal user names.
_DUMMY_HASH = argon2.hash(secrets.token_urlsafe(16))


def digest(secret: str) -> str:
    """SHA-256 hex: enough for 256-bit random secrets (no dictionary to try), unlike passwords."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time comparison; every secret comparison in the project goes through here."""
    return hmac.compare_digest(a.encode(), b.encode())


def new_token() -> tuple[str, str, str]:
    """(token shown once, public id, digest of the secret part to store)."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}{token_id}_{secret}", token_id, digest(secret)


def parse_token(value: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    match = _TOKEN.fullmatch(value.strip())
    return (match.group(1), match.group(2)) if match else None


def parse_expiry(text: str | None) -> float | None:
    """``30d``, ``12h``, ``90m``, ``2w``; ``never``/None: no expiry. Returns seconds."""
    if text is None or text.strip().lower() in ("", "never", "none"):
        return None
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or int(match.group(1)) <= 0:
        raise BadRequest(f"invalid expiry {text!r}: write e.g. 30d, 12h, 90m, 2w or never")
    return float(int(match.group(1)) * _UNITS[match.group(2)])


def hash_password(password: str) -> str:
    try:
        return str(argon2.hash(password))
    except PasswordSizeError as exc:  # passlib refuses more than 4 KiB, as a ValueError (a 500 if let through)
        raise BadRequest(f"a password is at most {exc.max_size} bytes") from None


def verify_password(password: str, hashed: str | None) -> bool:
    """Always does the work of one argon2 verification, also for unknown users."""
    try:
        return bool(argon2.verify(password, hashed or _DUMMY_HASH)) and hashed is not None
    except (ValueError, TypeError):
        return False


def load_or_create_key(path: Path) -> bytes:
    """A 32-byte key file, created on first use with mode 0600 (never logged, never sent anywhere)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 32:
            raise RuntimeError(f"{path} holds too short a key; delete it to have a new one made") from None
        if path.stat().st_mode & 0o077:
            # A key mounted from a Kubernetes Secret is read-only, and its mode is the platform's to set.
            with contextlib.suppress(OSError):
                path.chmod(0o600)
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    return key


def write_private(path: Path, text: str) -> None:
    """``text`` into a file only its owner may read (mode 0600 from its creation), replacing one left before."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SignedClaims:
    claims: dict[str, Any]
    nonce: str


def sign_claims(key: bytes, claims: dict[str, Any]) -> str:
    """``v1.<payload>.<hmac>``: claims plus a one-time nonce, HMAC-SHA256 signed."""
    payload = _b64(json.dumps({**claims, "n": secrets.token_urlsafe(12)}, separators=(",", ":")).encode())
    mac = _b64(hmac.new(key, f"v1.{payload}".encode(), hashlib.sha256).digest())
    return f"v1.{payload}.{mac}"


def verify_claims(key: bytes, value: str) -> SignedClaims | None:
    """The claims if the signature is ours (constant-time check), else None. Expiry is the caller's."""
    parts = value.split(".")
    if len(parts) != 3 or parts[0] != "v1" or len(value) > 4096:
        return None
    expected = _b64(hmac.new(key, f"v1.{parts[1]}".encode(), hashlib.sha256).digest())
    if not same(expected, parts[2]):
        return None
    try:
        claims = json.loads(_unb64(parts[1]))
    except (ValueError, json.JSONDecodeError):
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("n"), str):
        return None
    return SignedClaims(claims, claims["n"])


INTERNAL_SECRET_ENV = "LLAMACONTROLLER_INTERNAL_SECRET"  # noqa: S105 - the variable's name
INTERNAL_SECRET_FILE = "internal.key"  # noqa: S105 - a file name


def internal_secret(secrets_dir: Path, create: bool = True) -> str:
    """The secret the controller and its gateway processes share (the directory protocol): the environment's
    (compose's .env, a Kubernetes Secret) when set, else a key file made once in the secrets folder, which the
    processes of one host share. A gateway run apart (``create`` false) never makes one: it would be its own."""
    given = os.environ.get(INTERNAL_SECRET_ENV, "")
    if given:
        if len(given) < 32:
            raise ConfigError(f"{INTERNAL_SECRET_ENV} is too short: use at least 32 random characters")
        return given
    path = secrets_dir / INTERNAL_SECRET_FILE
    if not create and not path.exists():
        raise ConfigError(
            f"no shared secret for the controller's internal routes: set {INTERNAL_SECRET_ENV} to the controller's, "
            f"or give this gateway the controller's secrets folder ({path})"
        )
    return load_or_create_key(path).hex()
