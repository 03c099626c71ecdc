"""The SQL terminal's runs: one statement, in a transaction of its own, on a
browser grant's connection (:mod:`gateway.app.web.grants`).

Invariants:

* A run is one statement in one transaction: ``BEGIN READ ONLY`` by default
  (a write fails with 25006), or, when the user asks for it, a read-write
  transaction committed when the statement succeeds; any failure rolls back.
* Each run sets its own ``statement_timeout`` (``SET LOCAL``, an integer number
  of seconds from 1 to :data:`MAX_TIMEOUT_SECONDS`, never text from the user).
* At most :data:`ROW_CAP` rows are read (through a cursor, one row more to know
  whether more follow). Paging re-runs a read-only statement and skips the
  earlier pages in the cursor (``MOVE FORWARD``); a read-write run is never
  re-run, so its result is not paged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import asyncpg

from gateway.app.web.grants import as_text

__all__ = ["MAX_TIMEOUT_SECONDS", "ROW_CAP", "Outcome", "Run", "run_statement"]

#: The most rows a page of results shows.
ROW_CAP: Final = 500
#: The longest statement timeout a run may ask for.
MAX_TIMEOUT_SECONDS: Final = 300


@dataclass(frozen=True, slots=True)
class Run:
    """What the user asked to run."""

    sql: str
    read_only: bool = True
    timeout_seconds: int = 30
    #: rows to skip (paging a read-only run)
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """A statement's result: its columns and (at most :data:`ROW_CAP`) rows as
    text, or the command tag of a statement that returns none."""

    columns: tuple[str, ...]
    rows: list[tuple[str | None, ...]]
    #: the server's command tag (statements without rows)
    status: str | None
    #: whether rows follow the ones shown
    more: bool
    offset: int

    @property
    def returns_rows(self) -> bool:
        return bool(self.columns)


async def run_statement(connection: asyncpg.Connection, run: Run) -> Outcome:
    """*run* on *connection*; a PostgreSQL error propagates (after the rollback)."""
    async with connection.transaction(readonly=run.read_only):
        # An int from the form, bounded: nothing of the user's text is spliced in.
        await connection.execute(f"SET LOCAL statement_timeout = '{int(run.timeout_seconds)}s'")
        statement = await connection.prepare(run.sql)
        columns = tuple(attribute.name for attribute in statement.get_attributes())
        if not columns:
            await statement.fetch()
            return Outcome((), [], statement.get_statusmsg(), more=False, offset=0)
        cursor = await statement.cursor()
        if run.offset:
            await cursor.forward(run.offset)
        records = await cursor.fetch(ROW_CAP + 1)
    rows = [tuple(as_text(value) for value in record.values()) for record in records[:ROW_CAP]]
    return Outcome(columns, rows, None, more=len(records) > ROW_CAP, offset=run.offset)
