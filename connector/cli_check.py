"""`connector check`: parse, run the checks (connector.commands.check), print one line per check
(connector.report) or JSON. Registered on the `connector` app by connector.cli."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

from connector import preflight, report
from connector.commands import check as checking
from connector.config import Environment

ENV = Environment()


def check(
    config: Annotated[Path, typer.Option("--config", "-c", help="Config file (env CONNECTOR_CONFIG).")] = ENV.config,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout: ok, and each check.")] = False,
) -> None:
    """Preflight: touch the ledger, every FHIR source, Paubox (or the SMTP relay) and the webhooks' public
    URLs without sending anything; one line per check, ✓ or ✗ with what to do. Exit 0 only when all pass."""
    checks = asyncio.run(checking.run(config))
    if as_json:
        print(json.dumps(preflight.as_json(checks), indent=2))
    else:
        report.checks(checks)
    if not preflight.passed(checks):
        raise typer.Exit(1)
