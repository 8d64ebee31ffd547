"""The console role of the ledger on SQLite and PostgreSQL: chart buckets per hour and day, skip reasons, the
oldest due, keyset pages, actions by filter bounded and audited, sessions signed out; and the SVG chart drawn
from buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert

from connector.ledger.console import Bucket, Search
from connector.ledger.engine import N
from connector.ledger.sql import SqlLedger
from connector.models import State
from connector.web.console import chart
from tests.console_harness import row

NOW = datetime(2026, 12, 1, 12, 30, tzinfo=UTC)


def _insert(ledger: SqlLedger, rows: list[dict[str, object]]) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(insert(N), rows)


def test_buckets_count_each_state_per_hour_and_day(ledger: SqlLedger) -> None:
    at = [NOW - timedelta(minutes=10), NOW - timedelta(minutes=20), NOW - timedelta(hours=2), NOW - timedelta(days=3)]
    states = [State.SENT, State.SENT, State.FAILED, State.SKIPPED]
    rows = [row(f"k{i}", f"a{i}", s, t, updated_at=t) for i, (s, t) in enumerate(zip(states, at, strict=True))]
    rows.append(row("pending", "ap", State.PENDING, NOW, updated_at=NOW))  # pending is not a result: not charted
    _insert(ledger, rows)
    hours = ledger.console.buckets(NOW - timedelta(hours=23), "hour")
    assert sorted(hours, key=lambda b: b.start) == [
        Bucket("2026-12-01 10", "failed", 1),
        Bucket("2026-12-01 12", "sent", 2),
    ]
    days = ledger.console.buckets(NOW - timedelta(days=29), "day")
    assert sorted(days, key=lambda b: (b.start, b.state)) == [
        Bucket("2026-11-28", "skipped", 1),
        Bucket("2026-12-01", "failed", 1),
        Bucket("2026-12-01", "sent", 2),
    ]


def test_skip_reasons_and_oldest_due(ledger: SqlLedger) -> None:
    assert ledger.console.oldest_due() is None
    _insert(
        ledger,
        [
            row("s1", "a1", State.SKIPPED, NOW, reason="no email address"),
            row("s2", "a2", State.SKIPPED, NOW, reason="no email address"),
            row("c1", "a3", State.CANCELLED, NOW, reason="appointment cancelled"),
            row("p1", "a4", State.PENDING, NOW + timedelta(hours=5)),
            row("p2", "a5", State.PENDING, NOW + timedelta(hours=1)),
        ],
    )
    assert ledger.console.skipped_reasons(NOW - timedelta(days=1)) == [
        ("no email address", 2),
        ("appointment cancelled", 1),
    ]
    assert ledger.console.oldest_due() == NOW + timedelta(hours=1)


def test_keyset_pages_and_bounded_audited_actions_by_filter(ledger: SqlLedger) -> None:
    _insert(ledger, [row(f"f{i}", f"a{i}", State.FAILED, NOW - timedelta(hours=i), attempts=1) for i in range(7)])
    first = ledger.console.search(Search(state=State.FAILED), None, 3)
    second = ledger.console.search(Search(state=State.FAILED), first[-1].id, 3)
    assert [n.id for n in first + second] == sorted((n.id for n in first + second), reverse=True)
    assert len({n.id for n in first + second}) == 6
    window = Search(state=State.FAILED, since=NOW - timedelta(hours=2, minutes=30))  # f0, f1, f2
    changed = ledger.console.act("retry", "olivia", "operator", "outage over", search=window)
    assert changed == 3
    states = {n.key: n.state for n in ledger.console.search(Search(), None, 10)}
    assert [states[f"f{i}"] for i in range(7)] == [State.PENDING] * 3 + [State.FAILED] * 4
    log = ledger.console.audit_log(None, 10)
    summary = [e for e in log if e.notification_id is None]
    assert len(summary) == 1 and summary[0].count == 3 and summary[0].scope.startswith("state=failed, due>=")
    assert len([e for e in log if e.notification_id is not None]) == 3
    again = ledger.console.act("retry", "olivia", "operator", "again", search=window)
    assert again == 0  # none of them is failed any more; the request itself is still recorded
    assert len(ledger.console.audit_log(None, 10)) == 5


def test_resend_of_an_in_doubt_one_counts_a_resend_and_never_one_paubox_reported_on(ledger: SqlLedger) -> None:
    _insert(
        ledger,
        [
            row("d1", "a1", State.IN_DOUBT, NOW),
            row("d2", "a2", State.IN_DOUBT, NOW, delivery_status="delivered", delivery_rank=3),
        ],
    )
    ids = {n.key: n.id for n in ledger.console.search(Search(), None, 10)}
    assert ledger.console.act("resolve-resend", "olivia", "operator", "lost", notification_id=ids["d1"]) == 1
    assert ledger.console.act("resolve-resend", "olivia", "operator", "lost", notification_id=ids["d2"]) == 0
    d1 = ledger.console.detail(ids["d1"])
    assert d1 is not None and d1.record.state is State.PENDING and d1.record.resends == 1
    assert [a.action for a in d1.audit] == ["resolve-resend"]


def test_a_sign_out_is_kept_until_its_cookie_would_have_expired(ledger: SqlLedger) -> None:
    first, second = "a" * 64, "b" * 64
    ledger.console.sign_out(first, NOW + timedelta(hours=1), NOW)
    ledger.console.sign_out(first, NOW + timedelta(hours=1), NOW)  # twice (a double click) is once
    assert ledger.console.signed_out(first) and not ledger.console.signed_out(second)
    ledger.console.sign_out(second, NOW + timedelta(hours=3), NOW + timedelta(hours=2))
    assert ledger.console.signed_out(second)
    assert not ledger.console.signed_out(first)  # past its cookie's end: forgotten at the next sign-out


def test_the_chart_draws_one_bar_part_per_state_and_hour() -> None:
    labels = chart.slots(NOW, "hour")
    assert len(labels) == 24 and labels[-1] == "2026-12-01 12" and labels[0] == "2026-11-30 13"
    svg = chart.stacked_bars(
        [Bucket("2026-12-01 12", "sent", 4), Bucket("2026-12-01 12", "failed", 1), Bucket("2026-12-01 11", "sent", 2)],
        labels,
        "per hour <24h>",
    )
    assert svg.count("<rect") == 3 + len(chart.SERIES)  # bars plus the legend's swatches
    assert "2026-12-01 12: 4 sent" in svg and "per hour &lt;24h&gt;" in svg
    assert len(chart.slots(NOW, "day")) == 30
