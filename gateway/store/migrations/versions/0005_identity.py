"""Users, machine principals, tokens, roles, policies and projects.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Adds the principals that authenticate to the control API and what decides
their access, a project to every resource (``default`` for those that exist),
and to every session who asked: the principal, the token, the policy and the
reason, the API client's address and the host the CLI reported. Sessions from
before keep their ``requester`` text and have no principal.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SESSION_COLUMNS = (
    ("principal_id", 32),
    ("token_id", 32),
    ("project", 63),
    ("policy_name", 63),
)
_SESSION_TEXT = ("reason", "api_client_addr", "reported_host")


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("disabled_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_principals"),
        sa.UniqueConstraint("name", name="uq_principals_name"),
    )
    op.create_table(
        "principal_groups",
        sa.Column("principal_id", sa.String(32), nullable=False),
        sa.Column("group_name", sa.String(63), nullable=False),
        sa.PrimaryKeyConstraint("principal_id", "group_name", name="pk_principal_groups"),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name="fk_principal_groups_principal_id_principals"
        ),
    )
    op.create_table(
        "role_bindings",
        sa.Column("principal_id", sa.String(32), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("principal_id", "project", name="pk_role_bindings"),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name="fk_role_bindings_principal_id_principals"
        ),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("principal_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=True),
        sa.Column("revoked_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.UniqueConstraint("digest", name="uq_tokens_digest"),
        sa.ForeignKeyConstraint(
            ["principal_id"], ["principals.id"], name="fk_tokens_principal_id_principals"
        ),
    )
    op.create_index("ix_tokens_principal_id", "tokens", ["principal_id"])
    op.create_table(
        "policies",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("subjects", sa.Text(), nullable=False),
        sa.Column("resource_glob", sa.Text(), nullable=False),
        sa.Column("account_glob", sa.Text(), nullable=False),
        sa.Column("max_duration_seconds", sa.Integer(), nullable=False),
        sa.Column("require_reason", sa.Integer(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_policies"),
        sa.UniqueConstraint("name", name="uq_policies_name"),
    )
    op.create_index("ix_policies_project", "policies", ["project"])
    with op.batch_alter_table("resources") as batch:
        batch.add_column(
            sa.Column("project", sa.String(63), nullable=False, server_default="default")
        )
    with op.batch_alter_table("sessions") as batch:
        for name, length in _SESSION_COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length), nullable=True))
        for name in _SESSION_TEXT:
            batch.add_column(sa.Column(name, sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        for name in (*(n for n, _ in _SESSION_COLUMNS), *_SESSION_TEXT):
            batch.drop_column(name)
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("project")
    op.drop_index("ix_policies_project", "policies")
    op.drop_table("policies")
    op.drop_index("ix_tokens_principal_id", "tokens")
    for table in ("tokens", "role_bindings", "principal_groups", "principals"):
        op.drop_table(table)
