"""YAML config → typed, validated ``Config``; one pipeline, defaults in one place (the models below).

Pipeline: read file → substitute ``${VAR}`` / ``${VAR:-default}`` → parse YAML → apply env overrides
(``LLAMACONTROLLER_<SECTION>__<KEY>=value``) → validate into ``Config`` → check cross-field rules
(aliases unique, pinned models fit). Every failure becomes one ``ConfigError`` whose ``problems`` name
the field path and the fix, e.g. ``models."gemma3:270m".ctx_size: must be > 0``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from controller.errors import ConfigError, InvalidModelName
from controller.names import canonical, validate_model_name
from proxy.keepalive import DurationError, parse_go_duration, parse_keep_alive

ENV_PREFIX = "LLAMACONTROLLER_"
ENV_CONFIG_PATH = "LLAMACONTROLLER_CONFIG"


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
        return int(float(match.group(1)) * powers[unit])
    return value


Seconds = Annotated[float, BeforeValidator(_seconds), Field(ge=0)]
KeepAlive = Annotated[float, BeforeValidator(_keep_alive)]
ByteSize = Annotated[int, BeforeValidator(_byte_size), Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    listen: str = "127.0.0.1:11434"
    data_dir: Path = Path("~/.local/share/llamacontroller")
    max_body_bytes: ByteSize = 64 * 2**20

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError('must be "host:port", e.g. "127.0.0.1:11434" or "0.0.0.0:11434"')
        return value


class RuntimeConfig(_Strict):
    kind: Literal["process"] = "process"
    stop_timeout: Seconds = 10.0
    keep_backends_on_exit: bool = False


class LlamaServerConfig(_Strict):
    binary: str | None = None
    env: dict[str, str] = Field(default_factory=dict)


class ModelDefaults(_Strict):
    ctx_size: int = Field(default=4096, gt=0)
    n_gpu_layers: int | None = None
    keep_alive: KeepAlive = 300.0
    startup_timeout: Seconds = 120.0
    health_interval: Seconds = 1.0
    args: list[str] = Field(default_factory=list)
    max_concurrent: int = Field(default=4, gt=0)
    queue_depth: int = Field(default=512, ge=0)


GpuSelection = Literal["all", "none"] | list[Annotated[int, Field(ge=0)]]


class ModelConfig(_Strict):
    path: Path
    aliases: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    gpus: GpuSelection = "all"
    ctx_size: int | None = Field(default=None, gt=0)
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


class UpstreamConfig(_Strict):
    """The gateway's connections to backends."""

    connect_timeout: Seconds = 10.0
    write_timeout: Seconds = 60.0
    # To the first byte of an answer: a non-streamed generation answers only when it is done.
    response_timeout: Seconds = 600.0


class AuthConfig(_Strict):
    enabled: bool = True  # off only for a throwaway loopback setup: then anyone who can connect is admin
    identity_ttl: Seconds = 30.0  # lifetime of the signed identity header that the edge forwards
    session_ttl: Seconds = 12 * 3600.0
    token_cache_ttl: Seconds = 5.0  # a revocation takes effect within this long
    login_max_failures: int = Field(default=5, gt=0)
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
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
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


# ---------------------------------------------------------------- pipeline


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(value: Any, env: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of parsed YAML.

    Done after parsing, so comments are left alone and an env value can never inject YAML structure.
    An unset variable without a default is an error.
    """
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return _ENV_REF.sub(replace, node)
        if isinstance(node, dict):
            return {walk(key): walk(item) for key, item in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    result = walk(value)
    if missing:
        raise ConfigError(
            "config refers to unset environment variables",
            [f"${{{name}}}: not set; export it or write ${{{name}:-default}}" for name in missing],
        )
    return result


def apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``LLAMACONTROLLER_SERVER__LISTEN=0.0.0.0:11434`` sets ``server.listen``; values parse as YAML scalars."""
    merged: dict[str, Any] = dict(raw)
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or key == ENV_CONFIG_PATH:
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split("__") if part]
        if not path or path[0] not in Config.model_fields:
            continue
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[path[-1]] = yaml.safe_load(value) if value else value
    return merged


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        text = str(item)
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
            parts.append(text)
        else:
            parts.append(f'"{text}"')
    return ".".join(parts) or "(top level)"


def _known_fields(loc: tuple[int | str, ...]) -> list[str]:
    """Field names valid at the place an unknown key was found, for a "did you mean" hint."""
    model: type[BaseModel] = Config
    parts = list(loc[:-1])
    while parts:
        field = model.model_fields.get(str(parts[0]))
        if field is None:
            return []
        if parts[0] == "models":
            model, parts = ModelConfig, parts[2:]
            continue
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model, parts = annotation, parts[1:]
    return list(model.model_fields)


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "extra_forbidden":
        loc = error["loc"]
        close = difflib.get_close_matches(str(loc[-1]), _known_fields(loc), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; remove it"
        return f"unknown field{hint}"
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return "must be a whole number"
    if kind in {"bool_parsing", "bool_type"}:
        return "must be true or false"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    message = str(error["msg"])
    return message[:1].lower() + message[1:]


def validate_config(raw: object) -> Config:
    """Turn parsed YAML (plus overrides) into a Config or one ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("invalid config", ["(top level): must be a mapping of sections"])
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
            # Union members ("list[...]", "literal[...]") add noise to the path, not information.
            loc = tuple(p for p in loc if not re.match(r"(list|literal|int|str)\[", str(p)))
            problems.append(f"{_field_path(loc)}: {_describe(error)}")
        raise ConfigError("invalid config", sorted(set(problems))) from exc
    _check_cross_fields(config)
    return config


def _check_cross_fields(config: Config) -> None:
    problems: list[str] = []
    owners: dict[str, str] = {}
    for name, model in config.models.items():
        for alias in [name, *model.aliases]:
            key = canonical(alias)
            if key in owners and owners[key] != name:
                problems.append(
                    f'models."{name}".aliases: "{alias}" is already used by "{owners[key]}"; names must be unique'
                )
            owners.setdefault(key, name)
    host = config.server.listen.rpartition(":")[0].strip("[]")
    if not config.auth.enabled and host not in ("127.0.0.1", "localhost", "::1"):
        problems.append(
            "auth.enabled: authentication may only be turned off on a loopback address "
            f"(server.listen is {config.server.listen})"
        )
    pinned = [name for name, model in config.models.items() if model.pinned]
    if len(pinned) > config.scheduling.max_loaded_models:
        problems.append(
            f"scheduling.max_loaded_models: {len(pinned)} models are pinned but only "
            f"{config.scheduling.max_loaded_models} may be loaded; raise it or unpin some"
        )
    if problems:
        raise ConfigError("invalid config", problems)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths in a config file are relative to the file, not to the working directory."""

    def resolve(path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (base / path)

    server = config.server.model_copy(update={"data_dir": resolve(config.server.data_dir)})
    models = {
        name: m.model_copy(update={"path": resolve(m.path), "mmproj": resolve(m.mmproj) if m.mmproj else None})
        for name, m in config.models.items()
    }
    models_dir = resolve(config.models_dir) if config.models_dir else None
    return config.model_copy(update={"server": server, "models": models, "models_dir": models_dir})


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """The whole pipeline: file (optional) → env substitution → YAML → overrides → Config."""
    env = os.environ if env is None else env
    raw: object = {}
    base = Path.cwd()
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            raw = substitute_env(yaml.safe_load(text), env)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from exc
        base = path.resolve().parent
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = apply_env_overrides(raw, env)
    return _resolve_paths(validate_config(raw), base)
