"""Access requests and their trail.

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-06

``access_requests`` (gateway.access.requests), ``access_events`` (one keyed
hash chain of every request's state changes) with ``access_event_head`` (its
sealed length and last hash; one row, created here empty), and
``sessions.request_id``: the request a session was opened from.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GENESIS = "0" * 64


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "access_requests",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("project", sa.String(63), nullable=False),
        sa.Column("requester_id", sa.String(32), nullable=False),
        sa.Column("requester", sa.Text(), nullable=False),
        sa.Column("resource_name", sa.String(63), nullable=False),
        sa.Column("account_name", sa.String(63), nullable=False),
        sa.Column("duration_seconds", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("policy_name", sa.String(63), nullable=False),
        sa.Column("approvals_required", sa.Integer(), nullable=False),
        sa.Column("approvers", sa.Text(), nullable=False),
        sa.Column("break_glass", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=False),
        sa.Column("open_within_seconds", sa.Integer(), nullable=False),
        sa.Column("approvals", sa.Text(), nullable=False),
        sa.Column("approved_at", _timestamp(), nullable=True),
        sa.Column("use_by", _timestamp(), nullable=True),
        sa.Column("decided_by", sa.Text(), nullable=True),
        sa.Column("decision_note", sa.Text(), nullable=True),
        sa.Column("session_id", sa.String(32), nullable=True),
        sa.Column("extends", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_access_requests"),
    )
    for column in ("state", "requester_id", "project"):
        op.create_index(f"ix_access_requests_{column}", "access_requests", [column])
    op.create_table(
        "access_events",
        sa.Column("seq", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("request_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("occurred_at", _timestamp(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_access_events"),
    )
    op.create_index("ix_access_events_request_id", "access_events", ["request_id"])
    head = op.create_table(
        "access_event_head",
        sa.Column("id", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("head", sa.String(64), nullable=False),
        sa.Column("seal", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_access_event_head"),
    )
    op.bulk_insert(head, [{"id": 1, "count": 0, "head": _GENESIS, "seal": None}])
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("request_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("request_id")
    op.drop_table("access_event_head")
    op.drop_index("ix_access_events_request_id", "access_events")
    op.drop_table("access_events")
    for column in ("state", "requester_id", "project"):
        op.drop_index(f"ix_access_requests_{column}", "access_requests")
    op.drop_table("access_requests")
