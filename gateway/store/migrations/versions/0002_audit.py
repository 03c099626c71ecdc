"""Audit trail: the append-only, hash-chained ``audit_events`` table and session seals.

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-15

Adds ``audit_events`` and the ``sessions`` columns ``audit_count``, ``audit_head``
and ``audit_seal`` (NULL for sessions that ended before this revision: they have
no records, and verification accepts an unsealed session without records).

Append-only is enforced twice: the Store has no code that updates or deletes an
audit row, and triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL) for
everyone else. The triggers stop accidents and casual edits; someone who can drop
them is caught by the keyed hash chain instead (gateway.audit.chain).

Note for later revisions: SQLite's batch mode rebuilds a table by copying it,
which drops its triggers; a revision that batch-alters ``audit_events`` must
create them again (``_create_sqlite_triggers``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MESSAGE = "audit_events is append-only"


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def _create_sqlite_triggers() -> None:
    for operation in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER audit_events_no_{operation.lower()} "
            f"BEFORE {operation} ON audit_events "
            f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}: {operation} is not allowed'); END"
        )


def _create_postgresql_triggers() -> None:
    op.execute(
        "CREATE FUNCTION pam_audit_events_append_only() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN "
        f"RAISE EXCEPTION '{_MESSAGE}: % is not allowed', TG_OP "
        "USING ERRCODE = 'insufficient_privilege'; "
        "END $$"
    )
    op.execute(
        "CREATE TRIGGER audit_events_no_update_delete BEFORE UPDATE OR DELETE "
        "ON audit_events FOR EACH ROW EXECUTE FUNCTION pam_audit_events_append_only()"
    )
    op.execute(
        "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE "
        "ON audit_events FOR EACH STATEMENT EXECUTE FUNCTION pam_audit_events_append_only()"
    )


def upgrade() -> None:
    op.add_column("sessions", sa.Column("audit_count", sa.Integer(), nullable=True))
    op.add_column("sessions", sa.Column("audit_head", sa.String(64), nullable=True))
    op.add_column("sessions", sa.Column("audit_seal", sa.String(64), nullable=True))
    op.create_table(
        "audit_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("connection_id", sa.String(32), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("occurred_at", _timestamp(), nullable=False),
        sa.Column("recorded_at", _timestamp(), nullable=False),
        sa.Column("protocol", sa.String(16), nullable=True),
        sa.Column("sql", sa.Text(), nullable=True),
        sa.Column("statement_name", sa.Text(), nullable=True),
        sa.Column("portal_name", sa.Text(), nullable=True),
        sa.Column("parameters", sa.Text(), nullable=True),
        sa.Column("command_tag", sa.Text(), nullable=True),
        sa.Column("rows", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("sqlstate", sa.String(5), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.Column("copy_direction", sa.String(3), nullable=True),
        sa.Column("copy_bytes", sa.BigInteger(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_audit_events_session_id_sessions"
        ),
        sa.UniqueConstraint("session_id", "seq", name="uq_audit_events_session_id_seq"),
    )
    op.create_index("ix_audit_events_occurred_at", "audit_events", ["occurred_at"])
    if op.get_bind().dialect.name == "postgresql":
        _create_postgresql_triggers()
    else:
        _create_sqlite_triggers()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE audit_events")
        op.execute("DROP FUNCTION pam_audit_events_append_only()")
    else:
        op.drop_table("audit_events")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("audit_seal")
        batch.drop_column("audit_head")
        batch.drop_column("audit_count")
