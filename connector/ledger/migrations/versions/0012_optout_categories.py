"""Opt-outs by category, with where each came from: a patient's unsubscribe link, a bounce or an operator.

`category` '' means every email (the only kind before this revision); a patient may be on the list once per
category, so the unique constraint takes the category in.

`link_recipient` records, when an email with an unsubscribe link is prepared, the keyed opt-out digest of the
address it goes to: the unsubscribe then opts out exactly that address without reading the EHR.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.ledger.schema import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("optout") as batch:
        batch.add_column(sa.Column("category", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("origin", sa.String(16), nullable=False, server_default="operator"))
        batch.drop_constraint("uq_optout_kind_digest", type_="unique")
        batch.create_unique_constraint("uq_optout_kind_digest_category", ["kind", "digest", "category"])
    op.create_table(
        "link_recipient",
        sa.Column("notification_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("notification_id", "kind", "digest"),
    )
    op.create_index("ix_link_recipient_recorded_at", "link_recipient", ["recorded_at"])


def downgrade() -> None:
    op.drop_index("ix_link_recipient_recorded_at", table_name="link_recipient")
    op.drop_table("link_recipient")
    # Before this revision an entry meant every email: category entries would widen on the way down. Drop them.
    op.execute(sa.text("DELETE FROM optout WHERE category <> ''"))
    with op.batch_alter_table("optout") as batch:
        batch.drop_constraint("uq_optout_kind_digest_category", type_="unique")
        batch.create_unique_constraint("uq_optout_kind_digest", ["kind", "digest"])
        batch.drop_column("origin")
        batch.drop_column("category")
