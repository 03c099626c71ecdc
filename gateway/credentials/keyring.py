"""The master key ring in a state directory: its files, and the files it seals.

Role: where each version of the master key lives on a gateway host, and the
steps of a rotation that touch only this host (``pam gateway rotate-master-key``;
the fleet's side is :mod:`gateway.store.master_keys`). The box that uses the
ring is :class:`~gateway.credentials.secretbox.SecretBox`.

Layout (every key file base64, mode 0600, made by
:func:`~gateway.credentials.secretbox.generate_master_key`):

* ``master.key``: version 1, the key of every state directory from before
  rotation (unchanged, so nothing else needs to know about rings);
* ``master.keys/<version>.key``: version 2 and later;
* ``master.keys/active``: the version this host last saw active in the store.
  Only a default for sealing before the store is open: the store's word wins
  (:meth:`~gateway.store.master_keys.MasterKeyStore.sync_master_key`).

Invariants:

* A key file is never overwritten and never made by anything but
  :func:`stage_key` (O_EXCL); it is removed only by :func:`retire_key`, which
  refuses the active version and a version a sealed file here still uses.
* The private keys sealed in the state directory (:data:`SEALED_FILES`) are
  re-sealed by writing a new file and renaming it over the old one: a crash
  leaves the old file or the new one, each openable by the ring.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Protocol

import structlog

from gateway.config import MASTER_KEY_FILE, write_private_file
from gateway.credentials import pki
from gateway.credentials.secretbox import (
    FIRST_KEY_VERSION,
    SecretBox,
    generate_master_key,
    key_version_of,
    load_master_key,
)
from gateway.errors import ConfigError

__all__ = [
    "KEYRING_DIR",
    "SEALED_FILES",
    "KeyRingStore",
    "has_keys",
    "key_path",
    "load_ring",
    "open_box",
    "refresh",
    "reload_ring",
    "reseal_files",
    "retire_key",
    "sealed_file_versions",
    "stage_key",
    "write_active",
]

log = structlog.get_logger(__name__)

#: The directory of every key version but the first, under the state directory.
KEYRING_DIR: Final = "master.keys"
_ACTIVE_FILE: Final = "active"
_KEY_NAME: Final = re.compile(r"([1-9][0-9]{0,9})\.key")
_DIR_MODE: Final = 0o700

#: The files of the state directory sealed with the master key (associated
#: data: the file's name, as :mod:`gateway.credentials.pki` seals them).
SEALED_FILES: Final = (pki.CA_KEY_FILE, pki.SERVER_KEY_FILE)


def key_path(home: Path, version: int) -> Path:
    """Where master key *version* lives in *home*."""
    if version == FIRST_KEY_VERSION:
        return home / MASTER_KEY_FILE
    return home / KEYRING_DIR / f"{version}.key"


def load_ring(home: Path) -> dict[int, bytes]:
    """Every master key in *home*, by version. Raises :class:`ConfigError` when
    there is none, or when a key file is unreadable or open to others."""
    ring: dict[int, bytes] = {}
    first = home / MASTER_KEY_FILE
    if first.exists():
        ring[FIRST_KEY_VERSION] = load_master_key(first)
    directory = home / KEYRING_DIR
    if directory.is_dir():
        for entry in sorted(directory.iterdir()):
            match = _KEY_NAME.fullmatch(entry.name)
            if match is not None and int(match.group(1)) != FIRST_KEY_VERSION:
                ring[int(match.group(1))] = load_master_key(entry)
    if not ring:
        raise ConfigError(
            f"master key file {first} does not exist, and {directory} holds no key",
            hint="restore the state directory's key files from your backup",
        )
    return ring


def has_keys(home: Path) -> bool:
    """Whether *home* holds any master key file (a new state directory does not)."""
    directory = home / KEYRING_DIR
    return (home / MASTER_KEY_FILE).exists() or (
        directory.is_dir() and any(_KEY_NAME.fullmatch(e.name) for e in directory.iterdir())
    )


def _read_active(home: Path) -> int | None:
    try:
        text = (home / KEYRING_DIR / _ACTIVE_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def write_active(home: Path, version: int) -> None:
    """Remember *version* as the active one (a default for the next start)."""
    if _read_active(home) == version:
        return
    _ensure_dir(home)
    write_private_file(home / KEYRING_DIR / _ACTIVE_FILE, f"{version}\n".encode())


def open_box(home: Path) -> SecretBox:
    """A box over *home*'s ring, sealing with the version last seen active (or
    the lowest held); the store corrects it when it is opened."""
    ring = load_ring(home)
    active = _read_active(home)
    return SecretBox.from_ring(ring, active if active in ring else min(ring))


def reload_ring(home: Path, box: SecretBox) -> tuple[int, ...]:
    """Bring *box*'s ring in line with *home*'s key files (keys staged or
    retired since it was loaded; the active key is kept even if its file is
    gone). Returns the versions whose files are there."""
    ring = load_ring(home)
    box.add_keys(ring)
    for version in box.versions:
        if version not in ring and version != box.active_version:
            box.remove_key(version)
    return tuple(sorted(ring))


def _ensure_dir(home: Path) -> None:
    directory = home / KEYRING_DIR
    directory.mkdir(mode=_DIR_MODE, exist_ok=True)
    os.chmod(directory, _DIR_MODE)


def stage_key(home: Path, active: int, known: int) -> tuple[int, Path, bool]:
    """A new key version in *home*'s ring, above every version held here and
    *known* (the highest any gateway reports); or, if this ring holds a version
    above *active* already, that one (staging is idempotent). Returns
    (version, path, created)."""
    held = load_ring(home)
    newest = max(held)
    if newest > active:
        return newest, key_path(home, newest), False
    version = max(newest, known) + 1
    _ensure_dir(home)
    path = key_path(home, version)
    generate_master_key(path)
    return version, path, True


def sealed_file_versions(home: Path) -> dict[str, int]:
    """The key version of each sealed file present in *home*, by file name."""
    found = {}
    for name in SEALED_FILES:
        try:
            found[name] = key_version_of((home / name).read_bytes())
        except FileNotFoundError:
            continue
    return found


def reseal_files(home: Path, box: SecretBox) -> list[str]:
    """Seal every sealed file of *home* anew under *box*'s active key; the names
    of those that were under another version."""
    done = []
    for name in SEALED_FILES:
        path = home / name
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            continue
        fresh = box.reseal(blob, aad=name.encode())
        if fresh is not None:
            write_private_file(path, fresh)
            done.append(name)
    return done


def retire_key(home: Path, version: int, active: int) -> Path | None:
    """Remove key *version* from *home*'s ring (its path, or None if it was not
    there). Refuses the *active* version and one a sealed file here still uses;
    the store's rows are the caller's to check first."""
    if version == active:
        raise ConfigError(
            f"master key version {version} is the active one; it cannot be retired",
            hint="activate a newer version first (rotate-master-key --activate)",
        )
    users = [name for name, v in sealed_file_versions(home).items() if v == version]
    if users:
        raise ConfigError(
            f"{', '.join(users)} in {home} is still sealed under master key version {version}",
            hint="start this gateway (it re-seals its files under the active key) and retry",
        )
    path = key_path(home, version)
    if not path.exists():
        return None
    path.unlink()
    return path


class KeyRingStore(Protocol):
    """The store's side of rotation that a running gateway uses
    (``gateway.store.Store`` implements it)."""

    def report_key_versions(self, gateway_id: str, key_ids: Mapping[int, str]) -> None: ...

    def sync_master_key(self) -> int: ...


def follow(home: Path, box: SecretBox, store: KeyRingStore) -> int:
    """A helper process's rotation step (the audit writer, a relay worker): hold
    the keys copied to *home* since the last call, and seal and chain under the
    store's active version (reporting and re-sealing files are the daemon's).
    Returns the active version."""
    reload_ring(home, box)
    return store.sync_master_key()


def refresh(home: Path, box: SecretBox, store: KeyRingStore, gateway_id: str) -> int:
    """A running gateway's rotation step, after each presence renewal: re-read
    the ring's files (a key copied here is picked up without a restart), report
    the versions held (with their key ids), follow the store's active version, and re-seal this
    state directory's files under it. Returns the active version."""
    versions = reload_ring(home, box)
    store.report_key_versions(gateway_id, {v: box.key_id(v) for v in versions})
    before = box.active_version
    active = store.sync_master_key()
    write_active(home, active)
    resealed = reseal_files(home, box)
    if active != before or resealed:
        log.info("master_key_version_active", version=active, resealed_files=resealed)
    return active
