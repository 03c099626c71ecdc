"""Credential rotation: rotation roles, pending passwords, managed accounts, the record.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07

Adds to ``resources`` the rotation role (``rotation_username``, its sealed
password ``rotation_ciphertext``); to ``accounts`` ``managed`` and the rotation
in flight (``pending_ciphertext``, ``pending_rotation_id``,
``pending_started_at``, ``pending_started_by``, ``pending_via``); and the
append-only ``rotations`` record (one row per rotation or stored password, never
the password; triggers refuse UPDATE and DELETE, and TRUNCATE on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MESSAGE = "rotations is append-only"


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def _create_triggers() -> None:
    if op.get_bind().dialect.name != "postgresql":
        for operation in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER rotations_no_{operation.lower()} "
                f"BEFORE {operation} ON rotations "
                f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}: {operation} is not allowed'); END"
            )
        return
    op.execute(
        "CREATE FUNCTION pam_rotations_append_only() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN "
        f"RAISE EXCEPTION '{_MESSAGE}: % is not allowed', TG_OP "
        "USING ERRCODE = 'insufficient_privilege'; "
        "END $$"
    )
    op.execute(
        "CREATE TRIGGER rotations_no_update_delete BEFORE UPDATE OR DELETE "
        "ON rotations FOR EACH ROW EXECUTE FUNCTION pam_rotations_append_only()"
    )
    op.execute(
        "CREATE TRIGGER rotations_no_truncate BEFORE TRUNCATE "
        "ON rotations FOR EACH STATEMENT EXECUTE FUNCTION pam_rotations_append_only()"
    )


def upgrade() -> None:
    with op.batch_alter_table("resources") as batch:
        batch.add_column(sa.Column("rotation_username", sa.Text(), nullable=True))
        batch.add_column(sa.Column("rotation_ciphertext", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("managed", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("pending_ciphertext", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("pending_rotation_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("pending_started_at", _timestamp(), nullable=True))
        batch.add_column(sa.Column("pending_started_by", sa.Text(), nullable=True))
        batch.add_column(sa.Column("pending_via", sa.String(16), nullable=True))
    op.create_table(
        "rotations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("rotation_id", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("resource_name", sa.String(63), nullable=False),
        sa.Column("account_name", sa.String(63), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("via", sa.String(16), nullable=True),
        sa.Column("started_by", sa.Text(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=False),
        sa.Column("ended_at", _timestamp(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rotations"),
    )
    op.create_index("ix_rotations_account_id_id", "rotations", ["account_id", "id"])
    _create_triggers()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE rotations")
        op.execute("DROP FUNCTION pam_rotations_append_only()")
    else:
        op.drop_table("rotations")
    with op.batch_alter_table("accounts") as batch:
        for column in (
            "pending_via",
            "pending_started_by",
            "pending_started_at",
            "pending_rotation_id",
            "pending_ciphertext",
            "managed",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("resources") as batch:
        batch.drop_column("rotation_ciphertext")
        batch.drop_column("rotation_username")
