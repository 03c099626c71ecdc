"""The gateway's persistent state: resources, accounts, sessions and connections.

Role: the public face of the store package. Import :class:`Store` and the record
models from here; the other modules (one per aggregate, ``engine``,
``validation``, ``schema``, ``migrations``) are internal.

Invariant: records returned from here never carry a password; only
:meth:`Store.reveal_password` returns one. The audit trail (``AuditRecord``) is
append-only and verified with :meth:`Store.verify_audit`, which returns
``ChainProblem`` reports.
"""

from __future__ import annotations

from gateway.audit.verify import ChainProblem
from gateway.store.connections import ConnectionEnd, ConnectionStart
from gateway.store.models import (
    CONNECTION_END_REASONS,
    SESSION_END_REASONS,
    SSL_MODES,
    AccessSession,
    Account,
    AuditParameter,
    AuditRecord,
    ConnectionEndReason,
    ConnectionRecord,
    Resource,
    SessionCounts,
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
    "AuditParameter",
    "AuditRecord",
    "ChainProblem",
    "ConnectionEnd",
    "ConnectionEndReason",
    "ConnectionRecord",
    "ConnectionStart",
    "Resource",
    "SessionCounts",
    "SessionEndReason",
    "SslMode",
    "Store",
    "StoreError",
]
