"""Policy controls: approval, break-glass, second factor, idle timeout.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

Adds to ``policies``: ``approvals_required`` (distinct approvers needed, 0 for
none), ``approvers`` (JSON list of names and ``@group``s; empty means the
project's admins), ``break_glass``, ``require_mfa`` and
``idle_timeout_seconds``. Existing policies ask for none of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        batch.add_column(
            sa.Column("approvals_required", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("approvers", sa.Text(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("break_glass", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("require_mfa", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("idle_timeout_seconds", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        for column in (
            "idle_timeout_seconds",
            "require_mfa",
            "break_glass",
            "approvers",
            "approvals_required",
        ):
            batch.drop_column(column)
