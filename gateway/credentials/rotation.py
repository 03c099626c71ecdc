"""Credential rotation: pam sets a password upstream that no person ever sees.

:meth:`Rotations.rotate` is the one entry point (``pam account rotate --now``,
``pam account add --managed``, and a scheduler later). In order:

1. **sign in** for the change: as the resource's rotation role when it has one
   (``pam resource set-rotation``), else as the account itself; a failure here
   changes nothing and is recorded as ``failed``;
2. **generate** a password (:func:`generate_password`: the configured length
   and alphabet, each character drawn uniformly by :mod:`secrets`);
3. **store it pending** (sealed) before anything changes upstream, and add it
   to the audit's masks (step ``pending_stored``);
4. **ALTER ROLE** with the SCRAM-SHA-256 *secret* of the password, computed here
   (fresh salt, the server's iteration count), never the password: the server,
   its statement log and its error log only ever see the secret (``altered``);
5. **verify**: a fresh sign-in with the new password (``verified``);
6. **promote** the pending password to the stored one and append the record,
   in one transaction. If step 5 failed, the previous password's secret is set
   again (``restored``), the pending one dropped and the record says
   ``rolled_back``.

Invariants:

* The stored credential always works, whenever the daemon dies: a rotation in
  flight is the account's ``pending_*`` columns, and at start
  :meth:`Rotations.recover` signs in with the pending password (it was set:
  promote) or the stored one (it was not, or was set back: drop the pending).
  Until that is settled, a connection refused with 28P01 tries the other one
  (:meth:`gateway.credentials.targets.Credentials.retry_target`).
* One rotation (or stored password, or recovery) per account at a time: a lock
  per account in this process, and the store refuses a second rotation in flight.
  A rotation once started runs to its end even if its caller goes away.
* With gateways sharing a store, a rotation in flight is settled only by the
  gateway that started it (its ``gateway_id``: at its next start) or, once that
  gateway's presence lease has expired, by the scheduler's lease holder
  (:meth:`Rotations.recover` with ``gone``); never while its gateway runs it.
* ``on_result`` hears every generated rotation's end (and every settlement),
  after it is recorded: the webhooks.
* Live sessions are never cut: PostgreSQL keeps a signed-in session whatever
  happens to the role's password later, and nothing here ends one.
* The password appears in no statement, log line, error, record or result. A
  :class:`RotationResult` and the record carry who started it, when, how it
  ended and the upstream's error text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, get_args

import structlog

from gateway.credentials.ports import AccountRecord, RotationStore, StoreThread
from gateway.credentials.records import PendingRotation, RotationEntry, RotationVia
from gateway.credentials.statements import quote_identifier, quote_literal, run_statement
from gateway.credentials.targets import target_of
from gateway.errors import GatewayError, InvalidRequest, UpstreamError
from gateway.net.relay import close_writer
from gateway.net.upstream import UpstreamConnection, UpstreamTarget, connect_upstream
from gateway.protocol import messages
from gateway.protocol.scram import SCRAM_DEFAULT_ITERATIONS, scram_secret

__all__ = [
    "ROTATION_STEPS",
    "RotationResult",
    "RotationStep",
    "Rotations",
    "generate_password",
]

log = structlog.get_logger(__name__)

#: The points between a rotation's steps where a test may stop or pause the
#: daemon (``PAM_TEST_ROTATION_EXIT_AT``, ``..._PAUSE_AT``): after the pending
#: password is stored, after the ALTER ROLE, after the verifying sign-in, after
#: a rollback's ALTER ROLE.
RotationStep = Literal["pending_stored", "altered", "verified", "restored"]
ROTATION_STEPS: Final = frozenset(get_args(RotationStep))

_APPLICATION_NAME: Final = "pam rotation"
#: PostgreSQL 16 made the iteration count a setting (``scram_iterations``).
_SCRAM_ITERATIONS_SETTING_SINCE: Final = 16


def generate_password(length: int, alphabet: str) -> str:
    """*length* characters, each drawn uniformly from *alphabet* (the settings
    check that it needs no quoting and gives at least 128 bits)."""
    if length < 1 or len(set(alphabet)) < 2:
        raise InvalidRequest("a generated password needs a length and two characters or more")
    return "".join(secrets.choice(alphabet) for _ in range(length))


@dataclass(frozen=True)
class RotationResult:
    """How one rotation (or stored password) ended; the API answers with it.
    Never the password."""

    ok: bool
    resource: str
    account: str
    rotation_id: str
    #: a :data:`~gateway.credentials.records.RotationOutcome`, or ``unsettled``:
    #: neither password signs in yet and recovery keeps trying (not recorded yet)
    outcome: str
    via: str | None
    method: str
    started_by: str
    started_at: datetime
    ended_at: datetime
    #: why it failed or was rolled back, or how it was completed (the upstream's
    #: words, or ours)
    detail: str | None = None
    #: what to do about a failure
    hint: str | None = None
    #: the gateway that ran it, and its place in the rotation record's chain
    gateway_id: str | None = None
    record: int | None = None

    @classmethod
    def of(cls, entry: RotationEntry, hint: str | None = None) -> RotationResult:
        return cls(
            ok=entry.ok,
            resource=entry.resource,
            account=entry.account,
            rotation_id=entry.rotation_id,
            outcome=entry.outcome,
            via=entry.via,
            method=entry.method,
            started_by=entry.started_by,
            started_at=entry.started_at,
            ended_at=entry.ended_at,
            detail=entry.detail,
            hint=None if entry.ok else hint,
            gateway_id=entry.gateway_id,
            record=entry.seq,
        )


class _Failed(Exception):
    """A rotation step failed before anything changed upstream."""

    def __init__(self, detail: str, hint: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.hint = hint


@dataclass(eq=False)
class Rotations:
    """Rotation, recovery and storing checked passwords for the accounts of a store."""

    store: RotationStore
    db: StoreThread
    connect_timeout: float
    password_length: int
    password_alphabet: str
    #: after a stored or pending password changed: refresh the credentials in use
    on_change: Callable[[], Awaitable[None]]
    recovery_retry_seconds: float = 30.0
    #: awaited at each :data:`RotationStep` (tests stop or pause the daemon there)
    step_hook: Callable[[str], Awaitable[None]] | None = None
    #: this gateway's id, recorded with each rotation it starts
    gateway_id: str | None = None
    #: told of each generated rotation's result once recorded (never raises here)
    on_result: Callable[[RotationResult], Awaitable[None]] | None = None
    _locks: dict[tuple[str, str], asyncio.Lock] = dataclasses.field(default_factory=dict)
    _running: set[asyncio.Task[RotationResult]] = dataclasses.field(default_factory=set)
    _recovery: asyncio.Task[None] | None = None

    # --- life --------------------------------------------------------------------------

    def start(self) -> None:
        """Settle the rotations a previous run left in flight, in the background,
        trying again every ``recovery_retry_seconds`` while the upstream cannot say."""
        self._recovery = asyncio.create_task(
            self._recover_until_settled(), name="rotation-recovery"
        )

    async def close(self) -> None:
        """Stop recovering; let rotations in flight finish (each wait is bounded)."""
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    # --- entry points ------------------------------------------------------------------

    async def rotate(self, resource: str, account: str, *, started_by: str) -> RotationResult:
        """Rotate *account*'s password to a generated one; see the module docstring.

        The scheduler's call. Raises only for what the caller got wrong (an
        unknown resource or account, a rotation already in flight); every
        upstream failure is a result (``ok=False``) and a record.
        """
        task = asyncio.create_task(
            self._locked_rotate(resource, account, started_by),
            name=f"rotation-{resource}-{account}",
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        # Shielded: a caller that goes away does not stop a rotation midway.
        return await asyncio.shield(task)

    async def add_account(
        self,
        resource: str,
        name: str,
        username: str,
        password: str,
        *,
        verify: bool,
        managed: bool,
        started_by: str,
    ) -> tuple[AccountRecord, RotationResult | None]:
        """Add an account once its password signs in (unless not *verify*); a
        *managed* one is rotated right away, so the typed password stops working."""
        if verify:
            await self.check_sign_in(resource, username, password, account=name)
        added = await self.db(
            self.store.add_account, resource, name, username, password, managed=managed
        )
        await self.on_change()
        if not managed:
            return added, None
        result = await self.rotate(resource, name, started_by=started_by)
        return await self.db(self.store.get_account, resource, name), result

    async def store_password(
        self, resource: str, account: str, password: str, *, verify: bool, started_by: str
    ) -> AccountRecord:
        """Store a typed password (already the upstream's) once it signs in
        (unless not *verify*); refused for a managed account. It replaces a
        rotation left in flight (recovery takes turns with it)."""
        async with self._lock(resource, account):
            record = await self.db(self.store.get_account, resource, account)
            if record.managed:
                raise _managed(resource, account)
            if verify:
                await self.check_sign_in(resource, record.username, password, account=account)
            stored = await self.db(
                self.store.store_typed_password,
                resource,
                account,
                password,
                rotation_id=uuid.uuid4().hex,
                started_by=started_by,
                gateway_id=self.gateway_id,
            )
        await self.on_change()
        return stored

    async def set_rotation_role(
        self, resource: str, username: str, password: str, *, verify: bool
    ) -> object:
        """Store *resource*'s rotation role once it signs in (unless not *verify*)."""
        if verify:
            await self.check_sign_in(resource, username, password, account="(rotation role)")
        return await self.db(self.store.set_rotation_credential, resource, username, password)

    async def check_sign_in(
        self, resource: str, username: str, password: str, *, account: str
    ) -> None:
        """Raise :class:`InvalidRequest` saying why, unless *username* signs in to
        *resource* with *password*."""
        target = await self._target(resource, account, username, password)
        failure = await self._sign_in_failure(target)
        if failure is None:
            return
        if failure.kind == "auth":
            message = (
                f"{resource} refused the password of user {username!r} ({failure.sqlstate});"
                " nothing was stored"
            )
        else:
            message = (
                f"could not sign in to {resource} as {username!r} to check the password,"
                f" so nothing was stored: {failure.message}"
            )
        raise InvalidRequest(message, hint="check it, or store it unchecked with --no-verify")

    async def recover(self, *, gone: Callable[[str], bool] | None = None) -> bool:
        """Settle the rotations in flight that are this gateway's to settle: its
        own (a run of it that died left them; its live ones wait for the lock and
        are gone by then), those that name no gateway (from before revision 0015),
        and those of the gateways *gone* says are gone. True when none is left."""
        left = False
        for pending in await self.db(self.store.pending_rotations):
            starter = pending.gateway_id
            if starter not in (None, self.gateway_id) and not (gone and gone(starter)):
                # A present gateway's: it finishes it.
                log.info("rotation_left_to_its_gateway", gateway_id=starter, **_fields_of(pending))
                continue
            async with self._lock(pending.resource, pending.account):
                try:
                    new = await self.db(
                        self.store.reveal_pending_password,
                        pending.resource,
                        pending.account,
                        pending.rotation_id,
                    )
                    if new is None:
                        continue  # settled meanwhile (a typed password, another gateway)
                    result = await self._settle(pending, new)
                    settled = result is not None
                    if result is not None:
                        await self._tell(result)
                except GatewayError as exc:
                    log.error(
                        "rotation_recovery_failed",
                        resource=pending.resource,
                        account=pending.account,
                        rotation_id=pending.rotation_id,
                        error=exc.message,
                    )
                    settled = False
            left = left or not settled
        return not left

    # --- rotation ----------------------------------------------------------------------

    def _lock(self, resource: str, account: str) -> asyncio.Lock:
        return self._locks.setdefault((resource, account), asyncio.Lock())

    async def _locked_rotate(self, resource: str, account: str, started_by: str) -> RotationResult:
        async with self._lock(resource, account):
            result = await self._rotate(resource, account, started_by)
        await self._tell(result)
        return result

    async def _tell(self, result: RotationResult) -> None:
        if self.on_result is None:
            return
        try:
            await self.on_result(result)
        except Exception as exc:  # telling never fails a rotation
            log.error("rotation_result_not_told", rotation_id=result.rotation_id, error=repr(exc))

    async def _rotate(self, resource: str, account: str, started_by: str) -> RotationResult:
        rotation_id = uuid.uuid4().hex
        started_at = datetime.now(UTC)
        record = await self.db(self.store.get_account, resource, account)
        current = await self.db(self.store.reveal_password, resource, account)
        rotator = await self.db(self.store.reveal_rotation_credential, resource)
        via: RotationVia = "self" if rotator is None else "rotator"
        log.info(
            "rotation_started",
            resource=resource,
            account=account,
            rotation_id=rotation_id,
            via=via,
            started_by=started_by,
        )
        admin: UpstreamConnection | None = None
        try:
            target = await self._change_target(resource, account, record.username, current, rotator)
            admin = await self._sign_in_for_change(target, via)
            iterations = await self._iterations(admin)
        except _Failed as failed:
            if admin is not None:
                await _leave(admin)
            entry = await self.db(
                self.store.record_rotation,
                resource,
                account,
                rotation_id=rotation_id,
                method="generated",
                via=via,
                started_by=started_by,
                started_at=started_at,
                outcome="failed",
                detail=failed.detail,
                gateway_id=self.gateway_id,
            )
            log.warning(
                "rotation_failed",
                resource=resource,
                account=account,
                rotation_id=rotation_id,
                error=failed.detail,
            )
            return RotationResult.of(entry, failed.hint)
        try:
            password = generate_password(self.password_length, self.password_alphabet)
            pending = await self.db(
                self.store.begin_rotation,
                resource,
                account,
                password,
                rotation_id=rotation_id,
                via=via,
                started_by=started_by,
                gateway_id=self.gateway_id,
            )
            await self.on_change()  # the pending password is masked from here on
            await self._step("pending_stored", pending)
            return await self._change(admin, pending, password, current, iterations)
        finally:
            await _leave(admin)

    async def _change(
        self,
        admin: UpstreamConnection,
        pending: PendingRotation,
        password: str,
        current: str,
        iterations: int,
    ) -> RotationResult:
        """From a stored pending *password* to its end, over the signed-in *admin*."""
        username = pending.username
        try:
            refused = await self._alter(admin, pending.via, username, password, iterations)
        except UpstreamError as exc:
            # Whether the server applied it is unknown: ask it by signing in.
            return await self._settle_now(
                pending, password, f"ALTER ROLE got no answer: {exc.message}"
            )
        if refused is not None:
            return await self._finish(
                pending,
                promote=False,
                outcome="failed",
                detail=f"ALTER ROLE was refused: {refused}",
                hint=_ALTER_HINTS[pending.via],
            )
        await self._step("altered", pending)
        target = await self._target(pending.resource, pending.account, username, password)
        failure = await self._sign_in_failure(target)
        if failure is None:
            await self._step("verified", pending)
            return await self._finish(pending, promote=True, outcome="rotated")
        why = f"the new password did not sign in: {failure.message}"
        try:
            not_restored = await self._alter(admin, pending.via, username, current, iterations)
        except UpstreamError as exc:
            not_restored = exc.message
        if not_restored is not None:
            log.error("rotation_not_rolled_back", error=not_restored, **_fields_of(pending))
            return await self._settle_now(
                pending, password, f"{why}; setting the previous one again failed: {not_restored}"
            )
        await self._step("restored", pending)
        return await self._finish(
            pending,
            promote=False,
            outcome="rolled_back",
            detail=f"{why}; the previous password was set again",
            hint="check that the role may log in from the gateway (LOGIN, pg_hba.conf,"
            " CONNECTION LIMIT, VALID UNTIL)",
        )

    async def _settle_now(
        self, pending: PendingRotation, password: str, why: str
    ) -> RotationResult:
        """Settle *pending* as recovery would; if neither password signs in yet,
        leave it to the background recovery and say so."""
        settled = await self._settle(pending, password)
        if settled is not None:
            return settled
        self._recover_in_background()
        now = datetime.now(UTC)
        return RotationResult(
            ok=False,
            resource=pending.resource,
            account=pending.account,
            rotation_id=pending.rotation_id,
            outcome="unsettled",
            via=pending.via,
            method="generated",
            started_by=pending.started_by,
            started_at=pending.started_at,
            ended_at=now,
            detail=why,
            hint="neither password signs in yet; the gateway keeps trying both and"
            " completes or rolls the rotation back (see `pam account list`)",
        )

    async def _finish(
        self,
        pending: PendingRotation,
        *,
        promote: bool,
        outcome: Literal["rotated", "failed", "rolled_back"],
        detail: str | None = None,
        hint: str | None = None,
    ) -> RotationResult:
        entry = await self.db(
            self.store.finish_rotation,
            pending.resource,
            pending.account,
            pending.rotation_id,
            promote=promote,
            outcome=outcome,
            detail=detail,
        )
        await self.on_change()
        event = "rotation_finished" if entry.ok else "rotation_failed"
        log.info(event, outcome=outcome, error=detail, **_fields_of(pending))
        return RotationResult.of(entry, hint)

    async def _change_target(
        self,
        resource: str,
        account: str,
        username: str,
        current: str,
        rotator: tuple[str, str] | None,
    ) -> UpstreamTarget:
        """Whom to sign in as for the ALTER ROLE: the rotation role, else the account."""
        if rotator is None:
            return await self._target(resource, account, username, current)
        return await self._target(resource, account, rotator[0], rotator[1])

    async def _sign_in_for_change(
        self, target: UpstreamTarget, via: RotationVia
    ) -> UpstreamConnection:
        try:
            return await connect_upstream(
                target, params={"application_name": _APPLICATION_NAME}, timeout=self.connect_timeout
            )
        except UpstreamError as exc:
            resource, account = target.resource, target.account
            if via == "self":
                raise _Failed(
                    f"account {account} (user {target.username!r}) could not sign in to change"
                    f" its password: {exc.message}",
                    f"store the account's current password with `pam account rotate {resource}"
                    f" {account}`, or give the resource a rotation role"
                    f" (`pam resource set-rotation {resource}`)",
                ) from None
            raise _Failed(
                f"the rotation role {target.username!r} could not sign in: {exc.message}",
                f"set it again with `pam resource set-rotation {resource} --username ...`",
            ) from None

    async def _iterations(self, admin: UpstreamConnection) -> int:
        """The server's SCRAM iteration count: ``scram_iterations`` since 16,
        fixed at 4096 before."""
        if _major_version(admin.server_version) < _SCRAM_ITERATIONS_SETTING_SINCE:
            return SCRAM_DEFAULT_ITERATIONS
        try:
            result = await run_statement(
                admin, "SHOW scram_iterations", timeout=self.connect_timeout
            )
        except UpstreamError as exc:
            raise _Failed(f"the server's SCRAM iteration count: {exc.message}") from None
        try:
            value = result.rows[0][0]
            return int(value) if value is not None else SCRAM_DEFAULT_ITERATIONS
        except (IndexError, ValueError):
            return SCRAM_DEFAULT_ITERATIONS

    async def _alter(
        self,
        admin: UpstreamConnection,
        via: RotationVia,
        username: str,
        password: str,
        iterations: int,
    ) -> str | None:
        """Set *password* upstream as its SCRAM secret; None, or why the server
        refused (then nothing changed). Raises :class:`UpstreamError` when the
        connection failed (then whether it changed is unknown)."""
        role = "CURRENT_USER" if via == "self" else quote_identifier(username)
        secret = scram_secret(password, iterations=iterations)
        statement = f"ALTER ROLE {role} PASSWORD {quote_literal(secret)}"
        result = await run_statement(admin, statement, timeout=self.connect_timeout)
        if result.error is not None:
            return f"{result.error.message} ({result.error.sqlstate})"
        return None

    # --- recovery ----------------------------------------------------------------------

    def _recover_in_background(self) -> None:
        if self._recovery is None or self._recovery.done():
            self.start()

    async def _recover_until_settled(self) -> None:
        while True:
            try:
                if await self.recover():
                    return
            except Exception as exc:  # a store failure: try again later, never die
                log.error("rotation_recovery_failed", error=repr(exc))
            await asyncio.sleep(self.recovery_retry_seconds)

    async def _settle(self, pending: PendingRotation, new: str) -> RotationResult | None:
        """Promote or drop a rotation in flight, by which password signs in: the
        new one (it was set: promote), else the stored one (it was not, or was
        set back: drop the new one). None when neither does yet (the upstream is
        down, or refuses both)."""
        current = await self.db(self.store.reveal_password, pending.resource, pending.account)
        fields = _fields_of(pending)
        new_target = await self._target(pending.resource, pending.account, pending.username, new)
        new_failure = await self._sign_in_failure(new_target)
        if new_failure is None:
            log.warning("rotation_settled", outcome="rotated", **fields)
            return await self._finish(
                pending,
                promote=True,
                outcome="rotated",
                detail="completed by signing in with the new password after an interruption",
            )
        old_failure = await self._sign_in_failure(dataclasses.replace(new_target, password=current))
        if old_failure is None:
            log.warning("rotation_settled", outcome="rolled_back", **fields)
            return await self._finish(
                pending,
                promote=False,
                outcome="rolled_back",
                detail="interrupted; the previous password still signed in, so the new one"
                f" was dropped (it had failed with: {new_failure.message})",
            )
        log.warning(
            "rotation_unsettled",
            new_password_error=new_failure.message,
            stored_password_error=old_failure.message,
            retry_seconds=self.recovery_retry_seconds,
            **fields,
        )
        return None

    # --- helpers -----------------------------------------------------------------------

    async def _target(
        self, resource: str, account: str, username: str, password: str
    ) -> UpstreamTarget:
        res = await self.db(self.store.get_resource, resource)
        return target_of(res, account, username, password)

    async def _sign_in_failure(self, target: UpstreamTarget) -> UpstreamError | None:
        """Sign in with *target* (a fresh SCRAM exchange: no salted-password
        cache) and leave; None when it worked, else why not."""
        try:
            upstream = await connect_upstream(
                target, params={"application_name": _APPLICATION_NAME}, timeout=self.connect_timeout
            )
        except UpstreamError as exc:
            return exc
        await _leave(upstream)
        return None

    async def _step(self, step: RotationStep, pending: PendingRotation) -> None:
        log.debug("rotation_step", step=step, **_fields_of(pending))
        if self.step_hook is not None:
            await self.step_hook(step)


_ALTER_HINTS: Final[dict[str, str]] = {
    "self": "the account may change its own password unless the server forbids it;"
    " or give the resource a rotation role (`pam resource set-rotation`)",
    "rotator": "the rotation role needs CREATEROLE (and, on PostgreSQL 16 or later,"
    " ADMIN OPTION on the account's role): see docs/credentials.md",
}


async def _leave(upstream: UpstreamConnection) -> None:
    if not upstream.writer.is_closing():
        upstream.writer.write(messages.terminate())
    await close_writer(upstream.writer)


def _managed(resource: str, account: str) -> InvalidRequest:
    return InvalidRequest(
        f"{resource}/{account} is managed: pam generates its password and nobody may know it",
        hint=f"rotate it with `pam account rotate {resource} {account} --now`",
    )


def _fields_of(pending: PendingRotation) -> dict[str, str]:
    return {
        "resource": pending.resource,
        "account": pending.account,
        "rotation_id": pending.rotation_id,
    }


def _major_version(server_version: str | None) -> int:
    """16 of ``16.2 (Debian ...)``, 17 of ``17beta1``; 0 when absent or unreadable."""
    match = re.match(r"\d+", server_version or "")
    return int(match.group()) if match else 0
