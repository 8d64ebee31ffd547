"""The `connector` command line: parse arguments, load settings, call into the package, print."""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from sqlalchemy.exc import OperationalError

from connector import logs, machine, operate, optout, preview, report
from connector.cli_bounces import bounces_app
from connector.cli_check import check as check_command
from connector.commands import files, ledger, scaffold
from connector.commands import run as running
from connector.commands.console import console_app
from connector.config import LEDGER, Config, Environment, load_config
from connector.entry import package_version
from connector.errors import ConfigError, ConnectorError, InfrastructureError, LedgerError
from connector.ledger.health import describe
from connector.models import Clock, fixed_clock, system_clock
from connector.progress import Bar
from connector.sandbox.cli import sandbox_app
from connector.urls import masked

ENV = Environment()
T = TypeVar("T")
app = typer.Typer(
    help="Turn FHIR appointment events into patient emails through Paubox, exactly once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Manage the ledger database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
optout_app = typer.Typer(
    help="The opt-out list: patients (by identifier) or addresses never written to.", no_args_is_help=True
)
app.add_typer(optout_app, name="optout")

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Config file (env CONNECTOR_CONFIG).", show_default=True)
]
NowOption = Annotated[
    str | None,
    typer.Option(
        "--now",
        help="Act as if it were this instant (ISO 8601 with zone, e.g. 2026-11-22T08:00:00+01:00) for due "
        "times and late rules. The system clock is not touched.",
    ),
]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show what would be sent; change nothing.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (shape in the README) instead of tables.")]


def _instant(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        instant = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 instant", param_hint=option) from None
    if instant.tzinfo is None:
        raise typer.BadParameter("give a time zone, e.g. 2026-11-22T08:00:00+01:00 or ...Z", param_hint=option)
    return instant.astimezone(UTC)


def _needs(dry_run: bool) -> tuple[tuple[str], ...] | None:
    """What a command reads of the config: a dry run sends nothing, so no `${VAR}` of `delivery:`."""
    return tuple((name,) for name in Config.model_fields if name != "delivery") if dry_run else None


def _clock(now: str | None) -> Clock:
    instant = _instant(now, "--now")
    return system_clock if instant is None else fixed_clock(instant)


DEBUG = {"traceback": False}  # --debug: show the traceback of an error that stops a command


def _say(message: str) -> None:
    """One line on stderr, never wrapped: what went wrong and what to do."""
    print(f"error: {message}", file=sys.stderr)


def _fail(exc: ConnectorError) -> typer.Exit:
    if DEBUG["traceback"]:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, LedgerError | InfrastructureError):
        _say(str(exc))
    elif isinstance(exc, ConfigError):
        report.console.print(report.styled(f"{len(exc.problems)} problem(s):", "red"))
        for problem in exc.problems:
            report.console.print(f"  {problem}", markup=False)
    else:
        report.console.print(report.styled("error:", "red", str(exc)), soft_wrap=True)
    return typer.Exit(2)


def _on_ledger(config: Path, work: Callable[[Config], T]) -> T:
    """A command that touches the ledger only (it reads no other secret); its errors stop it (exit 2)."""
    try:
        return work(load_config(config, LEDGER))
    except ConnectorError as exc:
        raise _fail(exc) from None


operate.register(app, _on_ledger, ENV.config)  # resolve, retry
preview.register(app, ENV.config, lambda: DEBUG["traceback"], _instant)  # render


def _print_version(wanted: bool) -> None:
    if wanted:
        print(f"connector {package_version()}")
        raise typer.Exit()


@app.callback()
def main_options(
    log_level: Annotated[
        str, typer.Option(help="debug, info, warning or error (env CONNECTOR_LOG_LEVEL).")
    ] = ENV.log_level,
    log_format: Annotated[str, typer.Option(help="console or json (env CONNECTOR_LOG_FORMAT).")] = ENV.log_format,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Show the traceback of an error that stops a command (a missing database, a port in use...).",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Logs go to stderr and never contain patient data; tables go to stdout."""
    DEBUG["traceback"] = debug
    if log_level not in logs.LEVELS:
        _say(
            f"invalid log level {log_level!r} (--log-level or CONNECTOR_LOG_LEVEL): use one of {', '.join(logs.LEVELS)}"
        )
        raise typer.Exit(2)
    if log_format not in logs.FORMATS:
        _say(f"invalid log format {log_format!r} (--log-format or CONNECTOR_LOG_FORMAT): use console or json")
        raise typer.Exit(2)
    logs.configure(log_level, log_format)


@app.command()
def run(
    config: ConfigOption = ENV.config,
    once: Annotated[
        bool,
        typer.Option(
            "--once", help="One poll of every source and one dispatch, then exit (for cron). Exit 1 if a source failed."
        ),
    ] = False,
    now: NowOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Run the daemon: poll every source on its interval and send due notifications until SIGTERM."""
    clock = _clock(now)
    try:
        cfg = load_config(config, _needs(dry_run))
        if dry_run:
            with Bar() as bar:
                planned = asyncio.run(running.dry_run(cfg, clock, bar))
            report.dry_run(planned)
            return
        result = asyncio.run(running.run(cfg, clock, once=once or now is not None))
    except ConnectorError as exc:
        raise _fail(exc) from None
    if result is not None:
        report.cycle(result)
        if not result.ok:
            raise typer.Exit(1)


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Folder to write into (created if needed).")] = Path(),
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite config.yaml, .env.example and the shipped mapping files.")
    ] = False,
) -> None:
    """Start a deployment: a commented config.yaml, the example mappings, and .env.example naming every
    environment variable the config reads. Never overwrites files (unless --force)."""
    try:
        written = scaffold.init(folder, force=force)
    except ConnectorError as exc:
        raise _fail(exc) from None
    for path in written:
        print(f"wrote {path}{'/' if path.is_dir() else ''}")
    config = written[0]
    print(
        f"next: edit {config}; save {written[2]} as .env with the values filled in, for the service's "
        "environment (compose env_file, systemd EnvironmentFile; a shell: set -a; . ./.env; set +a); then\n"
        f"  connector validate --config {config}\n  connector db upgrade --config {config}\n"
        f"  connector run --config {config}"
    )


@app.command()
def validate(config: ConfigOption = ENV.config) -> None:
    """Check the config, every mapping, that every template compiles, and that every environment variable
    and secret file the config refers to can be read. Exit 0 when all is well."""
    try:
        checked = files.validate(config)
    except ConnectorError as exc:
        raise _fail(exc) from None
    for warning in checked.warnings:
        report.console.print(f"warning: {warning}", markup=False)
    if checked.errors:
        raise _fail(ConfigError(checked.errors))
    names = checked.mappings
    report.console.print(
        f"OK: {config} with {len(checked.config.sources)} source(s) and {len(names)} mapping(s): {', '.join(names)}",
        markup=False,
    )


@app.command()
def replay(
    source: Annotated[str | None, typer.Option(help="Source name, FHIR or CRM (default: the only one).")] = None,
    since: Annotated[str | None, typer.Option(help="Start of the window (meta.lastUpdated, ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option(help="End of the window (ISO 8601).")] = None,
    file: Annotated[Path | None, typer.Option(help="A Bundle or NDJSON file to replay instead of the source.")] = None,
    config: ConfigOption = ENV.config,
    now: NowOption = None,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
    output: Annotated[
        Path | None, typer.Option(help="Write every row to this file: JSON lines, or CSV for a name ending .csv.")
    ] = None,
) -> None:
    """Run the mappings again over a window of a source, or a file. The ledger keeps what was already
    sent from going again; --dry-run says what would be sent and what the ledger suppresses. Prints the
    counts by result (and every row when there are few); --output writes the full list."""
    clock = _clock(now)
    if output is not None and not output.parent.is_dir():  # found out before the replay sends, not after
        raise typer.BadParameter(f"the folder {output.parent} does not exist", param_hint="--output")
    try:
        cfg = load_config(config, _needs(dry_run))
        names = [*cfg.sources, *cfg.crm]
        name = source or (names[0] if len(names) == 1 else None)
        if name is None or name not in names:
            raise typer.BadParameter(f"choose one of: {', '.join(names)}", param_hint="--source")
        if file is None and since is None:
            raise typer.BadParameter("give --since (and optionally --until), or --file", param_hint="--since")
        window = _instant(since, "--since"), _instant(until, "--until")
        with Bar() as bar:
            result = asyncio.run(running.replay(cfg, clock, name, *window, file, dry_run, bar))
    except ConnectorError as exc:
        raise _fail(exc) from None
    if as_json:
        if output is not None:
            machine.write_rows(output, machine.replay_rows(result, dry_run))
        print(json.dumps(machine.replay_json(result, dry_run), indent=2))
    else:
        report.replayed(result, dry_run, output)


@app.command()
def status(config: ConfigOption = ENV.config, as_json: JsonOption = False) -> None:
    """Counts per state, source cursors, and the notifications that need a person (in_doubt, failed)."""
    with Bar() as bar:
        bar.phase("reading the ledger", len(ledger.STATUS_STEPS))
        data = _on_ledger(config, lambda cfg: ledger.status(cfg, lambda _: bar.advance()))
    if as_json:
        print(json.dumps(machine.status_json(data), indent=2))
    else:
        report.status(data)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = ENV.config) -> None:
    """Create or migrate the ledger schema to this version."""
    url, (before, after) = _on_ledger(config, lambda cfg: (masked(cfg.ledger_url), ledger.db_upgrade(cfg)))
    report.console.print(f"ledger {url}: schema {before or 'empty'} -> {after}", markup=False)


@app.command()
def subscribe(
    source: Annotated[str, typer.Argument(help="The source whose Subscription to create or check.")],
    config: ConfigOption = ENV.config,
) -> None:
    """Create the FHIR Subscription configured for SOURCE on its server (or check the one created before)."""
    try:
        cfg = load_config(config)
        if source not in cfg.sources or not cfg.sources[source].subscription.enabled:
            raise typer.BadParameter(f"no source {source!r} with subscription.enabled", param_hint="SOURCE")
        reference, status = asyncio.run(running.subscribe(cfg, source))
    except ConnectorError as exc:
        raise _fail(exc) from None
    report.console.print(f"{reference}: {status}", markup=False)


IdentifierOption = Annotated[
    str | None,
    typer.Option(
        "--identifier", help="Patient identifier as SYSTEM|VALUE (e.g. urn:oid:2.16.840.1.113883.2.4.6.3|123456789)."
    ),
]
EmailOption = Annotated[str | None, typer.Option("--email", help="Email address.")]
CategoryOption = Annotated[str | None, typer.Option(help="Only mappings of this `category:` (default: every email).")]


def _optout_target(identifier: str | None, email: str | None) -> tuple[optout.Kind, str]:
    if (identifier is None) == (email is None):
        raise typer.BadParameter("give exactly one of --identifier or --email")
    if identifier is not None:
        if "|" not in identifier:
            raise typer.BadParameter("write the identifier as SYSTEM|VALUE", param_hint="--identifier")
        return "identifier", identifier
    assert email is not None
    if "@" not in email:
        raise typer.BadParameter("not an email address", param_hint="--email")
    return "email", email


@optout_app.command("add")
def optout_add(
    identifier: IdentifierOption = None,
    email: EmailOption = None,
    note: Annotated[str | None, typer.Option(help="Why (no patient data), e.g. a ticket number.")] = None,
    category: CategoryOption = None,
    config: ConfigOption = ENV.config,
) -> None:
    """Never write to this patient or address again (every mapping, or one category's, every source)."""
    kind, value = _optout_target(identifier, email)
    added = _on_ledger(config, lambda cfg: ledger.optout_add(cfg, kind, value, note, category or ""))
    report.console.print(f"{'added' if added else 'already on the list'}: {kind} {optout.hint(kind, value)}")


@optout_app.command("remove")
def optout_remove(
    identifier: IdentifierOption = None,
    email: EmailOption = None,
    category: CategoryOption = None,
    config: ConfigOption = ENV.config,
) -> None:
    """Take a patient or address off the opt-out list (re-subscribe): every entry, or one category's."""
    kind, value = _optout_target(identifier, email)
    removed = _on_ledger(config, lambda cfg: ledger.optout_remove(cfg, kind, value, category))
    report.console.print(f"{'removed' if removed else 'not on the list'}: {kind} {optout.hint(kind, value)}")
    if not removed:
        raise typer.Exit(1)


@optout_app.command("list")
def optout_list(config: ConfigOption = ENV.config) -> None:
    """The opt-out list. Values are stored as digests; only a masked hint is shown."""
    report.optouts(_on_ledger(config, ledger.optout_list))


@optout_app.command("rekey")
def optout_rekey(config: ConfigOption = ENV.config) -> None:
    """Key the opt-outs stored as plain SHA-256 digests (before optout.keys existed) with the current key
    of optout.keys. Run once after `connector db upgrade`; running it again changes nothing."""
    report.rekeyed(_on_ledger(config, ledger.optout_rekey))


app.command("check")(check_command)
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(console_app, name="console")
app.add_typer(bounces_app, name="bounces")


def main() -> None:
    try:
        app()
    except OperationalError as exc:  # the ledger went away in the middle of a command
        if DEBUG["traceback"]:
            raise
        _say(
            f"the ledger does not answer ({describe(exc)}): check ledger.url and that the database is running, "
            f"then try again"
        )
        sys.exit(2)
