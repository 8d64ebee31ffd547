"""One audit trail and a journal. `audit` takes the rows of `operator_action` (the CLI's resolve/retry) and
`console_audit` (the console's actions, previews, replays), oldest first, and replaces both; `journal`
keeps what happened to each notification and appointment (ids, states, reasons, times).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

CLI_ACTIONS = {  # operator_action.action + to_state → the action's name in `audit`
    ("settle", "sent"): "resolve-sent",
    ("settle", "cancelled"): "resolve-cancel",
    ("requeue", "in_doubt"): "resolve-resend",
    ("requeue", "failed"): "retry",
}


def upgrade() -> None:
    audit = op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("notification_id", sa.BigInteger(), nullable=True),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=True),
        sa.Column("scope", sa.String(500), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_index("ix_audit_notification", "audit", ["notification_id", "id"])
    op.create_table(
        "journal",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("notification_id", sa.BigInteger(), nullable=True),
        sa.Column("source", sa.String(64), nullable=True),
        sa.Column("appointment_id", sa.String(128), nullable=True),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=True),
        sa.Column("detail", sa.String(500), nullable=True),
    )
    op.create_index("ix_journal_at", "journal", ["at"])
    op.create_index("ix_journal_notification", "journal", ["notification_id", "id"])
    op.create_index("ix_journal_appointment", "journal", ["appointment_id", "id"])

    bind = op.get_bind()
    rows = [
        {
            "at": r.at,
            "actor": r.actor,
            "role": "cli" if r.actor.startswith("cli:") else "operator",
            "action": CLI_ACTIONS.get((r.action, r.from_state if r.action == "requeue" else r.to_state), r.action),
            "notification_id": r.notification_id,
            "from_state": r.from_state,
            "to_state": r.to_state,
            "scope": None,
            "count": 1,
            "reason": r.reason,
        }
        for r in bind.execute(sa.text("SELECT * FROM operator_action"))
    ]
    rows += [
        {
            "at": r.at,
            "actor": r.actor,
            "role": r.role,
            "action": r.action,
            "notification_id": r.notification_id,
            "from_state": None,
            "to_state": None,
            "scope": r.scope,
            "count": r._mapping["count"],
            "reason": r.reason,
        }
        for r in bind.execute(sa.text("SELECT * FROM console_audit"))
    ]
    rows.sort(key=lambda row: str(row["at"]))  # the same type from both tables: oldest first, ids follow
    if rows:
        op.bulk_insert(audit, [{**row, "at": _aware(row["at"])} for row in rows])
    op.drop_table("operator_action")
    op.drop_table("console_audit")


def _aware(value: object) -> object:
    """Rows read as text (SQLite) or naive datetimes, given back to UTCDateTime as aware UTC."""
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime) and value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value


def downgrade() -> None:
    op.create_table(
        "operator_action",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("notification_id", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=False),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_operator_action_notification", "operator_action", ["notification_id", "id"])
    op.create_table(
        "console_audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("notification_id", sa.BigInteger(), nullable=True),
        sa.Column("scope", sa.String(500), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
    )
    op.create_index("ix_console_audit_at", "console_audit", ["at"])
    op.create_index("ix_console_audit_notification", "console_audit", ["notification_id", "id"])
    bind = op.get_bind()
    bind.execute(
        sa.text(
            "INSERT INTO operator_action (notification_id, action, from_state, to_state, actor, reason, at) "
            "SELECT notification_id, CASE WHEN to_state = 'pending' THEN 'requeue' ELSE 'settle' END, from_state, "
            "to_state, actor, substr(reason, 1, 200), at FROM audit WHERE role = 'cli' AND notification_id IS NOT NULL "
            "AND from_state IS NOT NULL ORDER BY id"
        )
    )
    bind.execute(
        sa.text(
            "INSERT INTO console_audit (at, actor, role, action, notification_id, scope, count, reason) "
            "SELECT at, actor, role, action, notification_id, scope, count, reason FROM audit WHERE role <> 'cli' "
            "ORDER BY id"
        )
    )
    op.drop_table("journal")
    op.drop_table("audit")
