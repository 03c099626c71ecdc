"""The refusal record: every refused API call and grant connection, floods summarised.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

One row per refusal, or per (source, reason) summary of an interval
(gateway.audit.refusals explains which): when (first and last), where (``api`` or
``listener`` and the grant's session), from which address, who when known, why
(a short code and the message) and how many. Append-only as ``audit_events``
is: triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MESSAGE = "refusals is append-only"


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def _create_triggers() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER refusals_no_{operation.lower()} "
                f"BEFORE {operation} ON refusals "
                f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}: {operation} is not allowed'); END"
            )
        return
    op.execute(
        "CREATE FUNCTION pam_refusals_append_only() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN "
        f"RAISE EXCEPTION '{_MESSAGE}: % is not allowed', TG_OP "
        "USING ERRCODE = 'insufficient_privilege'; "
        "END $$"
    )
    op.execute(
        "CREATE TRIGGER refusals_no_update_delete BEFORE UPDATE OR DELETE "
        "ON refusals FOR EACH ROW EXECUTE FUNCTION pam_refusals_append_only()"
    )
    op.execute(
        "CREATE TRIGGER refusals_no_truncate BEFORE TRUNCATE "
        "ON refusals FOR EACH STATEMENT EXECUTE FUNCTION pam_refusals_append_only()"
    )


def upgrade() -> None:
    op.create_table(
        "refusals",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("first_at", _timestamp(), nullable=False),
        sa.Column("last_at", _timestamp(), nullable=False),
        sa.Column("place", sa.String(16), nullable=False),
        sa.Column("session_id", sa.String(32), nullable=True),
        sa.Column("source_addr", sa.Text(), nullable=False),
        sa.Column("who", sa.Text(), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("recorded_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_refusals"),
    )
    op.create_index("ix_refusals_last_at", "refusals", ["last_at"])
    _create_triggers()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE refusals")
        op.execute("DROP FUNCTION pam_refusals_append_only()")
    else:
        op.drop_table("refusals")
