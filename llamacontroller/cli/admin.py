"""``llamacontroller user ...`` and ``llamacontroller token ...``: the store, from the command line.

Passwords are read from the terminal (twice) or from the first line of stdin, never from argv (argv is
visible to every user of the machine). ``token create`` prints only the secret, so it can be captured.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.errors import ConfigError, LlamaControllerError
from controller.auth.admin import INITIAL_PASSWORD_FILE, Administration
from controller.config import ENV_CONFIG_PATH, Config, load_config
from controller.store import make_store

ACTOR = "cli"


def _read_password(prompt: str) -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"{prompt}: ")
    if getpass.getpass("again: ") != first:
        raise LlamaControllerError("the passwords differ")
    return first


def config_from_args(args: argparse.Namespace) -> Config:
    """The config of ``--config`` (or $LLAMACONTROLLER_CONFIG), with ``--data-dir`` applied."""
    chosen = args.config or os.environ.get(ENV_CONFIG_PATH)
    config = load_config(Path(chosen) if chosen else None)
    if args.data_dir:
        config = config.model_copy(
            update={"server": config.server.model_copy(update={"data_dir": Path(args.data_dir).resolve()})}
        )
    return config


def _run(args: argparse.Namespace, work: Callable[[Administration], Awaitable[int]]) -> int:
    async def main() -> int:
        config = config_from_args(args)
        store, _ = make_store(config)  # no Ephemeral: nothing here is rate-limited or throttled
        await store.open()
        try:
            return await work(Administration(store))
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except LlamaControllerError as exc:
        return report(exc)


def report(exc: LlamaControllerError) -> int:
    """Say what went wrong on stderr; the exit code: 2 for a bad config, 1 otherwise."""
    problems = exc.problems if isinstance(exc, ConfigError) else []
    print(f"error: {exc.message}", *problems, sep="\n  ", file=sys.stderr)
    return 2 if isinstance(exc, ConfigError) else 1


def user_add(args: argparse.Namespace) -> int:
    async def work(service: Administration) -> int:
        password = _read_password(f"password for {args.name}")
        user = await service.add_user(args.name, password, "admin" if args.admin else "user", ACTOR)
        print(f"added {user.role} '{user.name}'")
        return 0

    return _run(args, work)


def user_list(args: argparse.Namespace) -> int:
    async def work(service: Administration) -> int:
        for user in await service.store.list_users():
            state = "disabled" if user.disabled else "active"
            print(f"{user.name:<24} {user.role:<6} {state}")
        return 0

    return _run(args, work)


def user_passwd(args: argparse.Namespace) -> int:
    async def work(service: Administration) -> int:
        await service.set_password(args.name, _read_password(f"new password for {args.name}"), ACTOR)
        print(f"password of '{args.name}' changed; its sessions were ended")
        if args.name == "admin":  # the first password, kept since the first start, is no longer one
            _kept_password(args).unlink(missing_ok=True)
        return 0

    return _run(args, work)


def user_disable(args: argparse.Namespace) -> int:
    async def work(service: Administration) -> int:
        user = await service.set_disabled(args.name, args.command_name == "disable", ACTOR)
        print(f"'{user.name}' is {'disabled' if user.disabled else 'enabled'}")
        return 0

    return _run(args, work)


def token_create(args: argparse.Namespace) -> int:
    async def work(service: Administration) -> int:
        token, _ = await service.create_token(
            args.owner, args.name, args.scope or ["inference"], args.model or [], args.expires, args.rpm, ACTOR
        )
        print(token)  # the only thing on stdout: `TOKEN=$(llamacontroller token create ...)` works
        return 0

    return _run(args, work)


def token_list(args: argparse.Namespace) -> int:
    async def work(service: Administration) -> int:
        now = time.time()
        for token in await service.store.list_tokens():
            if token.revoked:
                state = "revoked"
            elif token.expires_at is not None and token.expires_at <= now:
                state = "expired"
            else:
                state = "active"
            models = ",".join(token.models) or "*"
            print(f"{token.id}  {token.name:<20} {token.owner:<16} {','.join(token.scopes):<28} {models:<20} {state}")
        return 0

    return _run(args, work)


def token_revoke(args: argparse.Namespace) -> int:
    async def work(service: Administration) -> int:
        await service.revoke_token(args.id, ACTOR)
        print(f"revoked {args.id}")
        return 0

    return _run(args, work)


def _kept_password(args: argparse.Namespace) -> Path:
    return config_from_args(args).data_dir / INITIAL_PASSWORD_FILE


def user_first_password(args: argparse.Namespace) -> int:
    """The first admin's password, as the first start kept it (a container's log never holds it)."""
    kept = _kept_password(args)
    try:
        print(kept.read_text().strip())
    except FileNotFoundError:
        return report(LlamaControllerError(f"no first password is kept in {kept.parent}: it was changed or deleted"))
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--config", help=f"config file (default: ${ENV_CONFIG_PATH})")
        parser.add_argument("--data-dir", help="data directory holding the store (overrides the config)")
        return parser

    user = commands.add_parser("user", help="manage users (password from a prompt or stdin)")
    users = user.add_subparsers(dest="command_name", required=True)
    add = common(users.add_parser("add", help="add a user"))
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="an administrator (default: a user)")
    add.set_defaults(func=user_add)
    common(users.add_parser("list", help="list users")).set_defaults(func=user_list)
    first = common(users.add_parser("first-password", help="print the first admin's password, kept since first start"))
    first.set_defaults(func=user_first_password)
    passwd = common(users.add_parser("passwd", help="change a password"))
    passwd.add_argument("name")
    passwd.set_defaults(func=user_passwd)
    for verb in ("disable", "enable"):
        toggle = common(users.add_parser(verb, help=f"{verb} a user (and their tokens and sessions)"))
        toggle.add_argument("name")
        toggle.set_defaults(func=user_disable)

    token = commands.add_parser("token", help="manage API tokens")
    tokens = token.add_subparsers(dest="command_name", required=True)
    create = common(tokens.add_parser("create", help="create a token; prints only the secret"))
    create.add_argument("--name", required=True)
    create.add_argument("--owner", default="admin", help="the user it acts for (default: admin)")
    create.add_argument("--scope", action="append", help="inference (default), models:manage, metrics, admin")
    create.add_argument("--model", action="append", help="allow only models matching this glob (repeatable)")
    create.add_argument("--expires", help="e.g. 30d, 12h, 2w (default: never)")
    create.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    create.set_defaults(func=token_create)
    common(tokens.add_parser("list", help="list tokens (never their secrets)")).set_defaults(func=token_list)
    revoke = common(tokens.add_parser("revoke", help="revoke a token by id"))
    revoke.add_argument("id")
    revoke.set_defaults(func=token_revoke)
