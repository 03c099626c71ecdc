"""Alembic migrations of the state store.

Role: the only code that creates or alters the store's tables; run by
:meth:`gateway.store.Store.open` (``upgrade head``) on the connection it passes in
``config.attributes["connection"]``. There is no ``alembic.ini``.

Invariants: revision files never import the live table definitions in
``gateway.store.schema`` (history must not change when the schema module does),
and every revision works on both SQLite and PostgreSQL.
"""
