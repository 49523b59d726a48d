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
from typing import Any

from pydantic import BaseModel, ValidationError

from common.errors import ConfigError
from common.names import canonical
from controller.config_schema import (
    AuthConfig,
    Config,
    ModelConfig,
)
from controller.config_yaml import load_yaml

__all__ = ["ENV_CONFIG_PATH", "AuthConfig", "Config", "ModelConfig", "load_config", "validate_config"]

ENV_PREFIX = "LLAMACONTROLLER_"
ENV_CONFIG_PATH = "LLAMACONTROLLER_CONFIG"
MAX_INTEGER = 2**63 - 1


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
    """``LLAMACONTROLLER_SERVER__LISTEN=0.0.0.0:11434`` sets ``server.listen``; values parse as YAML (a value
    that does not is a ConfigError naming the variable)."""
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
        node[path[-1]] = load_yaml(value, f"environment variable {key}") if value else value
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
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
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


def _out_of_range(node: Any, loc: tuple[int | str, ...] = ()) -> list[str]:
    """Integers too large for any setting, by field path: pydantic would take them, and then ``float()``
    or the backends' own parsers could not."""
    if isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_INTEGER:
        # Not the value itself: str() of an int past 4,300 digits raises.
        return [f"{_field_path(loc)}: out of range (a whole number here is below 2**63 in size)"]
    if isinstance(node, dict):
        return [problem for key, value in node.items() for problem in _out_of_range(value, (*loc, str(key)))]
    if isinstance(node, list):
        return [problem for index, value in enumerate(node) for problem in _out_of_range(value, (*loc, index))]
    return []


def validate_config(raw: object) -> Config:
    """Turn parsed YAML (plus overrides) into a Config or one ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("invalid config", ["(top level): must be a mapping of sections"])
    out_of_range = _out_of_range(raw)
    if out_of_range:
        raise ConfigError("invalid config", out_of_range)
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
    if not config.auth.enabled and not config.server.listen_address.loopback:
        problems.append(
            "auth.enabled: authentication may only be turned off on a loopback address "
            f"(server.listen is {config.server.listen})"
        )
    problems += _edge_problems(config)
    problems += _election_problems(config)
    pinned = [name for name, model in config.models.items() if model.pinned]
    if len(pinned) > config.scheduling.max_loaded_models:
        problems.append(
            f"scheduling.max_loaded_models: {len(pinned)} models are pinned but only "
            f"{config.scheduling.max_loaded_models} may be loaded; raise it or unpin some"
        )
    if problems:
        raise ConfigError("invalid config", problems)


def _election_problems(config: Config) -> list[str]:
    """Each kind of election uses what the shape already has: the store's Redis, the runtime's cluster."""
    kind = config.server.leader_election.kind
    if kind == "redis" and config.store.kind != "redis":
        return [
            "server.leader_election: kind redis takes its lock in store.redis_url; set store.kind redis "
            "(controllers that share a leader share a store)"
        ]
    if kind == "kubernetes" and config.runtime.kind != "kubernetes":
        return [
            "server.leader_election: kind kubernetes keeps its Lease in the kubernetes runtime's namespace; "
            "set runtime.kind kubernetes, or use kind redis"
        ]
    return []


def _edge_problems(config: Config) -> list[str]:
    edge = config.edge
    if not edge.enabled:
        return []
    problems = []
    tls = edge.tls
    if tls.mode == "files" and not (tls.cert_file and tls.key_file):
        problems.append("edge.tls: mode files needs cert_file and key_file")
    if tls.mode == "acme" and not (edge.hostname and tls.email):
        problems.append("edge.tls: mode acme needs edge.hostname (a public DNS name) and edge.tls.email")
    if edge.supervise and not edge.admin_address.loopback:
        problems.append(
            f"edge.admin: Caddy's admin API has no authentication; a supervised Caddy keeps it on loopback "
            f"(it is {edge.admin})"
        )
    if edge.listen == config.server.listen:
        problems.append("edge.listen: must differ from server.listen (the app keeps its own HTTP listener)")
    return problems


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
    tls = config.edge.tls
    tls = tls.model_copy(
        update={
            "cert_file": resolve(tls.cert_file) if tls.cert_file else None,
            "key_file": resolve(tls.key_file) if tls.key_file else None,
        }
    )
    edge = config.edge.model_copy(update={"tls": tls})
    return config.model_copy(update={"server": server, "models": models, "models_dir": models_dir, "edge": edge})


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
        ) from exc


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """The whole pipeline: file (optional) → env substitution → YAML → overrides → Config."""
    env = os.environ if env is None else env
    raw: object = {}
    base = Path.cwd()
    if path is not None:
        raw = substitute_env(load_yaml(_read_text(path), f"config file {path}"), env)
        base = path.resolve().parent
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = apply_env_overrides(raw, env)
    return _resolve_paths(validate_config(raw), base)
