"""``pam gateway rotate-master-key``: the steps of a master key rotation, run on
a gateway host against its state directory and the shared store.

Role: the composition root of a rotation. The host's key files are
:mod:`gateway.credentials.keyring`'s, the fleet's state and the re-sealing of
the store's secrets :mod:`gateway.store.master_keys`'. The steps
(docs/operations.md, "Master key rotation"):

1. :func:`stage`: a new key version in this host's ring, not active. The
   operator copies its file to every other gateway's state directory; running
   gateways pick it up at their next presence renewal and report it.
2. :func:`activate`: refused unless every live gateway reports the new version;
   then it becomes the fleet's active one, every stored secret is re-sealed under
   it, and so are this host's sealed files (the other gateways re-seal theirs at
   their next renewal).
3. :func:`retire`: an old version leaves this host's ring once nothing in the
   store or here is sealed with it.

Invariants: each step is idempotent (run it again after a failure); no step
prints or logs a key; a refusal is a :class:`~gateway.errors.GatewayError`
naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config import load_settings, store_url
from gateway.credentials import keyring
from gateway.credentials.secretbox import SecretBox
from gateway.errors import ConfigError
from gateway.store import Store
from gateway.store.master_keys import GatewayKeys

__all__ = ["Activated", "Staged", "Status", "activate", "retire", "stage", "status"]


@dataclass(frozen=True, slots=True)
class Staged:
    version: int
    path: Path
    created: bool
    active: int


@dataclass(frozen=True, slots=True)
class Activated:
    version: int
    resealed: int
    resealed_files: tuple[str, ...]
    #: sealed values in the store by key version, after re-sealing
    counts: dict[int, int]


@dataclass(frozen=True, slots=True)
class Status:
    active: int
    #: versions in this host's ring
    held: tuple[int, ...]
    counts: dict[int, int]
    gateways: tuple[GatewayKeys, ...]
    #: this host's sealed files and their versions
    files: dict[str, int]


def _open(home: Path, box: SecretBox | None = None) -> Store:
    """The shared store, with *home*'s key ring (the store sets its active version)."""
    settings = load_settings(home)
    return Store.open(
        store_url(home, settings),
        box if box is not None else keyring.open_box(home),
        sqlite_synchronous=settings.store_sqlite_synchronous,
    )


def stage(home: Path) -> Staged:
    """Make the next key version in *home*'s ring (or name the one staged already)."""
    with _open(home) as store:
        active = store.active_key_version()
        known = {active, *(v for h in store.key_holders() for v in h.versions)}
        version, path, created = keyring.stage_key(home, active, max(known))
    return Staged(version, path, created, active)


def activate(home: Path) -> Activated:
    """Make the newest version of *home*'s ring the fleet's active one (if it is
    not yet), then re-seal every stored secret and this host's files under it."""
    box = keyring.open_box(home)
    with _open(home, box) as store:
        version = max(box.versions)
        if version < store.active_key_version():
            raise ConfigError(
                f"this gateway's newest master key is version {version}, older than the"
                f" active one ({store.active_key_version()})",
                hint="stage a new version with `pam gateway rotate-master-key`",
            )
        store.activate_master_key(version)
        resealed = store.reseal_secrets()
        counts = store.sealed_counts()
        keyring.write_active(home, version)
        files = keyring.reseal_files(home, box)
    return Activated(version, resealed, tuple(files), counts)


def status(home: Path) -> Status:
    """Where the rotation stands: the active version, what is sealed under each,
    and who holds which."""
    held = tuple(sorted(keyring.load_ring(home)))
    with _open(home) as store:
        return Status(
            active=store.active_key_version(),
            held=held,
            counts=store.sealed_counts(),
            gateways=tuple(store.key_holders()),
            files=keyring.sealed_file_versions(home),
        )


def retire(home: Path, version: int) -> Path | None:
    """Remove key *version* from *home*'s ring; refused while it is active or
    anything in the store or here is sealed with it. Its audit key stays in the
    store (sealed), so trails written under it still verify."""
    with _open(home) as store:
        active = store.active_key_version()
        still = store.sealed_counts().get(version, 0)
        if version != active and still:
            raise ConfigError(
                f"{still} stored secret(s) are still sealed under master key version {version}",
                hint="run `pam gateway rotate-master-key --activate` again to re-seal them",
            )
        if version != active:
            store.keep_audit_keys()
        return keyring.retire_key(home, version, active)
