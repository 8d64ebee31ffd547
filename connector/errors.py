"""Errors of the connector, grouped by what the caller must do about them. Every exception class of the
package is in this tree (the local test servers of connector.sandbox answer their own errors as HTTP
responses to their test clients and are left out):

    ConnectorError
    ├── ConfigError          fatal until a person fixes a file: config, mapping or template.
    │                        Carries a list of Problem (file, line, where, what).
    ├── SourceError          a source could not be read this time (network, HTTP status, bad page);
    │   │                    the cursor does not move, the next poll tries again.
    │   ├── SourceLimitError     a server went past one of `sources.<name>.limits` (sources/bounded.py)
    │   ├── WriteRefused         the server refused a write (a 4xx): the same write would be refused again
    │   ├── StaleVersion         an update named a version no longer current (412): read, decide again
    │   │                        (both sources/fhir_write.py)
    │   └── SmartAuthError       SMART Backend Services refused or failed (sources/smart.py)
    │       └── SmartLimitError  ... by going past a limit (also a SourceLimitError)
    ├── LedgerError          the ledger database is unusable (unreachable, schema out of date, folder missing,
    │                        locked by another daemon).
    ├── InfrastructureError  something else the process needs is not there (a port in use, an address).
    ├── ResourceError        one resource (or event) cannot be processed; it is quarantined with this text
    │                        as the reason (connector.intake.checks), everything else goes on.
    ├── RenderError          a template failed when its notification was due: that one fails (mapping/engine.py)
    ├── SealError            a stored CRM event does not open (wrong key, altered row) (crm/inbox.py)
    ├── SignatureError       a CRM request is not authentic or not fresh: 401, nothing processed (crm/verify.py)
    ├── BodyError            an authentic CRM request whose body cannot be read: 400 (crm/parse.py)
    ├── BadLink              a patient's link that must not act (expired, tampered, ...): 4xx (links.py)
    ├── BadJson              a body is not JSON we accept: 400 (jsontext.py; also a ValueError)
    ├── RequestTooLarge      a request body over `server.max_body`: 413 (web/common.py)
    ├── BadForm              a console form or search field that cannot be understood: 400 (web/console/pages.py;
    │                        also a ValueError)
    ├── BodyTooLarge         a response body over `limits.max_response_size` (sources/bounded.py)
    ├── HarnessError         the test harness could not set up a test's world (connector/testing)
    └── _Unbuildable, _Stop  inside the SMTP mailer only; both end as an Outcome (delivery/smtp.py)

Delivery outcomes are not exceptions: a send returns an `Outcome` value (see connector.delivery).

No message built here ever contains patient data: errors name files, keys, resource types, ids and
versions, never values taken from a resource.

Chaining. At an adapter's edge (a library's error turned into ours: SQLAlchemy, httpx, OSError, the YAML
parser), `raise OurError(...) from exc` keeps the cause for `--debug` and for logs that print it by type
and place. Where the message says everything and the cause could carry data (a pydantic or JSON error
that quotes its input, a URL with a password, a decryption failure), `raise OurError(...) from None`:
the cause is dropped on purpose. A bare `raise OurError(...)` inside an `except` block is neither: say
which one you mean (ruff B904 checks it).
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
