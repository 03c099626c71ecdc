"""Seals on session and connection rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

``start_seal`` and ``end_seal`` on ``sessions`` and ``connections``: a copy of
the fields a row's start (who asked, from where, under which policy) and end
fixed, with an HMAC under the audit key (gateway.store.sealing), so that
``pam audit verify`` names an edit of those tables. Rows from before have no
seals and are not checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("sessions", "connections")
_COLUMNS = ("start_seal", "end_seal")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            for column in _COLUMNS:
                batch.add_column(sa.Column(column, sa.Text(), nullable=True))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            for column in _COLUMNS:
                batch.drop_column(column)
