"""Management JSON API blueprints (``/control/v1/*``) and operator endpoints (``/healthz``, ``/readyz``)."""
