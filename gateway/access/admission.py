"""Admission: whether a grant may be opened and a connection let in.

Policy (who may ask for what, approvals) extends this module. Today:
* a grant request needs a duration within ``max_grant_seconds`` and a port in
  range, and none is accepted while the gateway shuts down;
* the gateway as a whole refuses new connections while any gateway-wide check
  says so (fail-closed audit); the first refusal wins. The per-grant checks of a
  connection's startup packet (user, database) stay with the listener.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from gateway.errors import InvalidRequest
from gateway.net.relay import Termination

MAX_PORT = 65535


def check_grant_request(
    *, duration_seconds: int, port: int | None, max_grant_seconds: int, closing: bool
) -> None:
    """Raise :class:`InvalidRequest` for a grant that may not be opened."""
    if closing:
        raise InvalidRequest("the gateway is shutting down")
    if not 1 <= duration_seconds <= max_grant_seconds:
        raise InvalidRequest(
            f"duration must be between 1 second and {timedelta(seconds=max_grant_seconds)}",
            hint="ask for a shorter --duration",
        )
    if port is not None and not 0 <= port <= MAX_PORT:
        raise InvalidRequest(f"port {port} is out of range")


@dataclass
class Admission:
    #: gateway-wide checks, each returning why new connections are refused now
    checks: Sequence[Callable[[], Termination | None]] = field(default_factory=tuple)

    def refusal(self) -> Termination | None:
        """Why the gateway as a whole refuses new connections right now, if it does."""
        for check in self.checks:
            refusal = check()
            if refusal is not None:
                return refusal
        return None
