"""Changes other gateways on the same store must apply: announced, listened for, read back.

Gateways sharing one PostgreSQL store each hold their grants (and their
connections) in memory, and cache upstream targets and the audit's password
masks. A change made through one gateway's API reaches the others two ways:

* **Announced**: the transaction that makes the change also runs
  ``pg_notify('pam_changes', '{"kind": ..., "id": ...}')`` (:func:`announce`),
  so PostgreSQL delivers it to every listener when, and only if, it commits.
  :class:`ChangeFeed` is one dedicated psycopg connection per gateway that
  ``LISTEN``\\ s on that channel and hands each :class:`Change` to the gateway,
  reconnecting with backoff when the connection drops.
* **Reconciled**: the gateway periodically reads back what it holds
  (:meth:`ChangeStore.grant_states`, :meth:`ChangeStore.credentials_fingerprint`)
  and applies any difference. That is the safety net for a notification lost
  (the listener down, a pooler that does not pass ``LISTEN``), and the only path
  on SQLite, where :func:`announce` does nothing.

Invariants:

* A notification names what changed (a session, a principal, the credentials),
  never the change itself: a gateway reads the store, which stays the truth, so
  a forged or stale notification can at most cause a read.
* Nothing here returns or announces a password: the fingerprint is a digest of
  sealed ciphertexts and resource fields.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

import psycopg
import structlog
from sqlalchemy import Connection, func, select
from sqlalchemy.engine import make_url

from gateway.store.engine import StoreBase
from gateway.store.schema import accounts, principals, resources, sessions

__all__ = [
    "CHANNEL",
    "Change",
    "ChangeFeed",
    "ChangeStore",
    "ChangeTopic",
    "StoredGrant",
    "announce",
    "parse_change",
]

log = structlog.get_logger(__name__)

#: The PostgreSQL notification channel every gateway on a store listens on.
CHANNEL: Final = "pam_changes"
#: PostgreSQL's limit on a notification payload is 8000 bytes; ours are tiny.
_MAX_PAYLOAD: Final = 1000


class ChangeTopic(StrEnum):
    #: a session ended, its expiry moved or another gateway took it over; id: the session's
    SESSION = "session"
    #: a principal was disabled; id: the principal's
    PRINCIPAL = "principal"
    #: an account's password, a resource or an account changed; id: the announcing gateway's
    CREDENTIALS = "credentials"
    #: a stopping gateway handed a tunnel grant to another (its heir builds it);
    #: id: the session's
    HANDED = "handed"


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeTopic
    id: str


@dataclass(frozen=True, slots=True)
class StoredGrant:
    """What the store says of a session a gateway holds live."""

    expires_at: datetime
    ended_at: datetime | None
    #: the name of its principal when that principal is disabled, else None
    disabled_principal: str | None
    #: the gateway holding it (another took it over when the CLI failed over)
    holder_id: str | None = None


def payload_of(kind: ChangeTopic, id_: str) -> str:
    return json.dumps({"kind": kind.value, "id": id_}, separators=(",", ":"))


def parse_change(payload: str) -> Change | None:
    """The change a notification names, or None for a payload we do not know
    (a newer gateway's kind, or garbage): ignored, the reconcile covers it."""
    if len(payload) > _MAX_PAYLOAD:
        return None
    try:
        data = json.loads(payload)
        return Change(ChangeTopic(data["kind"]), str(data["id"]))
    except (ValueError, KeyError, TypeError):
        return None


def announce(conn: Connection, kind: ChangeTopic, id_: str) -> None:
    """Tell every gateway listening that *kind* *id_* changed, when (and if)
    *conn*'s transaction commits. Nothing on SQLite (one host: the reconcile)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(CHANNEL, payload_of(kind, id_))))


class ChangeStore(StoreBase):
    """Announcing changes made outside a store transaction, and reading back
    what a gateway holds in memory."""

    def announce_change(self, kind: ChangeTopic, id_: str) -> None:
        """Announce a change already committed (one whose store writes are
        spread over several calls, such as a credential's)."""
        with self._transaction(write=False) as conn:
            announce(conn, kind, id_)

    def grant_states(self, session_ids: Sequence[str]) -> dict[str, StoredGrant]:
        """The stored state of each of *session_ids* (full ids) that exists."""
        if not session_ids:
            return {}
        query = (
            select(
                sessions.c.id,
                sessions.c.expires_at,
                sessions.c.ended_at,
                sessions.c.holder_id,
                principals.c.name,
                principals.c.disabled_at,
            )
            .select_from(sessions.outerjoin(principals, principals.c.id == sessions.c.principal_id))
            .where(sessions.c.id.in_(list(session_ids)))
        )
        with self._transaction(write=False) as conn:
            return {
                row.id: StoredGrant(
                    expires_at=row.expires_at,
                    ended_at=row.ended_at,
                    disabled_principal=row.name if row.disabled_at is not None else None,
                    holder_id=row.holder_id,
                )
                for row in conn.execute(query)
            }

    def credentials_fingerprint(self) -> str:
        """A digest that moves whenever a resource, an account or a stored (or
        pending) password does: sealed ciphertexts get a fresh nonce each time."""
        digest = hashlib.sha256()
        with self._transaction(write=False) as conn:
            for row in conn.execute(select(resources).order_by(resources.c.id)):
                digest.update(repr(tuple(row)).encode())
            account_fields = select(
                accounts.c.id,
                accounts.c.resource_id,
                accounts.c.name,
                accounts.c.username,
                accounts.c.password_ciphertext,
                accounts.c.pending_ciphertext,
            ).order_by(accounts.c.id)
            for row in conn.execute(account_fields):
                digest.update(repr(tuple(row)).encode())
        return digest.hexdigest()

    def listen_conninfo(self) -> str | None:
        """The libpq URI a :class:`ChangeFeed` connects with; None on SQLite."""
        url = self._engine.url
        if url.get_backend_name() != "postgresql":
            return None
        return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


#: Reconnect delays of the feed: doubling from the first, capped.
FEED_FIRST_DELAY_SECONDS: Final = 0.5
FEED_MAX_DELAY_SECONDS: Final = 10.0
#: How long a connection attempt may take.
FEED_CONNECT_TIMEOUT_SECONDS: Final = 5


@dataclass(eq=False)
class ChangeFeed:
    """``LISTEN pam_changes`` on a connection of its own, for as long as it runs.

    Each notification is handed to ``on_change`` in order (awaited, so a slow
    apply holds the next, never drops it). ``on_connected`` is awaited each
    time ``LISTEN`` is in place, first time included: whatever changed while
    nobody listened is read back then (the caller reconciles). A lost
    connection is logged and retried, never fatal.
    """

    #: a libpq URI with the store's password in it: never in a repr or a log line
    conninfo: str = field(repr=False)
    on_change: Callable[[Change], Awaitable[None]]
    on_connected: Callable[[], Awaitable[None]]
    #: shown in pg_stat_activity, so an operator (or a test) can find it
    application_name: str = "pam-changes"

    _listening: bool = False

    async def run(self) -> None:
        delay = FEED_FIRST_DELAY_SECONDS
        while True:
            self._listening = False
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store unreachable, the backend killed
                if self._listening:  # it had worked: start the backoff over
                    delay = FEED_FIRST_DELAY_SECONDS
                log.warning("change_feed_lost", error=type(exc).__name__, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, FEED_MAX_DELAY_SECONDS)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.conninfo,
            autocommit=True,
            application_name=self.application_name,
            connect_timeout=FEED_CONNECT_TIMEOUT_SECONDS,
        ) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._listening = True
            log.info("change_feed_listening", channel=CHANNEL)
            await self.on_connected()
            async for notify in conn.notifies():
                change = parse_change(notify.payload)
                if change is None:
                    log.warning("change_feed_unknown_payload", length=len(notify.payload))
                    continue
                await self.on_change(change)
