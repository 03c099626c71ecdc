"""When a relayed connection is idle: no bytes either way and no query running.

A policy may cut connections idle for longer than its ``idle_timeout_seconds``
(``pam policy add --idle-timeout 15m``). :class:`IdleWatch` is the rule, as pure
bookkeeping the relay feeds: the time of the last chunk in either direction,
and how many client messages still wait for their ReadyForQuery.

Invariants:
* A query in flight is never idle, however long the server stays silent (a
  ``pg_sleep(3600)``): a Query, a Sync or a FunctionCall each earns exactly one
  ReadyForQuery (55.2.2 "Simple Query", 55.2.3 "Extended Query", 55.2.5
  "Function Call"), so a connection waits on the server while it has seen
  more of those than ReadyForQuery messages. A ReadyForQuery the client did
  not ask for (the greeting's) is not counted.
* The relay needs one timer per connection, not a call per chunk: a chunk
  only stores the time; the timer wakes at ``last activity + limit`` and, if
  there was traffic since, sleeps again for what is left (:meth:`IdleWatch.due`).
"""

from __future__ import annotations

from typing import Final

from gateway.protocol.constants import BackendType, FrontendType
from gateway.protocol.framing import TappedMessage

__all__ = ["AWAITS_READY", "READY", "IdleWatch"]

#: client messages each answered by exactly one ReadyForQuery
AWAITS_READY: Final = frozenset(
    {int(FrontendType.QUERY), int(FrontendType.SYNC), int(FrontendType.FUNCTION_CALL)}
)
READY: Final = int(BackendType.READY_FOR_QUERY)


class IdleWatch:
    """The idle rule of one connection, fed by its relay (clock: the loop's)."""

    __slots__ = ("awaiting", "last_activity", "limit")

    def __init__(self, limit: float, now: float) -> None:
        self.limit = limit
        self.last_activity = now
        #: Query/Sync/FunctionCall messages forwarded and not yet answered by a
        #: ReadyForQuery
        self.awaiting = 0

    def client_sent(self, tapped: list[TappedMessage], now: float) -> None:
        """A client chunk was forwarded; *tapped* are its tapped messages."""
        self.last_activity = now
        for message in tapped:
            if message.type in AWAITS_READY:
                self.awaiting += 1

    def server_sent(self, tapped: list[TappedMessage], now: float) -> None:
        """A server chunk was forwarded."""
        self.last_activity = now
        if self.awaiting:
            for message in tapped:
                if message.type == READY and self.awaiting:
                    self.awaiting -= 1

    def due(self, now: float) -> float | None:
        """None when the connection has been idle for the limit; else how long
        until it could be (a query in flight: a whole limit from now)."""
        if self.awaiting:
            return self.limit
        left = self.last_activity + self.limit - now
        return None if left <= 0 else left
