"""Audit chain version per record: ``audit_events.chain_version``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Records written before this revision keep version 1 (the column's default); the
store writes version 2 from now on (gateway.audit.chain explains both). Adding a
column with a default rewrites no row and fires no trigger, on SQLite or
PostgreSQL, so the append-only triggers of 0002 stay as they are.

Downgrading is refused while version 2 records exist: revision 0002 would verify
them as version 1, and report every one as edited.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "audit_events",
        sa.Column("chain_version", sa.SmallInteger(), nullable=False, server_default="1"),
    )


def downgrade() -> None:
    newer = op.get_bind().execute(
        sa.text("SELECT count(*) FROM audit_events WHERE chain_version <> 1")
    )
    if newer.scalar_one():
        raise RuntimeError(
            "audit_events holds records of chain version 2, which revision 0002 cannot verify"
        )
    # Plain ALTER TABLE (SQLite 3.35+, PostgreSQL): batch mode would copy the table
    # and drop its append-only triggers.
    op.execute("ALTER TABLE audit_events DROP COLUMN chain_version")
