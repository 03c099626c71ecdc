"""Single sign-on with OpenID Connect: the provider, the group mapping, the bindings.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06

* ``sso_providers``: the gateway's OpenID Connect client registration (one row,
  ``id`` ``oidc``): issuer, client id, the client secret sealed with the master
  key (gateway.credentials.secretbox, bound to the row by its associated data),
  the claim that carries groups, the scopes asked for, and the public base of
  the callback URL when set.
* ``sso_group_mappings``: a value of the groups claim -> a pam group, and
  optionally a project whose ``member`` role its holders get.
* ``principal_identities``: which identity provider subject a principal is
  (issuer, subject), unique; a principal is found by this binding, never by name.
* ``principal_groups.source`` and ``role_bindings.source``: ``manual`` (an
  admin's, every row from before) or ``sso`` (set by the last sign-in, replaced
  at the next).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SOURCED = ("principal_groups", "role_bindings")


def _timestamp() -> sa.String:
    return sa.String(32).with_variant(postgresql.TIMESTAMP(timezone=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "sso_providers",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("client_secret_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("groups_claim", sa.String(255), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("redirect_base", sa.Text(), nullable=True),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sso_providers"),
    )
    op.create_table(
        "sso_group_mappings",
        sa.Column("claim_value", sa.String(255), nullable=False),
        sa.Column("group_name", sa.String(63), nullable=False),
        sa.Column("project", sa.String(63), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("claim_value", name="pk_sso_group_mappings"),
    )
    op.create_table(
        "principal_identities",
        sa.Column("principal_id", sa.String(32), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("last_sign_in_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("principal_id", name="pk_principal_identities"),
        sa.UniqueConstraint("issuer", "subject", name="uq_principal_identities_issuer_subject"),
        sa.ForeignKeyConstraint(
            ["principal_id"],
            ["principals.id"],
            name="fk_principal_identities_principal_id_principals",
        ),
    )
    for table in _SOURCED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("source", sa.String(8), nullable=False, server_default="manual")
            )


def downgrade() -> None:
    for table in _SOURCED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("source")
    for table in ("principal_identities", "sso_group_mappings", "sso_providers"):
        op.drop_table(table)
