"""Audit chain version 3: the trail in sealed batches, ``audit_batches``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

From this revision the store writes a session's records in sealed batches, one
row per batch (gateway.audit.batch explains the format). ``audit_events`` stays
as it is and keeps verifying: a trail begun there chains on into its batches.
Append-only as ``audit_events`` is: triggers refuse UPDATE and DELETE (and
TRUNCATE on PostgreSQL).

Downgrading is refused while a batch exists: revision 0003 cannot read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MESSAGE = "audit_batches is append-only"


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def _create_triggers() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_batches_no_{operation.lower()} "
                f"BEFORE {operation} ON audit_batches "
                f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}: {operation} is not allowed'); END"
            )
        return
    op.execute(
        "CREATE FUNCTION pam_audit_batches_append_only() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN "
        f"RAISE EXCEPTION '{_MESSAGE}: % is not allowed', TG_OP "
        "USING ERRCODE = 'insufficient_privilege'; "
        "END $$"
    )
    op.execute(
        "CREATE TRIGGER audit_batches_no_update_delete BEFORE UPDATE OR DELETE "
        "ON audit_batches FOR EACH ROW EXECUTE FUNCTION pam_audit_batches_append_only()"
    )
    op.execute(
        "CREATE TRIGGER audit_batches_no_truncate BEFORE TRUNCATE "
        "ON audit_batches FOR EACH STATEMENT EXECUTE FUNCTION pam_audit_batches_append_only()"
    )


def upgrade() -> None:
    op.create_table(
        "audit_batches",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("session_id", sa.String(32), nullable=False),
        sa.Column("first_seq", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("min_at", sa.BigInteger(), nullable=False),
        sa.Column("max_at", sa.BigInteger(), nullable=False),
        sa.Column("kinds", sa.Integer(), nullable=False),
        sa.Column("statement_count", sa.Integer(), nullable=False),
        sa.Column("records", sa.LargeBinary(), nullable=False),
        sa.Column("digests", sa.LargeBinary(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("chain_version", sa.SmallInteger(), nullable=False),
        sa.Column("recorded_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_batches"),
        sa.ForeignKeyConstraint(
            ["session_id"], ["sessions.id"], name="fk_audit_batches_session_id_sessions"
        ),
        sa.UniqueConstraint(
            "session_id", "first_seq", name="uq_audit_batches_session_id_first_seq"
        ),
    )
    op.create_index("ix_audit_batches_max_at", "audit_batches", ["max_at"])
    _create_triggers()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM audit_batches")).scalar_one():
        raise RuntimeError("audit_batches holds records that revision 0003 cannot read")
    if bind.dialect.name == "postgresql":
        op.execute("DROP TABLE audit_batches")
        op.execute("DROP FUNCTION pam_audit_batches_append_only()")
    else:
        op.drop_table("audit_batches")
