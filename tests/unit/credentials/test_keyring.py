"""Tests of the master key ring: the blob formats (gateway.credentials.secretbox)
and the ring's files in a state directory (gateway.credentials.keyring)."""

from __future__ import annotations

import stat
import struct
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config import MASTER_KEY_FILE
from gateway.credentials import keyring, pki
from gateway.credentials.secretbox import (
    SecretBox,
    SecretDecryptError,
    UnknownKeyVersion,
    generate_master_key,
    key_version_of,
)
from gateway.errors import ConfigError

K1 = bytes(range(32))
K2 = bytes(range(1, 33))
K3 = bytes(range(2, 34))
AAD = b"pam/account/0123456789abcdef0123456789abcdef"
SECRET = b"correct horse battery staple"


def test_a_version_1_blob_is_format_1_as_before_rotation() -> None:
    blob = SecretBox.from_ring({1: K1, 2: K2}, active=1).encrypt(SECRET, aad=AAD)
    assert blob[0] == 0x01
    assert key_version_of(blob) == 1
    # Exactly what a one-key box (the code before rotation) opens.
    assert SecretBox(K1).decrypt(blob, aad=AAD) == SECRET


def test_a_later_version_blob_is_format_2_naming_its_version() -> None:
    blob = SecretBox.from_ring({1: K1, 7: K2}, active=7).encrypt(SECRET, aad=AAD)
    assert blob[:5] == b"\x02" + struct.pack("!I", 7)
    assert key_version_of(blob) == 7
    # Byte-exact layout: header || nonce || AES-256-GCM(key 7, aad = header || aad).
    header, nonce = blob[:5], blob[5:17]
    assert AESGCM(K2).decrypt(nonce, blob[17:], header + AAD) == SECRET


def test_a_ring_opens_blobs_of_every_version_and_seals_with_the_active_one() -> None:
    old = SecretBox(K1).encrypt(SECRET, aad=AAD)
    ring = SecretBox.from_ring({1: K1, 2: K2}, active=2)
    new = ring.encrypt(SECRET, aad=AAD)
    assert ring.decrypt(old, aad=AAD) == SECRET
    assert ring.decrypt(new, aad=AAD) == SECRET
    assert key_version_of(new) == 2
    resealed = ring.reseal(old, aad=AAD)
    assert resealed is not None and key_version_of(resealed) == 2
    assert ring.reseal(new, aad=AAD) is None


def test_a_blob_under_a_version_the_ring_lacks_names_the_version() -> None:
    blob = SecretBox.from_ring({1: K1, 3: K3}, active=3).encrypt(SECRET, aad=AAD)
    with pytest.raises(UnknownKeyVersion) as info:
        SecretBox(K1).decrypt(blob, aad=AAD)
    assert "master key version 3" in str(info.value)
    assert "3.key" in (info.value.hint or "")
    assert isinstance(info.value, SecretDecryptError)


def test_the_version_in_the_header_is_authenticated() -> None:
    ring = SecretBox.from_ring({2: K2, 3: K2}, active=2)
    blob = ring.encrypt(SECRET, aad=AAD)
    # Same key under another version number: the header is in the aad, so no.
    with pytest.raises(SecretDecryptError, match="altered"):
        ring.decrypt(b"\x02" + struct.pack("!I", 3) + blob[5:], aad=AAD)


def test_a_format_2_blob_claiming_version_1_does_not_open() -> None:
    ring = SecretBox.from_ring({1: K1, 2: K2}, active=2)
    blob = ring.encrypt(SECRET, aad=AAD)
    with pytest.raises(SecretDecryptError):
        ring.decrypt(b"\x02" + struct.pack("!I", 1) + blob[5:], aad=AAD)


def test_derived_keys_differ_per_version_and_a_ring_of_one_derives_as_before() -> None:
    ring = SecretBox.from_ring({1: K1, 2: K2}, active=2)
    assert ring.derive_key(b"x", version=1) == SecretBox(K1).derive_key(b"x")
    assert ring.derive_key(b"x") == ring.derive_key(b"x", version=2)
    assert ring.derive_key(b"x", version=1) != ring.derive_key(b"x", version=2)


def test_a_key_id_names_the_key_not_the_version() -> None:
    one = SecretBox.from_ring({1: K1, 2: K2}, active=1)
    other = SecretBox.from_ring({2: K3}, active=2)
    assert one.key_id(2) == SecretBox.from_ring({2: K2}, active=2).key_id(2)
    assert one.key_id(2) != other.key_id(2)
    assert one.key_id(1) != one.key_id(2)
    assert len(one.key_id(1)) == 16 and K1.hex()[:16] != one.key_id(1)


def test_the_active_key_cannot_be_removed_and_an_absent_one_not_activated() -> None:
    ring = SecretBox.from_ring({1: K1, 2: K2}, active=2)
    with pytest.raises(ConfigError):
        ring.remove_key(2)
    ring.remove_key(1)
    assert ring.versions == (2,)
    with pytest.raises(UnknownKeyVersion):
        ring.activate(1)
    assert "K" not in repr(ring) and repr(ring).startswith("SecretBox(<keys hidden>")


@pytest.mark.parametrize("version", [0, -1, 2**32, "2", True])
def test_a_key_version_is_a_whole_number_from_1(version: object) -> None:
    with pytest.raises(ConfigError):
        SecretBox.from_ring({version: K1}, active=version)  # type: ignore[dict-item]


# -- the ring's files ---------------------------------------------------------------


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    generate_master_key(home / MASTER_KEY_FILE)
    return home


def test_staging_makes_one_private_key_file_and_is_idempotent(tmp_path: Path) -> None:
    home = _home(tmp_path)
    version, path, created = keyring.stage_key(home, active=1, known=1)
    assert (version, created) == (2, True)
    assert path == home / "master.keys" / "2.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "master.keys").stat().st_mode) == 0o700
    assert keyring.stage_key(home, active=1, known=2) == (2, path, False)
    # Version 2 active; a gateway reports a version 5 (staged elsewhere): the
    # next is above it.
    assert keyring.stage_key(home, active=2, known=5)[:1] == (6,)
    assert sorted(keyring.load_ring(home)) == [1, 2, 6]


def test_open_box_seals_with_the_version_last_seen_active(tmp_path: Path) -> None:
    home = _home(tmp_path)
    keyring.stage_key(home, active=1, known=1)
    assert keyring.open_box(home).active_version == 1
    keyring.write_active(home, 2)
    box = keyring.open_box(home)
    assert (box.active_version, box.versions) == (2, (1, 2))


def test_reload_picks_up_staged_keys_and_drops_retired_ones(tmp_path: Path) -> None:
    home = _home(tmp_path)
    box = keyring.open_box(home)
    keyring.stage_key(home, active=1, known=1)
    assert keyring.reload_ring(home, box) == (1, 2)
    assert box.versions == (1, 2)
    box.activate(2)
    keyring.retire_key(home, 1, active=2)
    assert keyring.reload_ring(home, box) == (2,)
    assert box.versions == (2,)


def test_sealed_files_are_resealed_and_retire_refuses_a_key_still_used(tmp_path: Path) -> None:
    home = _home(tmp_path)
    box = keyring.open_box(home)
    pki.ensure_pki(home, box, ())
    keyring.stage_key(home, active=1, known=1)
    keyring.reload_ring(home, box)
    box.activate(2)
    with pytest.raises(ConfigError, match="still sealed under master key version 1"):
        keyring.retire_key(home, 1, active=2)
    with pytest.raises(ConfigError, match="active one"):
        keyring.retire_key(home, 2, active=2)
    assert sorted(keyring.reseal_files(home, box)) == sorted(keyring.SEALED_FILES)
    assert set(keyring.sealed_file_versions(home).values()) == {2}
    assert keyring.reseal_files(home, box) == []
    assert keyring.retire_key(home, 1, active=2) == home / MASTER_KEY_FILE
    assert not (home / MASTER_KEY_FILE).exists()
    # A state directory whose first key was retired still has keys: `gateway
    # init --force` must not make a new version 1.
    assert keyring.has_keys(home) and not keyring.has_keys(tmp_path)
    # Without version 1, everything here still opens.
    again = keyring.open_box(home)
    assert again.versions == (2,)
    pki.load_pki(home, again)
    pki.load_server_identity(home, again)


def test_a_ring_without_any_key_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        keyring.load_ring(tmp_path)


class _StoreSide:
    """The store's side of a running gateway's rotation step: the fleet's
    active version (which the real store makes the box seal with), and what
    each gateway reported."""

    def __init__(self, box: SecretBox) -> None:
        self.box = box
        self.active = 1
        self.reported: dict[str, dict[int, str]] = {}

    def report_key_versions(self, gateway_id: str, key_ids: Mapping[int, str]) -> None:
        self.reported[gateway_id] = dict(key_ids)

    def sync_master_key(self) -> int:
        self.box.activate(self.active)
        return self.active


def _running(tmp_path: Path) -> tuple[Path, SecretBox, _StoreSide]:
    """A state directory with its CA (sealed files to re-seal), the box a
    process opened from it, and the store's side of the key ring."""
    home = _home(tmp_path)
    box = keyring.open_box(home)
    pki.ensure_pki(home, box, ())
    return home, box, _StoreSide(box)


def test_a_running_gateway_reports_its_keys_follows_the_active_one_and_reseals_its_files(
    tmp_path: Path,
) -> None:
    home, box, store = _running(tmp_path)
    # A key copied here while the gateway runs: reported with its key id, not
    # used before the store says so.
    keyring.stage_key(home, active=1, known=1)
    assert keyring.refresh(home, box, store, "gw-a") == 1
    ids = SecretBox.from_ring(keyring.load_ring(home), active=1)
    assert store.reported == {"gw-a": {1: ids.key_id(1), 2: ids.key_id(2)}}
    assert set(keyring.sealed_file_versions(home).values()) == {1}
    # Version 2 active in the store: followed, remembered for the next start,
    # and this host's sealed files re-sealed under it.
    store.active = 2
    assert keyring.refresh(home, box, store, "gw-a") == 2
    assert box.active_version == 2
    assert keyring.open_box(home).active_version == 2
    assert set(keyring.sealed_file_versions(home).values()) == {2}
    pki.load_pki(home, SecretBox.from_ring({2: keyring.load_ring(home)[2]}, active=2))
    # Version 1 retired here: no longer reported, no longer held.
    keyring.retire_key(home, 1, active=2)
    keyring.refresh(home, box, store, "gw-a")
    assert store.reported == {"gw-a": {2: ids.key_id(2)}}
    assert box.versions == (2,)


def test_a_helper_process_follows_the_active_version_but_neither_reports_nor_reseals(
    tmp_path: Path,
) -> None:
    home, box, store = _running(tmp_path)
    keyring.stage_key(home, active=1, known=1)
    store.active = 2
    assert keyring.follow(home, box, store) == 2
    assert (box.active_version, box.versions) == (2, (1, 2))
    assert store.reported == {}
    assert set(keyring.sealed_file_versions(home).values()) == {1}
