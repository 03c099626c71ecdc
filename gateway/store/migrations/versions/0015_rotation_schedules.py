"""Rotation schedules, leases, and the rotation record's chain.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-14

Adds to ``accounts`` a rotation schedule (``rotation_interval_seconds``,
``next_rotation_at``, ``rotation_failures``: scheduled attempts failed in a row)
and the gateway that started the rotation in flight (``pending_gateway_id``);
to the ``rotations`` record the gateway that ran each rotation and a keyed hash
chain (``seq``, ``prev_hash``, ``hash``) whose sealed length and last hash are
``rotation_head`` (one row, created here empty); and ``leases`` (a name held by
one gateway until it expires: the scheduler's, and each gateway's presence).

Records written before this revision have no ``seq`` and are not covered by the
chain (the key lives outside the database, so a migration cannot seal them).
The added columns are added in place: the append-only triggers of revision
0014 stay.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GENESIS = "0" * 64


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    # op.add_column is ALTER TABLE ... ADD COLUMN on both backends (no table copy
    # on SQLite, which would drop the rotations table's triggers).
    op.add_column("accounts", sa.Column("rotation_interval_seconds", sa.Integer(), nullable=True))
    op.add_column("accounts", sa.Column("next_rotation_at", _timestamp(), nullable=True))
    op.add_column(
        "accounts",
        sa.Column("rotation_failures", sa.Integer(), nullable=False, server_default="0"),
    )
    op.add_column("accounts", sa.Column("pending_gateway_id", sa.Text(), nullable=True))
    op.create_index("ix_accounts_next_rotation_at", "accounts", ["next_rotation_at"])
    op.add_column("rotations", sa.Column("gateway_id", sa.Text(), nullable=True))
    op.add_column("rotations", sa.Column("seq", sa.Integer(), nullable=True))
    op.add_column("rotations", sa.Column("prev_hash", sa.String(64), nullable=True))
    op.add_column("rotations", sa.Column("hash", sa.String(64), nullable=True))
    op.create_index("ix_rotations_seq", "rotations", ["seq"], unique=True)
    head = op.create_table(
        "rotation_head",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("head", sa.String(64), nullable=False),
        sa.Column("seal", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rotation_head"),
    )
    op.bulk_insert(head, [{"id": 1, "count": 0, "head": _GENESIS, "seal": None}])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("acquired_at", _timestamp(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("rotation_head")
    op.drop_index("ix_rotations_seq", "rotations")
    for column in ("hash", "prev_hash", "seq", "gateway_id"):
        op.drop_column("rotations", column)
    op.drop_index("ix_accounts_next_rotation_at", "accounts")
    for column in (
        "pending_gateway_id",
        "rotation_failures",
        "next_rotation_at",
        "rotation_interval_seconds",
    ):
        op.drop_column("accounts", column)
