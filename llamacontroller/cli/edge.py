"""``llamacontroller edge ca`` (the local CA's root certificate), ``edge render`` (the Caddy config) and
``images build`` (the container images, built locally)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from common.errors import LlamaControllerError
from controller.config import ENV_CONFIG_PATH, Config
from controller.edge.admin import CaddyAdmin, EdgeError
from controller.edge.edge import admin_address, caddy_home, edge_settings
from controller.edge.render import render
from llamacontroller.cli.admin import config_from_args, report


def local_ca_file(config: Config) -> Path:
    """Where the embedded Caddy keeps its local CA's root certificate."""
    return caddy_home(config) / "data" / "pki" / "authorities" / "local" / "root.crt"


async def _ca_from_admin(config: Config) -> str:
    admin = CaddyAdmin(admin_address(config), timeout=5)
    try:
        return await admin.ca_certificate()
    finally:
        await admin.close()


def root_certificate(config: Config) -> str:
    """From the running Caddy's admin API, else from the embedded Caddy's storage."""
    try:
        return asyncio.run(_ca_from_admin(config))
    except EdgeError as exc:
        path = local_ca_file(config)
        if path.is_file():
            return path.read_text()
        raise EdgeError(
            f"{exc.message}; and no local CA in {path} yet: start `llamacontroller serve` once (edge.tls.mode "
            "internal), then ask again"
        ) from exc


def cmd_ca(args: argparse.Namespace) -> int:
    try:
        pem = root_certificate(config_from_args(args))
    except LlamaControllerError as exc:
        return report(exc)
    if args.output:
        Path(args.output).write_text(pem)
        print(args.output)
    else:
        print(pem, end="")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except LlamaControllerError as exc:
        return report(exc)
    print(json.dumps(render(edge_settings(config)), indent=2))
    return 0


def cmd_images_build(args: argparse.Namespace) -> int:
    from llamacontroller import images

    try:
        images.build(args.only or ["llama-server", "edge", "app"], images.INSTALLED_TREE, tag=args.tag)
    except LlamaControllerError as exc:
        return report(exc)
    except Exception as exc:  # the Docker SDK's own errors: say which, never a traceback
        print(f"error: could not build the images: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _image_tag(value: str) -> str:
    from llamacontroller import images

    try:
        return images.check_tag(value)
    except ValueError as exc:  # argparse would say only "invalid _image_tag value"
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    images = commands.add_parser("images", help="container images, built locally (no registry needed)")
    image_verbs = images.add_subparsers(dest="command_name", required=True)
    build = image_verbs.add_parser(
        "build", help="build llamacontroller/{llama-server,edge,app}:local from this install"
    )
    build.add_argument("--only", action="append", choices=["llama-server", "edge", "app"], help="build only this one")
    build.add_argument(
        "--tag",
        type=_image_tag,
        default="local",
        help="the images' tag (default: local); set the same in .env's *_IMAGE variables",
    )
    build.set_defaults(func=cmd_images_build)

    edge = commands.add_parser("edge", help="the HTTPS edge (Caddy)")
    verbs = edge.add_subparsers(dest="command_name", required=True)
    ca = verbs.add_parser("ca", help="print the local CA's root certificate (PEM) that clients trust")
    ca.add_argument("--output", help="write it to this file and print the file name")
    ca.set_defaults(func=cmd_ca)
    shown = verbs.add_parser("render", help="print the Caddy config the controller pushes")
    shown.set_defaults(func=cmd_render)
    for parser in (ca, shown):
        parser.add_argument("--config", help=f"config file (default: ${ENV_CONFIG_PATH})")
        parser.add_argument("--data-dir", help="data directory (overrides the config)")
