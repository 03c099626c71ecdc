"""The gateway's persistent state: resources, accounts, sessions and connections.

Role: the public face of the store package. Import :class:`Store` and the record
models from here; ``schema`` and ``migrations`` are internal.

Invariant: records returned from here never carry a password; only
:meth:`Store.reveal_password` returns one.
"""

from __future__ import annotations

from gateway.store.models import (
    CONNECTION_END_REASONS,
    SESSION_END_REASONS,
    SSL_MODES,
    AccessSession,
    Account,
    ConnectionEndReason,
    ConnectionRecord,
    Resource,
    SessionEndReason,
    SslMode,
)
from gateway.store.store import Store, StoreError

__all__ = [
    "CONNECTION_END_REASONS",
    "SESSION_END_REASONS",
    "SSL_MODES",
    "AccessSession",
    "Account",
    "ConnectionEndReason",
    "ConnectionRecord",
    "Resource",
    "SessionEndReason",
    "SslMode",
    "Store",
    "StoreError",
]
