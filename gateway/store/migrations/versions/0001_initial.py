"""Initial schema: resources, accounts, sessions, connections.

Revision ID: 0001
Revises:
Create Date: 2024-06-01

Timestamps are ``timestamptz`` on PostgreSQL and fixed-width ISO-8601 UTC strings
elsewhere, matching ``gateway.store.schema.UtcTimestamp``. Written out by hand (not
imported from the schema module) so that this revision never changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def _id() -> sa.String:
    return sa.String(32)


def upgrade() -> None:
    op.create_table(
        "resources",
        sa.Column("id", _id(), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("database", sa.Text(), nullable=False),
        sa.Column("ssl_mode", sa.String(16), nullable=False),
        sa.Column("ca_cert", sa.Text(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_resources"),
        sa.UniqueConstraint("name", name="uq_resources_name"),
    )
    op.create_table(
        "accounts",
        sa.Column("id", _id(), nullable=False),
        sa.Column("resource_id", _id(), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("password_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("password_updated_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.ForeignKeyConstraint(
            ["resource_id"], ["resources.id"], name="fk_accounts_resource_id_resources"
        ),
        sa.UniqueConstraint("resource_id", "name", name="uq_accounts_resource_id_name"),
    )
    op.create_table(
        "sessions",
        sa.Column("id", _id(), nullable=False),
        sa.Column("requester", sa.Text(), nullable=False),
        sa.Column("resource_name", sa.String(63), nullable=False),
        sa.Column("account_name", sa.String(63), nullable=False),
        sa.Column("database", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("listen_host", sa.Text(), nullable=False),
        sa.Column("listen_port", sa.Integer(), nullable=True),
        sa.Column("started_at", _timestamp(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=False),
        sa.Column("ended_at", _timestamp(), nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
        sa.Column("end_detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
    )
    op.create_index("ix_sessions_started_at", "sessions", ["started_at"])
    op.create_index("ix_sessions_ended_at", "sessions", ["ended_at"])
    op.create_index(
        "ix_sessions_resource_name_account_name", "sessions", ["resource_name", "account_name"]
    )
    op.create_table(
        "connections",
        sa.Column("id", _id(), nullable=False),
        sa.Column("session_id", _id(), nullable=False),
        sa.Column("client_addr", sa.Text(), nullable=False),
        sa.Column("application_name", sa.Text(), nullable=True),
        sa.Column("backend_pid", sa.Integer(), nullable=True),
        sa.Column("started_at", _timestamp(), nullable=False),
        sa.Column("ended_at", _timestamp(), nullable=True),
        sa.Column("bytes_from_client", sa.BigInteger(), nullable=False),
        sa.Column("bytes_from_server", sa.BigInteger(), nullable=False),
        sa.Column("end_reason", sa.String(32), nullable=True),
        sa.Column("error_sqlstate", sa.String(5), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_connections"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_connections_session_id_sessions"
        ),
    )
    op.create_index(
        "ix_connections_session_id_started_at", "connections", ["session_id", "started_at"]
    )
    op.create_index("ix_connections_ended_at", "connections", ["ended_at"])


def downgrade() -> None:
    op.drop_table("connections")
    op.drop_table("sessions")
    op.drop_table("accounts")
    op.drop_table("resources")
