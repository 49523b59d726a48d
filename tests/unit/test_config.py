from __future__ import annotations

import math
from pathlib import Path

import pytest

from common.errors import ConfigError
from controller.config import Config, apply_env_overrides, load_config, substitute_env, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"


def problems(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate_config(raw)
    return caught.value.problems


def test_config_defaults_live_in_one_place() -> None:
    config = validate_config({})
    assert config.server.listen == "127.0.0.1:11434"
    assert config.runtime.kind == "process"
    assert config.scheduling.max_loaded_models == 1
    assert config.defaults.keep_alive == 300.0
    assert config.models == {}


def test_config_error_names_field_path_and_fix() -> None:
    found = problems({"models": {"gemma3:270m": {"path": "g.gguf", "ctx_size": 0}}})
    assert found == ['models."gemma3:270m".ctx_size: must be > 0']


def test_config_unknown_field_suggests_the_right_one() -> None:
    found = problems({"defaults": {"ctx_sise": 10}})
    assert found == ["defaults.ctx_sise: unknown field; did you mean 'ctx_size'?"]
    found = problems({"models": {"m": {"path": "x", "pinnned": True}}})
    assert found == ["models.m.pinnned: unknown field; did you mean 'pinned'?"]


def test_config_reports_every_problem_at_once() -> None:
    found = problems({"server": {"listen": "nope"}, "scheduling": {"max_loaded_models": 0}})
    assert len(found) == 2
    assert any(p.startswith('server.listen: must be "host:port"') for p in found)
    assert "scheduling.max_loaded_models: must be > 0" in found


@pytest.mark.parametrize("name", ["../etc", "a/b", "x;rm -rf", "a b", "", "m" * 101, "bad:..tag"])
def test_config_rejects_bad_model_names(name: str) -> None:
    found = problems({"models": {name: {"path": "x.gguf"}}})
    assert len(found) == 1 and "models" in found[0]


def test_config_rejects_duplicate_aliases() -> None:
    found = problems(
        {"models": {"a": {"path": "a.gguf", "aliases": ["shared"]}, "b": {"path": "b.gguf", "aliases": ["Shared"]}}}
    )
    assert found == ['models."b".aliases: "Shared" is already used by "a"; names must be unique']


def test_config_pinned_models_must_fit() -> None:
    found = problems({"models": {"a": {"path": "a", "pinned": True}, "b": {"path": "b", "pinned": True}}})
    assert found[0].startswith("scheduling.max_loaded_models: 2 models are pinned")


def test_config_durations_accept_seconds_and_go_strings() -> None:
    config = validate_config(
        {"defaults": {"keep_alive": "1h30m", "startup_timeout": 90}, "models": {"m": {"path": "m", "keep_alive": -1}}}
    )
    assert config.defaults.keep_alive == 5400.0
    assert config.defaults.startup_timeout == 90.0
    assert math.isinf(config.models["m"].keep_alive or 0)
    assert problems({"defaults": {"keep_alive": "5"}}) == [
        'defaults.keep_alive: time: missing unit in duration "5"; '
        'write seconds, a duration like "5m", or -1 for forever'
    ]


def test_config_gpu_memory_budget_parses_sizes() -> None:
    config = validate_config({"scheduling": {"gpu_memory": {"0": "24GiB", "1": 1000}}})
    assert config.scheduling.gpu_memory == {"0": 24 * 2**30, "1": 1000}


def test_config_env_substitution_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("models_dir: ${MODELS:-models}\nmodels:\n  m:\n    path: ${HOME_DIR}/m.gguf\n")
    env = {
        "HOME_DIR": "/srv",
        "LLAMACONTROLLER_SERVER__LISTEN": "0.0.0.0:9999",
        "LLAMACONTROLLER_SCHEDULING__MAX_LOADED_MODELS": "3",
    }
    config = load_config(path, env)
    assert config.server.listen == "0.0.0.0:9999"
    assert config.scheduling.max_loaded_models == 3
    assert config.models["m"].path == Path("/srv/m.gguf")
    assert config.models_dir == tmp_path / "models"  # relative to the file


def test_config_unset_variable_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        substitute_env({"x": "${NOPE}"}, {})
    assert caught.value.problems == ["${NOPE}: not set; export it or write ${NOPE:-default}"]


def test_config_env_overrides_ignore_foreign_keys() -> None:
    merged = apply_env_overrides({}, {"LLAMACONTROLLER_CONFIG": "x", "LLAMACONTROLLER_LOG_LEVEL": "debug", "PATH": "/"})
    assert merged == {}


def test_config_invalid_yaml_says_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path, {})


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_config_every_example_in_config_dir_validates(path: Path) -> None:
    config = load_config(path, {})
    assert isinstance(config, Config)


def test_config_dir_has_examples() -> None:
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")), "config/ must hold at least one example"


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@pytest.mark.parametrize(
    ("hostname", "mode", "email"), [("", "internal", ""), ("llm.example.org", "acme", "ops@example.org")]
)
def test_config_compose_file_validates_with_the_env_example(hostname: str, mode: str, email: str) -> None:
    """deploy/compose/llamacontroller.yaml with what compose.yaml passes from .env (blank means not set)."""
    env = env_example() | {"LLAMACONTROLLER_HOSTNAME": hostname, "TLS_MODE": mode, "ACME_EMAIL": email}
    env["REDIS_PASSWORD"] = "secret"
    config = load_config(ROOT / "deploy" / "compose" / "llamacontroller.yaml", env)
    assert config.runtime.kind == "docker" and config.store.kind == "redis"
    assert config.runtime.docker.path_map == {"/models": "/srv/models"}
    assert config.edge.hostname == (hostname or None) and config.edge.tls.mode == mode
    assert config.edge.tls.email == (email or None)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"defaults": {"health_interval": 0}}, "defaults.health_interval"),
        ({"defaults": {"health_interval": "0s"}}, "defaults.health_interval"),
        ({"edge": {"reconcile_interval": 0}}, "edge.reconcile_interval"),
        ({"runtime": {"kubernetes": {"liveness_period": -1}}}, "runtime.kubernetes.liveness_period"),
    ],
)
def test_config_periods_must_be_positive(section: dict[str, object], field: str) -> None:
    """health_interval 0 was accepted and probed /health without pause (158,695 probes a second, a whole core)."""
    assert problems(section) == [
        f"{field}: must be more than 0 seconds: it is how often something repeats (0 would never pause)"
    ]


# ------------------------------------------- hostile or broken files: a ConfigError, never a traceback

LAUGHS = "\n".join(
    [f"l0: &l0 [{', '.join(['x'] * 10)}]"]
    + [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 6)]  # 10**6 values expanded
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"models_dir: caf\xe9\n", r"is not UTF-8 text \(byte 0xe9 on line 1\)"),
        (b"a: " + b"[" * 20_000 + b"]" * 20_000, r"not valid YAML at line 1, column \d+: nested deeper than 64 levels"),
        (LAUGHS.encode(), r"at line \d+, column \d+: more than 100000 values once its aliases are expanded"),
        (b"a: &a [1, *a]\n", r"an alias refers to a node that contains it"),
        (b"server:\n  max_body_bytes: " + b"9" * 5000, r"at line 2, column \d+: an integer of more than 40 digits"),
        (b"server:\n  listen: !!binary abc\n", r"at line 2, column \d+: !!binary values have no place in a config"),
        (b'server:\n  data_dir: "/tmp/a\\0b"\n', r"at line 2, column \d+: a NUL character has no place in a config"),
        (b'models_dir: "\\ud800"\n', r"at line 1, column \d+: a \\u escape is half a surrogate pair"),
        (b"server:\n  data_dir: /a\nmodels_dir: /m\nserver:\n  listen: x:1\n", r"at line 4, .*'server' is given twice"),
    ],
    ids=[
        *("latin-1", "deep", "billion-laughs", "alias-cycle", "5000-digits", "binary", "nul", "lone-surrogate"),
        "duplicate-key",
    ],
)
def test_config_hostile_files_are_a_clear_error(tmp_path: Path, text: bytes, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path, {})
    assert str(path) in caught.value.message


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"defaults": {"keep_alive": 10**5000}}, "defaults.keep_alive: out of range"),
        ({"server": {"max_body_bytes": 10**400 - 1}}, "server.max_body_bytes: out of range"),
        ({"server": {"max_body_bytes": "9" * 400}}, "server.max_body_bytes: must be at most 1152921504606846976 bytes"),
        ({"server": {"max_body_bytes": "9" * 400 + "GiB"}}, "server.max_body_bytes: must be at most"),
        ({"runtime": {"stop_timeout": math.inf}}, "runtime.stop_timeout: must be <= 1000000000"),
        ({"upstream": {"response_timeout": "9" * 60 + "h"}}, "upstream.response_timeout: must be <= 1000000000"),
        ({"server": {"listen": "127.0.0.1:²"}}, 'server.listen: must be "host:port"'),
        ({"edge": {"listen": "127.0.0.1:" + "9" * 5000}}, 'edge.listen: must be "host:port"'),
    ],
    ids=[
        "keep_alive",
        "max_body_bytes",
        "max_body_bytes-text",
        "max_body_bytes-unit",
        "inf",
        "long",
        "superscript",
        "long-port",
    ],
)
def test_config_numbers_out_of_range_name_the_key(raw: dict[str, object], problem: str) -> None:
    assert any(found.startswith(problem) for found in problems(raw)), problems(raw)


def test_config_keep_alive_beyond_any_timer_is_forever() -> None:
    config = validate_config(
        {"defaults": {"keep_alive": 1e300}, "models": {"m": {"path": "m", "keep_alive": "9" * 40 + "h"}}}
    )
    assert math.isinf(config.defaults.keep_alive) and math.isinf(config.models["m"].keep_alive or 0)


@pytest.mark.parametrize("value", ["[", "!!binary abc", "{a: *b}", "9" * 5000])
def test_config_env_override_that_is_not_yaml_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="environment variable LLAMACONTROLLER_SERVER__LISTEN is not valid YAML"):
        apply_env_overrides({}, {"LLAMACONTROLLER_SERVER__LISTEN": value})


def test_config_merge_keys_may_still_be_overridden() -> None:
    """Refusing a key given twice leaves YAML's merge keys alone: a key beside `<<` overrides the merged one."""
    from controller.config_yaml import load_yaml

    merged = load_yaml("a: &c {k: 1, j: 3}\nb:\n  <<: *c\n  k: 2\n", "t")
    assert merged == {"a": {"k": 1, "j": 3}, "b": {"k": 2, "j": 3}}


@pytest.mark.parametrize("url", ["https://controller.example", "https://controller:11434", "ftp://controller:11434"])
def test_config_the_gateways_controller_is_reached_over_plain_http_only(url: str) -> None:
    # A gateway speaks plain HTTP: an https:// URL would send the shared secret in the clear (to port 80).
    assert any(found.startswith("gateway.controller:") for found in problems({"gateway": {"controller": url}}))
    assert validate_config({"gateway": {"controller": "http://controller:11434/"}}).gateway.controller == (
        "http://controller:11434"
    )
