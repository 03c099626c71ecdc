"""The pending-statement bookkeeping of :class:`~gateway.audit.pairing.StatementTracker`.

Role: what the tracker remembers between a client message and its outcome: a
:class:`Pending` entry per Query, Parse, Execute and FunctionCall (every Sync
shares :data:`SYNC_ENTRY`), and what a connection has prepared and bound
(:class:`Prepared`, :class:`Portal`). The pairing itself (which outcome finishes
which entry, PostgreSQL 15 docs, 55.2.3 "Extended Query") lives in the tracker.

Invariants: entries are built on the event loop for every statement, so they are
slotted and their kinds are plain ints, not an enum (compared on every tapped
message). :data:`SYNC_ENTRY` is never changed: nothing of a Sync's entry is
ever written.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.audit.decoding import ParameterRow
from gateway.audit.records import AuditProtocol, AuditStatus, CopyDirection

__all__ = [
    "EXECUTE_OR_QUERY",
    "KIND_EXECUTE",
    "KIND_FUNCTION",
    "KIND_PARSE",
    "KIND_QUERY",
    "KIND_SYNC",
    "PROTOCOLS",
    "SYNC_ENTRY",
    "Pending",
    "Portal",
    "Prepared",
]

# What a pending entry waits for an outcome of (plain ints: compared on every
# tapped message).
KIND_QUERY = 1
KIND_PARSE = 2
KIND_EXECUTE = 3
KIND_FUNCTION = 4
KIND_SYNC = 5
EXECUTE_OR_QUERY = (KIND_EXECUTE, KIND_QUERY)
PROTOCOLS: dict[int, AuditProtocol] = {
    KIND_QUERY: "simple",
    KIND_PARSE: "extended",
    KIND_EXECUTE: "extended",
    KIND_FUNCTION: "function_call",
}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement a Parse prepared: its redacted SQL and parameter types."""

    sql: str
    param_types: tuple[int, ...]
    #: whether the parameters may carry a secret (Redactor.hides_parameters)
    hides_parameters: bool


@dataclass(frozen=True, slots=True)
class Portal:
    """A portal a Bind created: the statement it runs and its logged parameters."""

    statement: str
    sql: str
    parameters: tuple[ParameterRow, ...] | None


class Pending:
    """A client message waiting for its outcome (one per Query, Parse, Execute,
    FunctionCall; every Sync shares one)."""

    __slots__ = (
        "client_bytes_at",
        "copy",
        "copy_bytes",
        "ended_ns",
        "error",
        "kind",
        "parameters",
        "portal",
        "rows",
        "server_bytes_at",
        "sql",
        "sqlstate",
        "started_ns",
        "statement",
        "status",
        "tag",
    )

    def __init__(
        self,
        kind: int,
        started_ns: int,
        sql: str | None = None,
        statement: str | None = None,
        portal: str | None = None,
        parameters: tuple[ParameterRow, ...] | None = None,
        client_bytes_at: int = 0,
    ) -> None:
        self.kind = kind
        self.started_ns = started_ns
        self.sql = sql
        self.statement = statement
        self.portal = portal
        self.parameters = parameters
        #: the command tags so far, "; "-joined (a Query may run several)
        self.tag: str | None = None
        self.rows: int | None = None
        self.copy: CopyDirection | None = None
        #: COPY byte counters when this entry's COPY started
        self.server_bytes_at = 0
        self.client_bytes_at = client_bytes_at
        self.status: AuditStatus | None = None
        self.ended_ns = 0
        self.sqlstate: str | None = None
        self.error: str | None = None
        self.copy_bytes: int | None = None

    def add_tag(self, tag: str) -> None:
        self.tag = tag if self.tag is None else self.tag + "; " + tag


#: The one pending entry every Sync shares (see StatementTracker.client).
SYNC_ENTRY = Pending(KIND_SYNC, 0)
