"""The one exception tree of LlamaController.

Every error a client can see is one of these; each class names its HTTP status and a stable ``code``.
Third-party and OS exceptions (sockets, subprocess) are translated at the boundary and chained with ``from``.

    LlamaControllerError                 500  internal
    ├── ConfigError                      --   config file or env override is invalid (CLI exit 2)
    ├── ClientError                      400  the caller's request is wrong
    │   ├── BadRequest                   400  malformed JSON, missing or mistyped field
    │   ├── InvalidModelName             400  name fails the strict name pattern
    │   ├── InvalidModelFile             400  the model's file is missing or not GGUF
    │   ├── ModelNotFound                404  no model of that name in the catalog
    │   ├── NotFound                     404  unknown route or record
    │   ├── MethodNotAllowed             405  known route, wrong method
    │   ├── Conflict                     409  the record exists already (user name)
    │   └── PayloadTooLarge              413  body over the configured limit
    ├── AuthError                        401  who is asking could not be established
    │   ├── Unauthenticated              401  missing, malformed, unknown, expired or revoked credentials
    │   ├── Forbidden                    403  known caller without the scope, model or CSRF token needed
    │   └── RateLimited                  429  over the token's requests per minute, or login throttled
    ├── Unavailable                      503  the server cannot take this request now
    │   ├── QueueFull                    503  the model's bounded queue is full
    │   ├── NoCapacity                   503  nothing may be evicted to make room (all pinned)
    │   ├── ShuttingDown                 503  the controller is stopping
    │   ├── ModelStopping                503  the model was unloaded while the request waited
    │   ├── DockerUnavailable            503  the Docker engine does not answer, or refuses us (socket permissions)
    │   ├── KubernetesUnavailable        503  the Kubernetes API does not answer, or refuses us (RBAC)
    │   ├── EdgeError                    503  Caddy is unreachable or refused a configuration
    │   └── ControllerAway               503  a gateway's load waited for a controller that did not answer
    ├── BackendError                     502  the llama-server backend failed us
    │   ├── BackendStartFailed           502  it exited or was refused while starting
    │   ├── BackendCrashed               502  it died while serving (the in-flight request ends here)
    │   ├── UpstreamError                502  connection refused/reset, bad reply
    │   │   └── UpstreamTimeout          504  no answer (or request not taken) within the configured time
    │   └── UpstreamRefused              4xx/5xx  llama-server's own error status (e.g. prompt too long)
    ├── StartupTimeout                   504  it did not become healthy within startup_timeout
    └── InvalidTransition                500  a lifecycle bug: a transition the state table forbids
"""

from __future__ import annotations


class LlamaControllerError(Exception):
    """Base of every error raised on purpose by this project."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(LlamaControllerError):
    """Raised when the config file or an env override does not validate; ``problems`` lists each field."""

    code = "config_error"

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class ClientError(LlamaControllerError):
    status = 400
    code = "bad_request"


class BadRequest(ClientError):
    pass


class InvalidModelName(ClientError):
    code = "invalid_model_name"


class InvalidModelFile(ClientError):
    code = "invalid_model_file"


class ModelNotFound(ClientError):
    status = 404
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        # Ollama's exact wording: clients match on it.
        super().__init__(f"model '{name}' not found")
        self.name = name


class NotFound(ClientError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class Conflict(ClientError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class ClientGone(ClientError):
    """The client went away before its request was read: nobody to answer, a normal event (499 in the log)."""

    status = 499
    code = "client_gone"


class AuthError(LlamaControllerError):
    status = 401
    code = "unauthenticated"


class Unauthenticated(AuthError):
    pass


class Forbidden(AuthError):
    status = 403
    code = "forbidden"


class RateLimited(AuthError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(LlamaControllerError):
    status = 503
    code = "unavailable"


class QueueFull(Unavailable):
    code = "queue_full"


class NoCapacity(Unavailable):
    code = "no_capacity"


class ShuttingDown(Unavailable):
    code = "shutting_down"


class ModelStopping(Unavailable):
    code = "model_stopping"


class NotLeader(Unavailable):
    """Another controller leads (leader election): this one acts on no backend."""

    code = "not_leader"


class DockerUnavailable(Unavailable):
    code = "docker_unavailable"


class KubernetesUnavailable(Unavailable):
    code = "kubernetes_unavailable"


class EdgeError(Unavailable):
    code = "edge_unavailable"


class ControllerAway(Unavailable):
    """Sent with Retry-After: the gateway keeps serving loaded models, but a load needs the controller."""

    code = "controller_unavailable"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendError(LlamaControllerError):
    status = 502
    code = "backend_error"


class BackendStartFailed(BackendError):
    code = "backend_start_failed"


class BackendCrashed(BackendError):
    code = "backend_crashed"


class BackendStopFailed(BackendError):
    """The runtime could not confirm a backend is gone: the lifecycle keeps it and tries again."""

    code = "backend_stop_failed"


class UpstreamError(BackendError):
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamRefused(BackendError):
    """llama-server answered with an error status of its own; the client gets that status and message."""

    code = "upstream_refused"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StartupTimeout(LlamaControllerError):
    status = 504
    code = "startup_timeout"


class InvalidTransition(LlamaControllerError):
    code = "invalid_transition"


def _codes(cls: type[LlamaControllerError]) -> dict[str, type[LlamaControllerError]]:
    found = {cls.code: cls}
    for sub in cls.__subclasses__():
        found.update(_codes(sub))
    return found


def error_from_wire(status: int, message: str, code: str) -> LlamaControllerError:
    """An error another process of this project answered with (``describe``'s status, message and code), raised
    again here as the same class, so that it reaches the client as the controller said it."""
    kind = _codes(LlamaControllerError).get(code, LlamaControllerError)
    error = LlamaControllerError.__new__(kind)
    LlamaControllerError.__init__(error, message)
    if error.status != status:
        error.status = status  # an upstream's own status (UpstreamRefused), or a class this side lacks
    return error
