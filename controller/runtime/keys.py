"""Each backend's own API key, so that llama-server answers nobody but this controller and its gateway.

A local user, or another pod, that reaches a backend's port gets 401 from llama-server (only ``/health``
and the model list stay open there). The key is ``HMAC-SHA256(backend secret, nonce)``:
- the nonce is random per start and kept with the backend as a label (pid file, container label, pod
  annotation): it is no secret, and a restarted controller reads it back when it adopts the backend;
- the backend secret is derived from the data dir's ``identity.key`` (domain-separated by its own HMAC
  label), which every shape already keeps across restarts and upgrades (the Helm chart in a Secret).
  Whoever holds identity.key can sign admin identity headers already, so deriving from it grants nothing
  new, and no second key file has to be provisioned or migrated.
So adoption needs no key store and no permission to read one back (no ``get secrets`` in Kubernetes, no
key in a pid file); a key leaked from one backend opens that backend only, until its next start; and a
backend whose nonce no longer derives the key it was given (identity.key replaced) answers 401 to the
adoption check and is replaced, never served.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import replace
from pathlib import Path

from controller.auth.secrets import load_or_create_key
from controller.runtime.base import Backend, LaunchSpec

NONCE_LABEL = "key_nonce"  # in LaunchSpec.labels / Backend.labels
_PURPOSE = b"llamacontroller backend api key v1"


class BackendKeys:
    def __init__(self, root: bytes) -> None:
        self._secret = hmac.new(root, _PURPOSE, hashlib.sha256).digest()

    @classmethod
    def from_secrets_dir(cls, secrets_dir: Path) -> BackendKeys:
        return cls(load_or_create_key(secrets_dir / "identity.key"))

    @classmethod
    def ephemeral(cls) -> BackendKeys:
        """Keys that no later controller can derive again (tests, or a controller without a data dir)."""
        return cls(secrets.token_bytes(32))

    def derive(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()

    def issue(self, spec: LaunchSpec) -> LaunchSpec:
        """``spec`` with a fresh key, and the nonce it was derived from among the labels kept with the backend."""
        nonce = secrets.token_hex(16)
        return replace(spec, api_key=self.derive(nonce), labels={**spec.labels, NONCE_LABEL: nonce})

    def recover(self, backend: Backend) -> Backend:
        """An adopted backend with the key it was started with (none when it was started without one)."""
        nonce = backend.labels.get(NONCE_LABEL, "")
        return replace(backend, api_key=self.derive(nonce)) if nonce else backend
