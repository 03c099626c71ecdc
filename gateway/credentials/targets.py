"""Decrypted credentials in use: the upstream target cache, SCRAM caches, the masks.

Invariants:
* A looked-up target (resource, account, decrypted password) is reused for at
  most :data:`TARGET_CACHE_SECONDS`; :meth:`Credentials.refresh` (after any
  change made through this daemon's API) drops every one at once, and a lookup
  that raced a refresh is not cached.
* SCRAM salted passwords are cached per credential (RFC 5802 lets a client cache
  them per salt and iteration count), keyed by a digest of the whole
  credential, so a rotated password starts a fresh cache.
* :attr:`Credentials.stored_secrets` holds every account's stored password (and
  the new one of a rotation in flight), so the audit can mask any of them.
* A sign-in refused with 28P01 gets one more try (:meth:`Credentials.retry_target`)
  with the credential read again: the stored password if it changed meanwhile,
  else the new one of a rotation in flight. A rotation never leaves a window in
  which a new connection has no password that works. Nothing here logs or returns a password other
  than inside an :class:`~gateway.net.upstream.UpstreamTarget`.
* A grant of an ephemeral account has a target of its own (its role, its
  generated password), held here in memory only, from before its door opens
  until it ends (:meth:`Credentials.set_grant_target`); its connections get it
  and never a retry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field

from gateway.credentials.ports import AccountStore, ResourceRecord, StoreThread
from gateway.errors import GatewayError
from gateway.net.upstream import UpstreamTarget

MAX_SCRAM_CACHES = 1024
#: How long a looked-up upstream target (resource, account, decrypted password)
#: is reused by new connections. Changes made through this daemon's API drop it
#: at once; the bound only matters for edits made behind its back.
TARGET_CACHE_SECONDS = 10.0


@dataclass(eq=False)
class Credentials:
    store: AccountStore
    db: StoreThread
    #: every account's stored password, so the audit can mask any of them
    stored_secrets: tuple[str, ...] = field(default=(), repr=False)
    _scram_caches: dict[bytes, dict[tuple[bytes, int], bytes]] = field(
        default_factory=dict, repr=False
    )
    #: (resource, account) -> (when looked up, target); see upstream_target
    _targets: dict[tuple[str, str], tuple[float, UpstreamTarget]] = field(
        default_factory=dict, repr=False
    )
    _generation: int = 0
    #: session id -> the target of a grant with a role of its own
    _grant_targets: dict[str, UpstreamTarget] = field(default_factory=dict, repr=False)

    def set_grant_target(self, session_id: str, target: UpstreamTarget) -> None:
        """Connections of grant *session_id* sign in with *target* (its own role)."""
        self._grant_targets[session_id] = target

    def grant_target(self, session_id: str) -> UpstreamTarget | None:
        return self._grant_targets.get(session_id)

    def drop_grant_target(self, session_id: str) -> bool:
        """Forget grant *session_id*'s own target; whether it had one."""
        return self._grant_targets.pop(session_id, None) is not None

    async def upstream_target(
        self, resource: str, account: str, *, session_id: str | None = None
    ) -> UpstreamTarget:
        """Where and as whom to connect for *resource*/*account* (for grant
        *session_id*: its own target, when it has one).

        Looked up once per :data:`TARGET_CACHE_SECONDS` rather than per connection:
        three store reads and a decryption are most of a new connection's store
        work. The decrypted password is no more exposed by this than by the
        audit's masking list, which holds every stored password anyway.
        """
        if session_id is not None and (own := self._grant_targets.get(session_id)) is not None:
            return own
        key = (resource, account)
        cached = self._targets.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < TARGET_CACHE_SECONDS:
            return cached[1]
        generation = self._generation
        target = await self.db(self._load_target, resource, account)
        if generation == self._generation:  # not changed while we looked
            self._targets[key] = (now, target)
        return target

    async def retry_target(self, failed: UpstreamTarget) -> UpstreamTarget | None:
        """Another password to try after *failed* was refused (28P01), or None.

        The stored password when it is not the one that failed (rotated or
        stored since the target was looked up), else the pending one of a
        rotation in flight (set upstream, not yet promoted). The cached target
        is dropped either way.
        """
        if failed in self._grant_targets.values():
            return None  # a grant's own role has one password, and it was this one
        key = (failed.resource, failed.account)
        self._targets.pop(key, None)
        generation = self._generation
        current = await self.db(self._load_target, failed.resource, failed.account)
        if current.password != failed.password:
            if generation == self._generation:
                self._targets[key] = (time.monotonic(), current)
            return current
        pending = await self.db(self.store.reveal_pending_password, failed.resource, failed.account)
        if pending is None or pending == failed.password:
            return None
        return dataclasses.replace(current, password=pending)

    def scram_cache(self, target: UpstreamTarget) -> dict[tuple[bytes, int], bytes]:
        """Salted passwords of this target's credentials, by (salt, iterations)."""
        # Keyed by a digest of the whole credential, so a rotated password (or
        # a changed user) starts a fresh cache; the old one is dropped.
        key = hashlib.sha256(
            "\0".join((target.resource, target.account, target.username, target.password)).encode()
        ).digest()
        cache = self._scram_caches.get(key)
        if cache is None:
            if len(self._scram_caches) >= MAX_SCRAM_CACHES:
                self._scram_caches.clear()
            cache = self._scram_caches[key] = {}
        return cache

    async def refresh(self) -> None:
        """Reload the stored passwords the audit masks and forget looked-up upstream
        targets (after an account or resource is added, rotated or removed)."""
        self._targets.clear()
        self._generation += 1
        self.stored_secrets = await self.db(self._load_secrets)

    def _load_target(self, resource: str, account: str) -> UpstreamTarget:
        res = self.store.get_resource(resource)
        acct = self.store.get_account(resource, account)
        return target_of(
            res, acct.name, acct.username, self.store.reveal_password(resource, account)
        )

    def _load_secrets(self) -> tuple[str, ...]:
        found: list[str] = []
        for account in self.store.list_accounts():
            try:
                found.append(self.store.reveal_password(account.resource_name, account.name))
                pending = self.store.reveal_pending_password(account.resource_name, account.name)
            except GatewayError:
                continue  # an undecryptable row is reported when it is used
            if pending is not None:
                found.append(pending)
        return tuple(found)


def target_of(res: ResourceRecord, account: str, username: str, password: str) -> UpstreamTarget:
    """Where and as whom to sign in upstream: *res*'s address and TLS, with
    *username* and *password* (the account's, a rotation role's, a grant role's)."""
    return UpstreamTarget(
        resource=res.name,
        account=account,
        host=res.host,
        port=res.port,
        database=res.database,
        username=username,
        password=password,
        ssl_mode=res.ssl_mode,
        ca_cert=res.ca_cert,
    )
