"""Opt-out digests keyed with a secret: which key of `optout.keys` made each one.

Existing rows keep their unkeyed SHA-256 (key_id NULL) and still match; `connector optout rekey` keys them
with the current key (it needs the key, which a migration does not have).

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("optout") as batch:
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=True))


def downgrade() -> None:
    # Keyed rows cannot be turned back into plain SHA-256 digests: they would match nobody. Drop them.
    op.execute(sa.text("DELETE FROM optout WHERE key_id IS NOT NULL"))
    with op.batch_alter_table("optout") as batch:
        batch.drop_column("key_id")
