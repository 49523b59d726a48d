"""Names on the wire that several layers must spell alike (pure constants).

``VERIFY_PATH`` is the forward-auth check a proxy in front of the app may call (answered by
controller/auth/verify.py, open in controller/auth/identity.py, in Ollama's error dialect in
common/dialects.py, never routed from outside by the edge controller/edge/render.py renders).
``IDENTITY_HEADER`` carries the identity that check signs: the app accepts it instead of a token, and the edge
deletes any copy a client sends. Header names compare case-insensitively; ASGI carries them in lower case
(``IDENTITY_HEADER.lower()``).
"""

from __future__ import annotations

IDENTITY_HEADER = "X-LlamaController-Identity"
VERIFY_PATH = "/auth/verify"

# The directory protocol between the controller and the gateway processes (controller/api/internal.py): never
# routed by the edge, refused by the gateways, and open only with the deployment's shared secret.
INTERNAL_PREFIX = "/internal/"
