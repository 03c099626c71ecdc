"""One SQL statement on a signed-in upstream connection, for the gateway's own use.

Rotation sends ``SHOW scram_iterations`` and ``ALTER ROLE ... PASSWORD`` over
the same :func:`~gateway.net.upstream.connect_upstream` sign-in (TCP, TLS per
the resource's ssl mode, SCRAM) that relaying uses, as a simple-protocol Query
(PostgreSQL 15 docs, 55.2.2 "Simple Query"), and reads up to ReadyForQuery.

Invariants:

* Every wait has a deadline; a server that closes or misbehaves is an
  :class:`~gateway.errors.UpstreamError`, a statement it refuses is a
  :class:`StatementResult` with the server's error fields.
* Names and values spliced into SQL go through :func:`quote_identifier` and
  :func:`quote_literal`; a NUL (which neither can carry) is refused.
* Nothing here logs a statement: the caller knows whether one holds a secret.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Final

from gateway.errors import InvalidRequest, UpstreamError
from gateway.net.upstream import UpstreamConnection
from gateway.protocol import messages
from gateway.protocol.constants import BackendType
from gateway.protocol.errors import ProtocolError
from gateway.protocol.framing import MessageReader
from gateway.protocol.messages import ErrorFields
from gateway.protocol.sqlstate import SqlState

__all__ = ["StatementResult", "quote_identifier", "quote_literal", "run_statement"]

#: a statement of ours answers with a few short messages
_MAX_MESSAGE: Final = 1 << 20
_READ_SIZE: Final = 64 * 1024


@dataclass(frozen=True)
class StatementResult:
    """What the server answered: the rows (column values as sent), or its error."""

    rows: list[list[bytes | None]] = field(default_factory=list)
    error: ErrorFields | None = None


def quote_identifier(name: str) -> str:
    """*name* as a quoted SQL identifier (``"`` doubled), whatever it holds."""
    if "\x00" in name:
        raise InvalidRequest("a role name cannot contain a NUL character")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """*value* as a standard SQL string literal (``'`` doubled; backslashes are
    plain characters under ``standard_conforming_strings``, on since 9.1)."""
    if "\x00" in value or "\\" in value:
        raise InvalidRequest("this value cannot be written as a plain SQL literal")
    return "'" + value.replace("'", "''") + "'"


async def run_statement(
    upstream: UpstreamConnection, sql: str, *, timeout: float
) -> StatementResult:
    """Send *sql* as a simple Query and read the answer up to ReadyForQuery."""
    reader = MessageReader(max_length=_MAX_MESSAGE)
    if upstream.leftover:
        reader.feed(upstream.leftover)
        upstream.leftover = b""
    rows: list[list[bytes | None]] = []
    error: ErrorFields | None = None
    try:
        async with asyncio.timeout(timeout):
            upstream.writer.write(messages.query(sql))
            await upstream.writer.drain()
            while True:
                message = reader.next_message()
                if message is None:
                    data = await upstream.reader.read(_READ_SIZE)
                    if not data:
                        raise ProtocolError("the server closed the connection")
                    reader.feed(data)
                    continue
                if message.type == BackendType.DATA_ROW:
                    rows.append(messages.parse_data_row(message.body))
                elif message.type == BackendType.ERROR_RESPONSE:
                    error = messages.parse_error_fields(message.body)
                elif message.type == BackendType.READY_FOR_QUERY:
                    return StatementResult(rows=rows, error=error)
    except TimeoutError:
        raise UpstreamError(
            f"the server did not answer a statement within {timeout:g}s", kind="timeout"
        ) from None
    except ProtocolError as exc:
        raise UpstreamError(
            f"the server's answer to a statement was cut short: {exc.message}",
            kind="protocol",
            sqlstate=SqlState.CONNECTION_FAILURE,
        ) from None
    except OSError as exc:
        raise UpstreamError(
            f"the connection failed during a statement: {exc.strerror or exc}", kind="refused"
        ) from None
