"""Master key rotation, the store's side: the active version, who holds which,
re-sealing every secret, and the audit keys of earlier versions.

Role: ``pam gateway rotate-master-key`` (the host's side, its key files, is
:mod:`gateway.credentials.keyring`). The fleet's active master key version is
one row (``master_key_state``); every gateway reports the versions its ring
holds with each presence renewal (``gateway_key_versions``); a version becomes
active only when every live gateway holds it; then every sealed column is
sealed anew under it, in batches.

Invariants:

* A gateway reports each version with its key id (a fingerprint, not the key):
  a version staged twice, with two different keys, is not taken as held.
* Activation checks who holds the version and writes it in one transaction,
  with the state row locked: a gateway that reports after the check sees the
  new version on its next renewal, and one that could not open the new blobs
  was not live at the check (its lease had lapsed).
* Before a version becomes active, the audit chain key of every version this
  process's ring holds is sealed under it into ``audit_keys`` (derived keys,
  never a master key): trails written under a version verify after its master
  key is retired.
* Re-sealing writes each row with ``UPDATE ... WHERE <column> = <the blob read>``,
  in transactions of at most :data:`RESEAL_BATCH` rows: a crash midway leaves
  every row sealed under the old key or the new one, never half, and a row
  written meanwhile (by a gateway still sealing under the old version until its
  next renewal) is left for the next pass, not overwritten.
* A blob that names a version is counted by its header alone
  (:func:`~gateway.credentials.secretbox.key_version_of`): counting opens nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Column, ColumnElement, Connection, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite

from gateway.audit.chain import AUDIT_KEY_INFO, AuditChain
from gateway.credentials.schedule import PRESENCE_LEASE_PREFIX
from gateway.credentials.secretbox import (
    SecretDecryptError,
    check_key_version,
    key_version_of,
)
from gateway.errors import ConfigError
from gateway.store.engine import StoreBase
from gateway.store.mfa import factor_aad
from gateway.store.resources import account_aad
from gateway.store.rotations import pending_aad, rotator_aad
from gateway.store.schema import (
    accounts,
    audit_keys,
    gateway_key_versions,
    leases,
    master_key_state,
    mfa_factors,
    resources,
    sso_providers,
    webhooks,
)
from gateway.store.sso import SSO_SECRET_AAD
from gateway.store.webhooks import webhook_secret_aad

__all__ = ["RESEAL_BATCH", "GatewayKeys", "KeyNotHeld", "MasterKeyStore", "audit_key_aad"]

#: Rows re-sealed per transaction.
RESEAL_BATCH: Final = 100
_STATE_ID: Final = 1


class KeyNotHeld(ConfigError):
    """A version cannot become active: live gateways lack it."""


def audit_key_aad(version: int) -> bytes:
    return f"pam/audit-key/{version}".encode()


@dataclass(frozen=True, slots=True)
class _Sealed:
    """One sealed column: its table, key column, and the associated data of a row."""

    table: Table
    key: str
    column: str
    aad: Callable[[Any], bytes]


#: Every column the store keeps sealed with the master key.
SEALED_COLUMNS: Final = (
    _Sealed(accounts, "id", "password_ciphertext", account_aad),
    _Sealed(accounts, "id", "pending_ciphertext", pending_aad),
    _Sealed(resources, "id", "rotation_ciphertext", rotator_aad),
    _Sealed(mfa_factors, "principal_id", "secret_ciphertext", factor_aad),
    _Sealed(mfa_factors, "principal_id", "pending_ciphertext", factor_aad),
    _Sealed(sso_providers, "id", "client_secret_ciphertext", lambda _id: SSO_SECRET_AAD),
    _Sealed(webhooks, "id", "secret_ciphertext", webhook_secret_aad),
    _Sealed(audit_keys, "version", "sealed_key", audit_key_aad),
)


@dataclass(frozen=True, slots=True)
class GatewayKeys:
    """A live gateway (its presence lease unexpired) and the key versions it
    holds, with their key ids (empty: it never reported, as a gateway from
    before rotation)."""

    gateway_id: str
    key_ids: dict[int, str]

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.key_ids))


class MasterKeyStore(StoreBase):
    def _after_open(self) -> None:
        super()._after_open()
        self.sync_master_key()

    def active_key_version(self) -> int:
        """The fleet's active master key version."""
        with self._transaction(write=False) as conn:
            return _active(conn)

    def sync_master_key(self) -> int:
        """Seal with the store's active version from now on, and verify under the
        audit key of every version known (this ring's and ``audit_keys``'). Raises
        :class:`~gateway.errors.ConfigError` if this process's ring lacks the
        active version. Returns it."""
        with self._transaction(write=False) as conn:
            active = _active(conn)
            stored = [
                (row.version, bytes(row.sealed_key))
                for row in conn.execute(select(audit_keys.c.version, audit_keys.c.sealed_key))
            ]
        if not self._box.has_version(active):
            raise ConfigError(
                f"the store's active master key is version {active}, which this"
                " gateway's key ring does not hold",
                hint=f"copy master.keys/{active}.key from a gateway that has it into this"
                " state directory (mode 0600)",
            )
        self._box.activate(active)
        if self._audit_key_given:
            return active
        older = {
            version: self._box.derive_key(AUDIT_KEY_INFO, version=version)
            for version in self._box.versions
            if version != active
        }
        for version, sealed in stored:
            if version in older or version == active:
                continue
            try:
                older[version] = self._box.decrypt(sealed, aad=audit_key_aad(version))
            except SecretDecryptError:
                continue  # a row still under a retired key: its trails show as edited
        self._chain = AuditChain(
            self._box.derive_key(AUDIT_KEY_INFO),
            (older[version] for version in sorted(older, reverse=True)),
        )
        return active

    def report_key_versions(self, gateway_id: str, key_ids: Mapping[int, str]) -> None:
        """Record that *gateway_id*'s ring holds these versions now, with these
        key ids (:meth:`~gateway.credentials.secretbox.SecretBox.key_id`)."""
        held = {str(check_key_version(v)): str(key_ids[v]) for v in sorted(key_ids)}
        values: dict[str, Any] = {"gateway_id": gateway_id, "versions": json.dumps(held)}
        with self._transaction(write=True) as conn:
            values["reported_at"] = self._now()
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            statement = dialect.insert(gateway_key_versions).values(**values)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[gateway_key_versions.c.gateway_id],
                    set_={
                        "versions": statement.excluded.versions,
                        "reported_at": statement.excluded.reported_at,
                    },
                )
            )

    def key_holders(self) -> list[GatewayKeys]:
        """Every live gateway and the versions it last reported, by id."""
        with self._transaction(write=False) as conn:
            return _live_holders(conn, self._now())

    def activate_master_key(self, version: int) -> None:
        """Make *version* (held by this process's ring) the fleet's active one.

        Raises :class:`KeyNotHeld` naming the live gateways that lack it. Idempotent.
        """
        previous = self._box.active_version
        self._box.activate(version)  # UnknownKeyVersion if this ring lacks it
        try:
            with self._transaction(write=True) as conn:
                state = conn.execute(
                    select(master_key_state)
                    .where(master_key_state.c.id == _STATE_ID)
                    .with_for_update()
                ).one()
                if state.active_version == version:
                    return
                _check_held(_live_holders(conn, self._now()), version, self._box.key_id(version))
                self._seal_audit_keys(conn, version)
                conn.execute(
                    update(master_key_state)
                    .where(master_key_state.c.id == _STATE_ID)
                    .values(active_version=version, activated_at=self._now())
                )
        except BaseException:
            self._box.activate(previous)
            raise
        self.sync_master_key()

    def keep_audit_keys(self) -> None:
        """Seal the audit key of every version this ring holds that the store
        does not keep yet (before a version's master key is retired)."""
        with self._transaction(write=True) as conn:
            self._seal_audit_keys(conn, _active(conn))

    def _seal_audit_keys(self, conn: Connection, active: int) -> None:
        """Seal the audit key of every other version this ring holds (those not
        kept yet) under *active*, the version about to become active."""
        kept = set(conn.execute(select(audit_keys.c.version)).scalars())
        now = self._now()
        for version in self._box.versions:
            if version == active or version in kept:
                continue
            key = self._box.derive_key(AUDIT_KEY_INFO, version=version)
            conn.execute(
                audit_keys.insert().values(
                    version=version,
                    sealed_key=self._box.encrypt(key, aad=audit_key_aad(version)),
                    added_at=now,
                )
            )

    def reseal_secrets(self, batch: int = RESEAL_BATCH) -> int:
        """Seal every sealed column anew under the active version, *batch* rows
        per transaction; how many rows were re-sealed. Rows under a version this
        ring lacks are left as they are (:meth:`sealed_counts` shows them); a
        row under a version it holds that does not open (altered, or moved from
        another row) stops the pass with a
        :class:`~gateway.credentials.secretbox.SecretDecryptError` naming it."""
        active = self.sync_master_key()
        done = 0
        for sealed in SEALED_COLUMNS:
            with self._transaction(write=False) as conn:
                stale = [
                    ident
                    for ident, blob in _rows(conn, sealed)
                    if _version(blob) != active and self._box.has_version(_version(blob))
                ]
            for start in range(0, len(stale), batch):
                with self._transaction(write=True) as conn:
                    done += self._reseal_rows(conn, sealed, stale[start : start + batch], active)
        return done

    def _reseal_rows(
        self, conn: Connection, sealed: _Sealed, idents: list[Any], active: int
    ) -> int:
        """Re-seal the rows *idents* of *sealed* that are still under another
        version than *active*, each only if unchanged since read."""
        key_column: Column[Any] = sealed.table.c[sealed.key]
        column: Column[Any] = sealed.table.c[sealed.column]
        done = 0
        for ident, blob in _rows(conn, sealed, key_column.in_(idents)):
            if _version(blob) == active or not self._box.has_version(_version(blob)):
                continue
            try:
                fresh = self._box.reseal(blob, aad=sealed.aad(ident))
            except SecretDecryptError as exc:
                # Which value, so the operator can set it again: the bare
                # error names none, and the whole pass stops here.
                raise SecretDecryptError(
                    f"cannot re-seal {sealed.table.name}.{sealed.column} of row {ident}:"
                    f" {exc.message}",
                    hint="set that secret again (or remove what holds it), then run"
                    " `pam gateway rotate-master-key --activate` again",
                ) from None
            result = conn.execute(
                update(sealed.table)
                .where(key_column == ident, column == blob)
                .values({sealed.column: fresh})
            )
            done += result.rowcount
        return done

    def sealed_counts(self) -> dict[int, int]:
        """How many sealed values the store holds under each key version
        (version 0: values whose header is unreadable)."""
        counts: dict[int, int] = {}
        with self._transaction(write=False, snapshot=True) as conn:
            for sealed in SEALED_COLUMNS:
                for _ident, blob in _rows(conn, sealed):
                    version = _version(blob)
                    counts[version] = counts.get(version, 0) + 1
        return counts


def _check_held(holders: list[GatewayKeys], version: int, key_id: str) -> None:
    """Raise :class:`KeyNotHeld` unless every one of *holders* holds *version*
    with this *key_id* (another key under the same number: staged twice)."""
    lacking = [h.gateway_id for h in holders if version not in h.key_ids]
    other = [h.gateway_id for h in holders if h.key_ids.get(version) not in (None, key_id)]
    if not lacking and not other:
        return
    found = []
    if lacking:
        found.append(f"missing on: {', '.join(lacking)}")
    if other:
        found.append(f"another key under that number on: {', '.join(other)}")
    raise KeyNotHeld(
        f"master key version {version} is not held by every live gateway; {'; '.join(found)}",
        hint=f"copy this gateway's master.keys/{version}.key to each of them (mode 0600,"
        " replacing a different one); they pick it up at their next presence renewal",
    )


def _version(blob: bytes) -> int:
    try:
        return key_version_of(blob)
    except SecretDecryptError:
        return 0


def _rows(
    conn: Connection, sealed: _Sealed, where: ColumnElement[bool] | None = None
) -> Iterator[tuple[Any, bytes]]:
    """(key, blob) of each row of *sealed* with a value (and *where*)."""
    key_column: Column[Any] = sealed.table.c[sealed.key]
    column: Column[Any] = sealed.table.c[sealed.column]
    query = select(key_column, column).where(column.is_not(None)).order_by(key_column)
    if where is not None:
        query = query.where(where)
    for ident, blob in conn.execute(query):
        yield ident, bytes(blob)


def _active(conn: Connection) -> int:
    row = conn.execute(
        select(master_key_state.c.active_version).where(master_key_state.c.id == _STATE_ID)
    ).scalar_one()
    return int(row)


def _live_holders(conn: Connection, now: Any) -> list[GatewayKeys]:
    rows = conn.execute(
        select(leases.c.holder, gateway_key_versions.c.versions)
        .select_from(
            leases.outerjoin(
                gateway_key_versions, gateway_key_versions.c.gateway_id == leases.c.holder
            )
        )
        .where(
            leases.c.name.startswith(PRESENCE_LEASE_PREFIX, autoescape=True),
            leases.c.expires_at > now,
        )
        .order_by(leases.c.holder)
    ).all()
    return [
        GatewayKeys(
            row.holder,
            {}
            if row.versions is None
            else {int(v): i for v, i in json.loads(row.versions).items()},
        )
        for row in rows
    ]
