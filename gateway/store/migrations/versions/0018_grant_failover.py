"""Failover: which gateway holds each session now, what another needs to take
it over, and where each gateway can be reached.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07

Adds to ``sessions``:

* ``holder_id``: the gateway holding the grant now (its door, its expiry timer,
  its heartbeat watch). It starts as ``gateway_id`` (sealed: the gateway that
  opened it) and moves when another gateway takes the grant over after the
  CLI failed over to it; crash recovery goes by it. Existing rows get their
  ``gateway_id``.
* ``client_public_key``: for a grant opened from another host, the PEM of the
  public key its client certificate was issued for (public, not a secret): the
  only key any gateway of the fleet admits for it.
* ``idle_timeout_seconds`` and ``idle_policy``: the allowing policy's idle
  timeout, so a gateway taking the grant over cuts idle connections as the
  one that opened it did.

And the table ``gateways``: each gateway's advertised control API URL,
written at its start, so that ``pam login`` learns the fleet.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    op.add_column("sessions", sa.Column("holder_id", sa.Text(), nullable=True))
    op.add_column("sessions", sa.Column("client_public_key", sa.Text(), nullable=True))
    op.add_column("sessions", sa.Column("idle_timeout_seconds", sa.Integer(), nullable=True))
    op.add_column("sessions", sa.Column("idle_policy", sa.Text(), nullable=True))
    op.execute("UPDATE sessions SET holder_id = gateway_id")
    op.create_index("ix_sessions_holder_id", "sessions", ["holder_id"])
    op.create_table(
        "gateways",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("api_url", sa.Text(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("gateways")
    op.drop_index("ix_sessions_holder_id", "sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("idle_policy")
        batch.drop_column("idle_timeout_seconds")
        batch.drop_column("client_public_key")
        batch.drop_column("holder_id")
