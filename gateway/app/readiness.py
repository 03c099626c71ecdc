"""Whether this gateway is ready to serve: the checks behind ``/readyz``.

Three checks, each cheap and each naming itself when it fails:

* ``store``: a ``SELECT 1`` on the store thread answers within
  ``store_timeout`` seconds. At most one such query is in flight: while one is
  stuck (a black-holed store), later checks wait on it rather than queue more
  work on the store thread.
* ``lease``: this gateway's presence lease was renewed within its lease time,
  so no other gateway takes this one for gone.
* ``audit``: the audit trail is writable: the journal's reader reports no
  failure, the audit writer process is running, and the backlog is under the
  bound at which relays start pausing. With the audit off: passes, as ``off``.
* any check of :attr:`Readiness.more` (``workers`` with ``--workers N``: every
  relay worker is running, and how many connections they relay).

Invariant: a check's detail is the gateway's own words (a bound, a class name),
never a store URL, an address or a database's error text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from gateway.access.presence import Presence
from gateway.audit.runtime import AuditRuntime
from gateway.audit.writer import MAX_LAG_BYTES

__all__ = ["Check", "Readiness", "report"]

STORE_TIMEOUT_SECONDS: Final = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


class Readiness:
    def __init__(
        self,
        ping: Callable[[], Awaitable[None]],
        presence: Presence,
        audit: AuditRuntime,
        *,
        store_timeout: float = STORE_TIMEOUT_SECONDS,
        backlog_limit: int = MAX_LAG_BYTES,
    ) -> None:
        self._ping_store = ping
        self._presence = presence
        self._audit = audit
        self._store_timeout = store_timeout
        self._backlog_limit = backlog_limit
        self._ping: asyncio.Future[None] | None = None
        #: more checks, each cheap and synchronous (the relay workers')
        self.more: list[Callable[[], Check]] = []

    async def checks(self) -> list[Check]:
        found = [await self._store(), self._lease(), self._audit_check()]
        return found + [check() for check in self.more]

    async def _store(self) -> Check:
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._ping_store())
            # Retrieved here even when no check waits for it any more.
            self._ping.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(self._store_timeout):
                await asyncio.shield(self._ping)
        except TimeoutError:
            return Check("store", False, f"no answer within {self._store_timeout:g} s")
        except Exception as exc:
            return Check("store", False, f"unreachable ({type(exc).__name__})")
        return Check("store", True, "reachable")

    def _lease(self) -> Check:
        presence = self._presence
        age = presence.lease_age()
        if age is None:
            return Check("lease", False, "not taken yet")
        if not presence.is_lease_fresh():
            return Check(
                "lease",
                False,
                f"last renewed {age:.1f} s ago (the lease lasts {presence.lease_seconds:g} s)",
            )
        return Check("lease", True, f"renewed {age:.1f} s ago")

    def _audit_check(self) -> Check:
        audit = self._audit
        if not audit.settings.audit_enabled:
            return Check("audit", True, "off")
        writer = audit.writer
        if writer is None:
            return Check("audit", False, "not started")
        if writer.failed is not None:
            return Check("audit", False, "the trail cannot be written to the store")
        if audit.sink is not None and not audit.sink.is_running():
            return Check("audit", False, "the audit writer process is not running")
        if writer.backlog > self._backlog_limit:
            return Check(
                "audit", False, f"backlog {writer.backlog} bytes over {self._backlog_limit}"
            )
        return Check("audit", True, f"backlog {writer.backlog} bytes")


def report(checks: list[Check]) -> dict[str, Any]:
    """The JSON body of ``/readyz``."""
    failed = [check.name for check in checks if not check.ok]
    return {
        "status": "not_ready" if failed else "ready",
        "failed": failed,
        "checks": {check.name: {"ok": check.ok, "detail": check.detail} for check in checks},
    }


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
