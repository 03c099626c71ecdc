"""Alembic environment for the state store: online mode only, on a given connection.

Role: glue between ``alembic.command.upgrade`` and the connection that
:meth:`gateway.store.Store.open` already holds (inside its transaction, so the
whole upgrade commits or rolls back as one unit).

Invariants: never creates an engine, never reads an ini file and never configures
logging (the entry point owns logging); offline (SQL script) mode is refused.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from gateway.store.schema import VERSION_TABLE, metadata

config = context.config

if context.is_offline_mode():
    raise RuntimeError("the state store migrations run online only, via Store.open()")

connection = config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "the state store migrations need config.attributes['connection']; run them via Store.open()"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    # Harmless on PostgreSQL, and it keeps future revisions portable.
    render_as_batch=True,
)

with context.begin_transaction():
    context.run_migrations()
