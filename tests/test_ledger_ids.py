"""Row ids past 2**31 (revision 0016): a busy ledger's journal (about ten rows a notification) and its
notifications must not run out of ids on PostgreSQL, whose SERIAL columns and sequences were 32-bit. SQLite's
INTEGER PRIMARY KEY is the 64-bit rowid already and stays one. Both ledgers, through the migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, insert, inspect, select, text

from connector.ledger import migrate
from connector.ledger.engine import make_engine
from connector.ledger.schema import JournalRow, LinkRecipientRow, NotificationRow
from connector.testing import sqlite_url

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
BEYOND = 2**31 + 7
NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
N, J, L = NotificationRow.__table__, JournalRow.__table__, LinkRecipientRow.__table__  # type: ignore[attr-defined]


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    url = (
        sqlite_url(tmp_path / "ledger.db")
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_schema_url"))
    )
    made = make_engine(url)
    request.addfinalizer(made.dispose)
    return made


def _notification(key: str) -> dict[str, object]:
    return {
        "key": key, "source": "ehr", "mapping": "booked", "event": "booked", "resource_type": "Appointment",
        "resource_id": "a1", "resource_version": "1", "patient_id": "p1", "state": "pending", "due_at": NOW,
        "created_at": NOW, "updated_at": NOW,
    }  # fmt: skip


def _move_ids_past_32_bits(engine: Engine) -> None:
    """Where the next ids come from: past 2**31 (a sequence on PostgreSQL, the rowid on SQLite)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            for table in ("notification", "journal"):
                sequence = conn.execute(text(f"SELECT pg_get_serial_sequence('{table}', 'id')")).scalar()
                conn.execute(text("SELECT setval(:sequence, :value)"), {"sequence": sequence, "value": BEYOND})
        else:
            conn.execute(insert(N).values(id=BEYOND, **_notification("seed")))
            conn.execute(insert(J).values(id=BEYOND, at=NOW, event="planned"))


def test_notifications_journal_rows_and_link_recipients_take_ids_beyond_32_bits(engine: Engine) -> None:
    migrate.upgrade(engine)
    _move_ids_past_32_bits(engine)
    with engine.begin() as conn:
        made = conn.execute(insert(N).values(**_notification("k-1")).returning(N.c.id)).scalar_one()
        noted = conn.execute(insert(J).values(at=NOW, event="planned", notification_id=made).returning(J.c.id)).scalar()
        conn.execute(
            insert(L).values(notification_id=made, kind="email", digest="d" * 64, key_id="k1", recorded_at=NOW)
        )
    assert made > 2**31 and noted is not None and noted > 2**31
    with engine.connect() as conn:
        assert conn.execute(select(L.c.notification_id)).scalar_one() == made


def test_revision_0016_widens_the_ids_on_postgresql_and_back(engine: Engine) -> None:
    migrate.upgrade(engine, "0015")
    widths = _widths(engine)
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == "0016"
    if engine.dialect.name == "postgresql":
        assert set(widths.values()) == {"integer"}
        assert set(_widths(engine).values()) == {"bigint"}
    else:
        assert _widths(engine) == widths  # SQLite: nothing to change
    config = migrate._alembic()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0015")
    assert _widths(engine) == widths


def _widths(engine: Engine) -> dict[str, str]:
    """Each widened column's type, and on PostgreSQL its sequence's."""
    found = {}
    columns = inspect(engine)
    for table, column in (("notification", "id"), ("journal", "id"), ("inbox_event", "id"), ("write_back", "id"),
                          ("audit", "id"), ("link_recipient", "notification_id")):  # fmt: skip
        [kind] = [str(c["type"]).lower() for c in columns.get_columns(table) if c["name"] == column]
        found[f"{table}.{column}"] = kind
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            for table in ("notification", "journal", "inbox_event", "write_back", "audit"):
                sequence = conn.execute(text(f"SELECT pg_get_serial_sequence('{table}', 'id')")).scalar()
                found[f"{sequence}"] = conn.execute(
                    text("SELECT data_type FROM pg_sequences WHERE schemaname || '.' || sequencename = :name"),
                    {"name": str(sequence).replace('"', "")},
                ).scalar_one()
    return found
