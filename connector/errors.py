"""Errors of the connector, grouped by what the caller must do about them.

    ConnectorError
    ├── ConfigError        fatal until a person fixes a file: config, mapping or template.
    │                      Carries a list of Problem (file, line, where, what).
    ├── SourceError        a source could not be read this time (network, HTTP status, bad page);
    │                      the cursor does not move, the next poll tries again.
    ├── LedgerError        the ledger database is unusable (unreachable, schema out of date, folder missing,
    │                      locked by another daemon).
    ├── InfrastructureError  something else the process needs is not there (a port in use, an address).
    └── ResourceError      one resource (or event) cannot be processed; it is quarantined with this text
                           as the reason (connector.intake), everything else goes on.

Delivery outcomes are not exceptions: a send returns an `Outcome` value (see connector.delivery).

No message built here ever contains patient data: errors name files, keys, resource types, ids and
versions, never values taken from a resource.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a file a person wrote."""

    file: Path | None
    line: int | None
    where: str  # a key path such as "sources.ehr.base_url", or a template name
    message: str

    def __str__(self) -> str:
        place = str(self.file) if self.file else "<config>"
        if self.line:
            place += f" line {self.line}"
        where = f" ({self.where})" if self.where else ""
        return f"{place}{where}: {self.message}"


class ConnectorError(Exception):
    """Root of every error raised on purpose by the connector."""


class ConfigError(ConnectorError):
    """One or more problems in the configuration, the mappings or their templates."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SourceError(ConnectorError):
    """A source could not be read this time; the poll is abandoned and its cursor stays put."""


class LedgerError(ConnectorError):
    """The ledger database cannot be used as it is."""


class InfrastructureError(ConnectorError):
    """The machine does not give the process what it needs (a port, an address); a person fixes it."""


class ResourceError(ConnectorError):
    """One resource cannot be processed. The message names type, id, version and element, never values."""
