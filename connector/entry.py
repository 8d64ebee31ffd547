"""The `connector` executable. `connector --version` answers without importing the heavy modules (FHIR
models, SQLAlchemy, httpx, Starlette, Jinja2); everything else goes to the command line in cli.py.

Importing the command line creates about a million objects that live as long as the process (classes,
functions, SQLAlchemy and pydantic machinery). The cyclic garbage collector would walk them all, several
times, while they are being created (about 0.2 s of CPU, a sixth of a `run --once` with nothing due), and
again at every full collection afterwards. So it is paused while they are imported, and what they created
is then frozen (`gc.freeze`: left out of every later collection) before it runs again as usual.
"""

from __future__ import annotations

import gc
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
    gc.disable()
    try:
        from connector.cli import main as cli_main
    finally:
        gc.freeze()
        gc.enable()
    cli_main()
