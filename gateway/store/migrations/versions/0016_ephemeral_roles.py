"""A database role per grant: ephemeral accounts and the roles pam made for grants.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-08

Adds to ``accounts`` ``template_role`` and ``cleanup_after_seconds`` (an
ephemeral account; it has no password, so ``password_ciphertext`` becomes
nullable); to ``resources`` ``reassign_to`` (who gets what a grant's role owned);
and ``ephemeral_roles``, the roles made for grants until they are dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("reassign_to", sa.Text(), nullable=True))
    with op.batch_alter_table("accounts") as batch:
        batch.alter_column("password_ciphertext", existing_type=sa.LargeBinary(), nullable=True)
        batch.add_column(sa.Column("template_role", sa.Text(), nullable=True))
        batch.add_column(sa.Column("cleanup_after_seconds", sa.Integer(), nullable=True))
    op.create_table(
        "ephemeral_roles",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("resource_name", sa.String(63), nullable=False),
        sa.Column("account_name", sa.String(63), nullable=False),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("cleanup_after_seconds", sa.Integer(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("disabled_at", _timestamp(), nullable=True),
        sa.Column("drop_after", _timestamp(), nullable=True),
        sa.Column("dropped_at", _timestamp(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", _timestamp(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_ephemeral_roles"),
    )
    op.create_index("ix_ephemeral_roles_dropped_at", "ephemeral_roles", ["dropped_at"])
    op.create_index("ix_ephemeral_roles_session_id", "ephemeral_roles", ["session_id"])


def downgrade() -> None:
    op.drop_table("ephemeral_roles")
    # Ephemeral accounts have no password to keep: they go, so the column can
    # be NOT NULL again.
    op.execute("DELETE FROM accounts WHERE password_ciphertext IS NULL")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("cleanup_after_seconds")
        batch.drop_column("template_role")
        batch.alter_column("password_ciphertext", existing_type=sa.LargeBinary(), nullable=False)
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("reassign_to")
