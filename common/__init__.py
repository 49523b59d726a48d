"""The floor both planes stand on: the exception tree, dialects, durations, addresses, ASGI and HTTP helpers, the
model-directory contract and per-request notes. It imports nothing from ``controller`` or ``proxy``."""
