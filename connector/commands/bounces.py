"""`connector bounces list|clear`: the addresses suppressed after bounces (connector.bounces), and an
operator's clearing of one (the patient confirmed the address works, or the mailbox was fixed)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from connector import optout
from connector.ledger.sql import open_ledger

if TYPE_CHECKING:
    from connector.config import Config

Entry = tuple[str, str, str, str | None, datetime | None]


def bounces_list(config: Config, limit: int = 500) -> list[Entry]:
    ledger = open_ledger(config)
    try:
        return ledger.bounces.entries(limit)
    finally:
        ledger.dispose()


def bounces_clear(config: Config, email: str, source: str | None, patient: str | None) -> int:
    """Clear the suppression of `email` (for one patient of one source, or wherever it bounced); how many."""
    ledger = open_ledger(config)
    try:
        inner = optout.digest("email", email)
        digests = [digest for _, digest in optout.variants(ledger.optouts.optout_keys, inner)]
        return ledger.bounces.clear(digests, source, patient)
    finally:
        ledger.dispose()
