"""Master key rotation: the active key version, each gateway's ring, old audit keys.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06

Adds ``master_key_state`` (one row, id 1: the fleet's active master key version,
1 for every store from before this revision, whose secrets are all sealed in
format 1, which means version 1), ``gateway_key_versions`` (the versions each
gateway's key ring holds, as it reports them with its presence renewals) and
``audit_keys`` (the audit chain key of each earlier version, sealed under the
active master key). New tables only: nothing existing is rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    state = op.create_table(
        "master_key_state",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("active_version", sa.BigInteger(), nullable=False),
        sa.Column("activated_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_master_key_state"),
    )
    op.bulk_insert(state, [{"id": 1, "active_version": 1, "activated_at": None}])
    op.create_table(
        "gateway_key_versions",
        sa.Column("gateway_id", sa.String(128), nullable=False),
        sa.Column("versions", sa.Text(), nullable=False),
        sa.Column("reported_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("gateway_id", name="pk_gateway_key_versions"),
    )
    op.create_table(
        "audit_keys",
        sa.Column("version", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=False),
        sa.Column("added_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_audit_keys"),
    )


def downgrade() -> None:
    op.drop_table("audit_keys")
    op.drop_table("gateway_key_versions")
    op.drop_table("master_key_state")
