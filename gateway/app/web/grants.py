"""The browser's grants: access grants opened from the console, and the
PostgreSQL connections the console holds through them (SQL terminal, data
explorer).

The browser never talks PostgreSQL. A grant is opened exactly as ``POST
/v1/access`` opens one (:meth:`~gateway.app.gateway.Gateway.open_access`: policy,
approval, second factor, expiry, idle timeout, audit), with its door a Unix
socket in a private 0700 directory of the daemon's OS user; the console
connects to that door with asyncpg as any client of a grant would, so every
statement it runs is relayed, recorded and cut like theirs.

Invariants:

* A browser grant belongs to the user who opened it: to anyone else it does
  not exist (:class:`~gateway.errors.NotFound`, as an unknown id).
* Work on a grant's connection runs one at a time, each in a task this
  registry knows (:attr:`BrowserGrant.running`), so that another HTTP request
  can cancel it: cancelling the task makes asyncpg send a CancelRequest to the
  door, which the gateway forwards upstream.
* A grant is kept alive (heartbeat) only while its user was active in the last
  :data:`ACTIVE_SECONDS`; after that the console ends it. A grant that ended
  (expiry, revocation) stays known, so that its next statement meets the door's
  FATAL, until its user closes it or goes idle.
* :meth:`BrowserGrants.shutdown` (the daemon stopping) cancels what runs,
  closes every connection and ends every grant, within bounds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, TypeVar

import asyncpg
import structlog
from fastapi import Depends, Request

from gateway.access.ports import SessionRecord
from gateway.access.requests import AccessRequest
from gateway.app.gateway import Gateway
from gateway.errors import InvalidRequest, NotFound
from gateway.identity.principals import Principal
from gateway.net.listener import DEFAULT_SOCKET_PORT

__all__ = [
    "ACTIVE_SECONDS",
    "BrowserGrant",
    "BrowserGrants",
    "Grants",
    "Problem",
    "WorkFailed",
    "as_text",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: What a browser grant's session records as the client's host.
REPORTED_HOST: Final = "web console"
#: A grant is heartbeated while its user did something this recently.
ACTIVE_SECONDS: Final = 15 * 60
#: How often a held grant calls in (the CLI's rate; the daemon's timeout is 6 s).
HEARTBEAT_SECONDS: Final = 2.0
#: The statement timeout every console connection starts with.
DEFAULT_STATEMENT_TIMEOUT_SECONDS: Final = 30
#: Deadlines of the console's own waits on its connections.
CONNECT_TIMEOUT_SECONDS: Final = 15.0
CLOSE_TIMEOUT_SECONDS: Final = 3.0


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a statement (or a connection) failed, as PostgreSQL (or the gateway's
    door, which speaks PostgreSQL) said it."""

    message: str
    sqlstate: str | None = None
    detail: str | None = None
    hint: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> Problem:
        if isinstance(exc, asyncpg.PostgresError):
            return cls(
                message=str(getattr(exc, "message", None) or exc),
                sqlstate=getattr(exc, "sqlstate", None),
                detail=getattr(exc, "detail", None),
                hint=getattr(exc, "hint", None),
            )
        if isinstance(exc, asyncpg.InterfaceError | OSError | asyncio.TimeoutError):
            return cls(message=f"the connection through the grant failed: {exc}")
        return cls(message=str(exc) or type(exc).__name__)


#: What a run cancelled from the Cancel button reports: the server's own answer
#: to the CancelRequest (asyncpg consumes the ErrorResponse itself).
CANCELLED: Final = Problem(
    message="canceling statement due to user request",
    sqlstate="57014",
    hint="the console sent PostgreSQL a cancel request through the grant",
)


class WorkFailed(Exception):
    """A piece of work on a grant's connection failed; :attr:`problem` says why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclass(eq=False)
class BrowserGrant:
    """One grant opened from the console and what the console holds through it."""

    session: SessionRecord
    owner_id: str
    owner_name: str
    socket_dir: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connection: asyncpg.Connection | None = None
    #: the work on the connection now, for Cancel
    running: asyncio.Task[Any] | None = None
    cancel_asked: bool = False
    last_active: float = field(default_factory=time.monotonic)
    #: why the grant ended, once the gateway says so
    ended: str | None = None
    keeper: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def application_name(self) -> str:
        return f"pam web console ({self.owner_name})"

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def is_idle(self, now: float) -> bool:
        return now - self.last_active > ACTIVE_SECONDS


class BrowserGrants:
    """The registry of browser grants, by session id."""

    def __init__(self, service: Gateway) -> None:
        self.service = service
        self._grants: dict[str, BrowserGrant] = {}
        self._closing = False

    async def open(
        self,
        caller: Principal,
        *,
        client_addr: str | None,
        resource: str | None = None,
        account: str | None = None,
        duration_seconds: int | None = None,
        reason: str | None = None,
        otp: str | None = None,
        request_id: str | None = None,
    ) -> BrowserGrant | AccessRequest:
        """A grant for *caller* (or the request to wait on, when its policy asks
        for approval), opened as the API opens one, its door a Unix socket of
        this daemon's OS user."""
        if self._closing:
            raise InvalidRequest("the gateway is shutting down")
        socket_dir = tempfile.mkdtemp(prefix="pam-web-")
        try:
            opened = await self.service.open_access(
                caller,
                resource=resource,
                account=account,
                duration_seconds=duration_seconds,
                reason=reason,
                api_client_addr=client_addr,
                reported_host=REPORTED_HOST,
                owner_uid=os.getuid(),
                socket_dir=socket_dir,
                request_id=request_id,
                otp=otp,
            )
        except BaseException:
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        if isinstance(opened, AccessRequest):
            shutil.rmtree(socket_dir, ignore_errors=True)
            return opened
        grant = BrowserGrant(opened, caller.id, caller.name, socket_dir)
        grant.keeper = asyncio.create_task(self._keep(grant), name=f"web-grant-{grant.id[:8]}")
        self._grants[grant.id] = grant
        log.info("web_grant_opened", session_id=grant.id, user=caller.name)
        return grant

    def get(self, caller: Principal, session_id: str) -> BrowserGrant:
        """*caller*'s browser grant *session_id*; anyone else's is not found."""
        grant = self._grants.get(session_id)
        if grant is None or grant.owner_id != caller.id:
            raise NotFound(f"no grant '{session_id}' of yours is open in the console")
        return grant

    def of(self, caller: Principal) -> list[BrowserGrant]:
        """*caller*'s browser grants, newest first."""
        mine = [g for g in self._grants.values() if g.owner_id == caller.id]
        return sorted(mine, key=lambda g: g.session.started_at, reverse=True)

    async def run(
        self, grant: BrowserGrant, work: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T:
        """*work*'s result on the grant's connection (made when missing), in a task
        :meth:`cancel` can reach; a failure is :class:`WorkFailed`."""
        grant.touch()
        task = asyncio.create_task(self._work(grant, work), name=f"web-run-{grant.id[:8]}")
        return await task

    async def _work(
        self, grant: BrowserGrant, work: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T:
        async with grant.lock:
            grant.running = asyncio.current_task()
            grant.cancel_asked = False
            try:
                connection = await self._connection(grant)
                return await work(connection)
            except asyncio.CancelledError:
                if not grant.cancel_asked:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                raise WorkFailed(CANCELLED) from None
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                raise WorkFailed(Problem.of(exc)) from None
            finally:
                grant.running = None
                _drop_if_unusable(grant)

    def cancel(self, grant: BrowserGrant) -> bool:
        """Cancel what runs on the grant's connection now; whether anything ran."""
        grant.touch()
        task = grant.running
        if task is None or task.done() or grant.cancel_asked:
            return False
        grant.cancel_asked = True
        task.cancel()
        return True

    async def _connection(self, grant: BrowserGrant) -> asyncpg.Connection:
        if grant.connection is not None and not grant.connection.is_closed():
            return grant.connection
        grant.connection = None
        session = grant.session
        connection = await asyncpg.connect(
            host=grant.socket_dir,
            port=DEFAULT_SOCKET_PORT,
            user=session.username,
            database=session.database,
            ssl=False,
            timeout=CONNECT_TIMEOUT_SECONDS,
            statement_cache_size=0,
            server_settings={"application_name": grant.application_name},
        )
        try:
            await connection.execute(
                f"SET statement_timeout = '{DEFAULT_STATEMENT_TIMEOUT_SECONDS}s'"
            )
        except BaseException:
            connection.terminate()
            raise
        grant.connection = connection
        return connection

    async def close(self, grant: BrowserGrant, *, detail: str | None = None) -> None:
        """End the grant (its user's Close button, idleness, shutdown)."""
        self._grants.pop(grant.id, None)
        if grant.keeper is not None and grant.keeper is not asyncio.current_task():
            grant.keeper.cancel()
        running = grant.running
        if running is not None and not running.done():
            grant.cancel_asked = True
            running.cancel()
            # Let the cancel and the rollback finish on a live connection: asyncpg
            # waits for the cancelled query's end, which a closed one never sends.
            await asyncio.wait({running}, timeout=CLOSE_TIMEOUT_SECONDS)
        await _close_connection(grant)
        try:
            await self.service.close_access(grant.id, detail=detail)
        finally:
            shutil.rmtree(grant.socket_dir, ignore_errors=True)
            log.info("web_grant_closed", session_id=grant.id, detail=detail)

    async def _keep(self, grant: BrowserGrant) -> None:
        """Heartbeat the grant while its user is active; end it once they are not."""
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if grant.is_idle(time.monotonic()):
                minutes = ACTIVE_SECONDS // 60
                await self.close(
                    grant, detail=f"its web console user was inactive for {minutes} minutes"
                )
                return
            try:
                session = await self.service.heartbeat(grant.id)
            except Exception as exc:  # keep trying: the next beat may get through
                log.warning("web_grant_heartbeat_failed", session_id=grant.id, error=repr(exc))
                continue
            grant.session = session
            if session.ended_at is not None and grant.ended is None:
                grant.ended = session.end_reason or "ended"
                if session.end_detail:
                    grant.ended += f": {session.end_detail}"

    async def shutdown(self) -> None:
        """End every browser grant (the daemon is stopping)."""
        self._closing = True
        grants = list(self._grants.values())
        await asyncio.gather(
            *(self.close(g, detail="the gateway is shutting down") for g in grants),
            return_exceptions=True,
        )


def _drop_if_unusable(grant: BrowserGrant) -> None:
    """Forget a connection that is closed, or was left inside a transaction (a
    rollback that did not finish): the next run makes a new one."""
    connection = grant.connection
    if connection is None:
        return
    if connection.is_closed():
        grant.connection = None
    elif connection.is_in_transaction():
        grant.connection = None
        connection.terminate()


async def _close_connection(grant: BrowserGrant) -> None:
    connection, grant.connection = grant.connection, None
    if connection is None or connection.is_closed():
        return
    try:
        await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_SECONDS)
    except (Exception, asyncio.CancelledError):
        connection.terminate()


def as_text(value: object) -> str | None:
    """A result value as the page shows it (None stays None: NULL is shown apart)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return str(value)


def registry(request: Request) -> BrowserGrants:
    """The console's registry of browser grants (made with the console's app)."""
    found: BrowserGrants = request.app.state.grants
    return found


#: The browser grants, for a route.
Grants = Annotated[BrowserGrants, Depends(registry)]
