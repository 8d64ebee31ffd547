"""`connector bounces`: list the addresses suppressed after bounces, and clear one (parse and print only;
the work is in connector.commands.bounces)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from connector import optout, report
from connector.commands import bounces
from connector.config import LEDGER, Environment, load_config
from connector.errors import ConfigError, ConnectorError

bounces_app = typer.Typer(
    help="Addresses suppressed after bounces (per patient), until the EHR has another or you clear them.",
    no_args_is_help=True,
)
ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="Config file (env CONNECTOR_CONFIG).", show_default=True)
]
DEFAULT_CONFIG = Environment().config


def _stop(exc: ConnectorError) -> typer.Exit:
    """As the other commands say it: a config's problems one a line, anything else one line on stderr."""
    if isinstance(exc, ConfigError):
        report.console.print(report.styled(f"{len(exc.problems)} problem(s):", "red"))
        for problem in exc.problems:
            report.console.print(f"  {problem}", markup=False)
    else:
        print(f"error: {exc}", file=sys.stderr)
    return typer.Exit(2)


@bounces_app.command("list")
def bounces_list(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Addresses suppressed now: source, patient, the masked address, why and since when."""
    try:
        entries = bounces.bounces_list(load_config(config, LEDGER))
    except ConnectorError as exc:
        raise _stop(exc) from None
    report.bounces(entries)


@bounces_app.command("clear")
def bounces_clear(
    email: Annotated[str, typer.Option("--email", help="The address that bounced.")],
    source: Annotated[str | None, typer.Option("--source", help="Only for this source's patient.")] = None,
    patient: Annotated[str | None, typer.Option("--patient", help="Only for this Patient id.")] = None,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Try this address again (mail that was skipped stays skipped; new mail goes)."""
    try:
        cleared = bounces.bounces_clear(load_config(config, LEDGER), email, source, patient)
    except ConnectorError as exc:
        raise _stop(exc) from None
    report.console.print(f"cleared {cleared} suppression(s) of {optout.hint('email', email)}", markup=False)
