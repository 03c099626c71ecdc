"""Several gateways on one store: which gateway opened each session, and when
each gateway's lease was last renewed.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06

Adds to ``sessions`` ``gateway_id`` (the gateway that opened it and relays its
connections; NULL for sessions from before this revision, which recovery treats
as a gone gateway's) and to ``leases`` ``renewed_at`` (the holder's last
renewal: what crash recovery records as the end of a gone gateway's sessions).
Both are added in place (ALTER TABLE ... ADD COLUMN on both backends).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    op.add_column("sessions", sa.Column("gateway_id", sa.Text(), nullable=True))
    op.create_index("ix_sessions_gateway_id", "sessions", ["gateway_id"])
    op.add_column("leases", sa.Column("renewed_at", _timestamp(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("renewed_at")
    op.drop_index("ix_sessions_gateway_id", "sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("gateway_id")
