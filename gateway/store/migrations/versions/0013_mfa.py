"""Second factors (TOTP) and per-project settings.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07

``mfa_factors``: one row per user who enrolled a second factor (or whose was
reset): the secret sealed with the master key, active or pending its first
code, the time step of the last accepted code, recent wrong codes (JSON) and
who last reset it. ``project_settings``: what a project asks beyond its
policies, today whether approvals need the approver's second factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "mfa_factors",
        sa.Column("principal_id", sa.String(32), nullable=False),
        sa.Column("secret_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("pending_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("enabled_at", _timestamp(), nullable=True),
        sa.Column("last_step", sa.BigInteger(), nullable=True),
        sa.Column("failures", sa.Text(), nullable=False, server_default="[]"),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.Column("reset_by", sa.String(63), nullable=True),
        sa.Column("reset_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("principal_id", name="pk_mfa_factors"),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name="fk_mfa_factors_principal_id_principals"
        ),
    )
    op.create_table(
        "project_settings",
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("approval_mfa", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.Column("updated_by", sa.String(63), nullable=True),
        sa.PrimaryKeyConstraint("project", name="pk_project_settings"),
    )


def downgrade() -> None:
    op.drop_table("project_settings")
    op.drop_table("mfa_factors")
