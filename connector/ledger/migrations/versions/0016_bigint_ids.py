"""Row ids that outlive 2**31 rows on PostgreSQL: `notification`, `journal` (about ten rows a notification),
`inbox_event`, `write_back` and `audit` get BIGINT ids drawn from bigint sequences, and `link_recipient`'s
`notification_id` follows. SQLite's INTEGER PRIMARY KEY is already the 64-bit rowid: nothing to do there.

On PostgreSQL each ALTER rewrites its table under an exclusive lock: on a large ledger, run `connector db
upgrade` in a quiet hour, with the daemons stopped (as for every revision).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

ROW_IDS = ("notification", "journal", "inbox_event", "write_back", "audit")
REFERENCES = (("link_recipient", "notification_id"),)


def upgrade() -> None:
    _retype("BIGINT")


def downgrade() -> None:
    _retype("INTEGER")


def _retype(sql_type: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table in ROW_IDS:
        op.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN id TYPE {sql_type}"))
        sequence = bind.execute(sa.text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table}).scalar()
        if sequence is not None:  # created as SERIAL: its sequence is `AS integer` since PostgreSQL 10
            op.execute(sa.text(f"ALTER SEQUENCE {sequence} AS {sql_type}"))
    for table, column in REFERENCES:
        op.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {sql_type}"))
