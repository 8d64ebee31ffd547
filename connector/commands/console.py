"""`connector console`: serve the operator console alone (for sites that run the daemon elsewhere, on the
same ledger), and `add-user`, which hashes a password with argon2 into a file the config then names."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from connector.config import Config, Environment, load_config, require
from connector.errors import ConfigError, ConnectorError, Problem
from connector.files import write_private
from connector.ledger.sql import open_ledger

if TYPE_CHECKING:
    from starlette.applications import Starlette

console_app = typer.Typer(help="The operator console in the browser.", no_args_is_help=True)
ENV = Environment()
CONSOLE = (("ledger",), ("console",), ("server",))  # what the console reads of the config


def console_config(path: Path) -> Config:
    config = load_config(path, CONSOLE)
    if config.console is None:
        raise ConfigError([Problem(path, None, "console", "the console is off: add a `console:` section")])
    if config.server is None:
        raise ConfigError([Problem(path, None, "server", "the console needs `server:` (its address and port)")])
    require(config, CONSOLE)
    return config


def build_app(config: Config) -> tuple[Starlette, object]:
    """The console alone (and `/` redirecting to it), over the ledger; (app, ledger to dispose)."""
    # The web side is imported here: the other commands start without it.
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse
    from starlette.routing import Route

    from connector.web.app import console_routes
    from connector.web.common import guarded

    assert config.console is not None
    ledger = open_ledger(config)
    routes = console_routes(config, ledger)
    home = config.console.path

    async def root(_: object) -> RedirectResponse:
        return RedirectResponse(home, status_code=303)

    wrapped = [Route(r.path, guarded(r.endpoint), methods=list(r.methods or ["GET"])) for r in routes]
    return Starlette(routes=[Route("/", root, methods=["GET"]), *wrapped]), ledger


@console_app.command("serve")
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Config file (env CONNECTOR_CONFIG).")] = ENV.config,
) -> None:
    """Serve the console alone on `server.host`:`server.port` (no webhooks, no polling, no sending)."""
    from connector.web import httpserver

    try:
        settings = console_config(config)
        app, ledger = build_app(settings)
        assert settings.server is not None
        sock = httpserver.listen(settings.server)
    except ConnectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(f"console on http://{settings.server.host}:{settings.server.port}{settings.console.path}", file=sys.stderr)  # type: ignore[union-attr]
    try:
        import uvicorn  # here: the other commands start without the web server

        asyncio.run(uvicorn.Server(httpserver.server_config(app, settings.server)).serve(sockets=[sock]))
    finally:
        ledger.dispose()  # type: ignore[attr-defined]


@console_app.command("add-user")
def add_user(
    name: Annotated[str, typer.Argument(help="The user name (letters, digits, . _ @ -).")],
    hash_file: Annotated[Path, typer.Option("--hash-file", help="Write the argon2 hash here (mode 0600).")],
    role: Annotated[str, typer.Option(help="viewer (reads) or operator (also acts and previews).")] = "viewer",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")] = False,
) -> None:
    """Hash a password with argon2 into a file, and print the lines to add under `console.users`."""
    import re

    from connector.config.console import USER_PATTERN
    from connector.web.console.auth import hash_password

    if not re.fullmatch(USER_PATTERN, name):
        print(f"error: {name!r} is not a user name: use letters, digits, '.', '_', '@' or '-'", file=sys.stderr)
        raise typer.Exit(2)
    if role not in ("viewer", "operator"):
        print("error: --role must be viewer or operator", file=sys.stderr)
        raise typer.Exit(2)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    if len(password) < 12:
        print("error: use a password of at least 12 characters", file=sys.stderr)
        raise typer.Exit(2)
    write_private(hash_file, hash_password(password) + "\n")
    print(f"wrote the hash to {hash_file}; add to the config:\n")
    print(f"console:\n  users:\n    {name}: {{role: {role}, password_hash: {{file: {hash_file.resolve()}}}}}")
