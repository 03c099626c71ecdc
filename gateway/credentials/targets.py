"""Decrypted credentials in use: the upstream target cache, SCRAM caches, the masks.

Invariants:
* A looked-up target (resource, account, decrypted password) is reused for at
  most :data:`TARGET_CACHE_SECONDS`; :meth:`Credentials.refresh` (after any
  change made through this daemon's API) drops every one at once, and a lookup
  that raced a refresh is not cached.
* SCRAM salted passwords are cached per credential (RFC 5802 lets a client cache
  them per salt and iteration count), keyed by a digest of the whole
  credential, so a rotated password starts a fresh cache.
* :attr:`Credentials.stored_secrets` holds every account's stored password, so
  the audit can mask any of them. Nothing here logs or returns a password other
  than inside an :class:`~gateway.net.upstream.UpstreamTarget`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from gateway.credentials.ports import AccountStore, StoreThread
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

    async def upstream_target(self, resource: str, account: str) -> UpstreamTarget:
        """Where and as whom to connect for *resource*/*account*.

        Looked up once per :data:`TARGET_CACHE_SECONDS` rather than per connection:
        three store reads and a decryption are most of a new connection's store
        work. The decrypted password is no more exposed by this than by the
        audit's masking list, which holds every stored password anyway.
        """
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
        return UpstreamTarget(
            resource=res.name,
            account=acct.name,
            host=res.host,
            port=res.port,
            database=res.database,
            username=acct.username,
            password=self.store.reveal_password(resource, account),
            ssl_mode=res.ssl_mode,
            ca_cert=res.ca_cert,
        )

    def _load_secrets(self) -> tuple[str, ...]:
        found: list[str] = []
        for account in self.store.list_accounts():
            try:
                found.append(self.store.reveal_password(account.resource_name, account.name))
            except GatewayError:
                continue  # an undecryptable row is reported when it is used
        return tuple(found)
