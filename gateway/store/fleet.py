"""The fleet: where each gateway sharing the store can be reached, and grants
moving between gateways when a CLI fails over.

Implements the store side of failover (``docs/operations.md``, "Failover"):

* Each gateway writes its advertised control API URL at its
  start (:meth:`FleetStore.register_gateway`); :meth:`FleetStore.fleet_urls`
  lists those of the gateways present now (presence lease held), which
  ``/v1/gateways`` hands to ``pam login``, so the CLI knows where else to go.
* :meth:`FleetStore.take_over_session` moves a live grant's holder to the
  calling gateway, in one statement conditional on the session still being
  open, and announces the move in the same transaction: the previous holder,
  if it is alive, lets go of it (``gateway.access.changes``).
* :meth:`FleetStore.hand_over_session` is a stopping gateway giving a tunnel
  grant to another one present (announced too): the heir builds it at once
  (:meth:`FleetStore.tunnel_grants_held_by` on its reconcile covers a lost
  notification), so the grant outlives a rolling restart.

Invariants:

* A take-over never touches the sealed columns (``gateway_id``, the opener,
  stays): only ``holder_id`` moves, and crash recovery goes by it.
* An ended or expired session is never taken over; the caller gets it back
  unchanged and says why.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Select, select

from gateway.credentials.schedule import PRESENCE_LEASE_PREFIX
from gateway.store.changes import ChangeTopic, announce
from gateway.store.engine import StoreBase
from gateway.store.models import AccessSession
from gateway.store.rows import session_row
from gateway.store.schema import gateways, leases, sessions
from gateway.store.sessions import session_of
from gateway.store.validation import check_text, required_text

__all__ = ["FleetStore"]


def _present(now: datetime) -> Select[tuple[str]]:
    """The ids of the gateways present at *now* (each holding its presence
    lease), the longest-running first."""
    return (
        select(gateways.c.id)
        .select_from(gateways.join(leases, leases.c.name == PRESENCE_LEASE_PREFIX + gateways.c.id))
        .where(leases.c.expires_at > now)
        .order_by(gateways.c.started_at, gateways.c.id)
    )


class FleetStore(StoreBase):
    def register_gateway(self, gateway_id: str, api_url: str) -> None:
        """Record (or update) where gateway *gateway_id* can be reached."""
        required_text("gateway_id", gateway_id)
        required_text("api_url", api_url)
        now = self._now()
        with self._transaction(write=True) as conn:
            updated = conn.execute(
                gateways.update()
                .where(gateways.c.id == gateway_id)
                .values(api_url=api_url, started_at=now)
            )
            if updated.rowcount == 0:
                conn.execute(
                    gateways.insert().values(id=gateway_id, api_url=api_url, started_at=now)
                )

    def fleet_urls(self) -> list[str]:
        """The control API URLs of the gateways present now (each holding its
        presence lease), the longest-running first, without repeats."""
        query = _present(self._now()).with_only_columns(gateways.c.api_url)
        with self._transaction(write=False) as conn:
            urls = list(conn.execute(query).scalars())
        return list(dict.fromkeys(urls))

    def take_over_session(
        self, session_id: str, gateway_id: str
    ) -> tuple[AccessSession, str | None]:
        """Make *gateway_id* the holder of live session *session_id*; returns the
        session as it stands and its previous holder. An ended or expired
        session is returned unchanged (its holder stays)."""
        check_text("gateway_id", gateway_id, required=True)
        now = self._now()
        with self._transaction(write=True) as conn:
            current = session_row(conn, session_id, lock="update")
            previous = current.holder_id
            if current.ended_at is None and current.expires_at > now and previous != gateway_id:
                conn.execute(
                    sessions.update()
                    .where(sessions.c.id == session_id, sessions.c.ended_at.is_(None))
                    .values(holder_id=gateway_id)
                )
                announce(conn, ChangeTopic.SESSION, session_id)
            row = session_row(conn, session_id)
        return session_of(row), previous

    def hand_over_session(self, session_id: str, gateway_id: str) -> str | None:
        """Hand live tunnel grant *session_id*, held by *gateway_id* (stopping),
        to the longest-running other gateway present; returns that gateway's id,
        or None when there is none (or the grant is not *gateway_id*'s to give:
        ended, expired, not a tunnel grant, or held elsewhere)."""
        now = self._now()
        with self._transaction(write=True) as conn:
            current = session_row(conn, session_id, lock="update")
            if (
                current.ended_at is not None
                or current.expires_at <= now
                or current.holder_id != gateway_id
                or current.client_public_key is None
            ):
                return None
            heir = conn.execute(
                _present(now).where(gateways.c.id != gateway_id).limit(1)
            ).scalar_one_or_none()
            if heir is None:
                return None
            conn.execute(
                sessions.update().where(sessions.c.id == session_id).values(holder_id=heir)
            )
            announce(conn, ChangeTopic.HANDED, session_id)
            return str(heir)

    def tunnel_grants_held_by(self, gateway_id: str) -> list[str]:
        """The ids of the open tunnel grants the store says *gateway_id* holds
        (one handed to it appears here before its CLI calls in)."""
        now = self._now()
        with self._transaction(write=False) as conn:
            return list(
                conn.execute(
                    select(sessions.c.id).where(
                        sessions.c.holder_id == gateway_id,
                        sessions.c.ended_at.is_(None),
                        sessions.c.expires_at > now,
                        sessions.c.client_public_key.is_not(None),
                    )
                ).scalars()
            )
