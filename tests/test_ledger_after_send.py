"""The after-send role of the ledger (webhook confirmations, resends, an operator's decisions), run against
SQLite and the real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from connector.ledger import SendResult
from connector.ledger.sql import SqlLedger
from connector.models import State
from tests.factories import NOW, planned


def test_an_operator_cancelled_doubt_is_never_rearmed(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a")])
    wall = datetime.now(UTC)
    [record] = ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)
    ledger.outbox.start_sending(record.id, "w1", wall + timedelta(minutes=5))
    ledger.outbox.finish([SendResult(record.id, State.IN_DOUBT, "timeout")])
    assert ledger.after_send.resolve("a", State.CANCELLED, "operator", [State.IN_DOUBT])
    assert ledger.intake.add([planned("a")]) == []  # planned again (a replay): stays cancelled
    assert ledger.reports.existing(["a"])["a"].state is State.CANCELLED


def test_a_webhook_confirms_a_resent_copy_before_it_goes(ledger: SqlLedger) -> None:
    ledger.intake.add([planned("a")])
    wall = datetime.now(UTC)
    [record] = ledger.outbox.claim_due(NOW, 10, "w1", wall + timedelta(minutes=5), wall)
    ledger.outbox.start_sending(record.id, "w1", wall + timedelta(minutes=5))
    ledger.outbox.finish([SendResult(record.id, State.IN_DOUBT, "timeout")])
    assert ledger.after_send.resend(record.id, NOW, "policy", [State.IN_DOUBT], first_only=True)
    assert ledger.reports.existing(["a"])["a"].first_attempt_at is None  # the age limit starts again
    assert ledger.after_send.confirm("a", "track-1", "confirmed by a Paubox webhook")  # the first copy arrived
    assert ledger.reports.existing(["a"])["a"].state is State.SENT
    assert not ledger.after_send.resend(record.id, NOW, "policy", [State.SENT, State.IN_DOUBT], first_only=True)
