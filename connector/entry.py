"""The `connector` executable. `connector --version` answers without importing the heavy modules (FHIR
models, SQLAlchemy, httpx, Starlette, Jinja2); everything else goes to the command line in cli.py."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("connector")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "unknown"


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-V"]):
        print(f"connector {package_version()}")
        return
    from connector.cli import main as cli_main

    cli_main()
