"""Master key rotation with live sessions (issue 17, point 6): two real gateway
daemons on one PostgreSQL store, real psycopg clients through both for the
whole rotation, and ``pam gateway rotate-master-key`` run as an operator would.

Stage on A; activation is refused while B (live) lacks the new key; B picks the
copied key up without a restart; activation re-seals every secret; live
sessions carry on and new ones sign in upstream through both gateways; the old
key is retired on both, both restart without it, and everything still opens
(the account password upstream, the CA and server keys behind the API's TLS)
and every trail, written before, during and after, verifies. A gateway that is
down does not hold up the next rotation, and then cannot start until it has
the new key: it says which.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor.totp import TOTP
from harness import (
    FAST_PRESENCE,
    Gateway,
    add_target,
    assert_one_error_line,
    closed_after,
    gateway_id,
    shared_store_pair,
    wait_for,
)

from gateway.config import MASTER_KEY_FILE, load_settings, store_url
from gateway.credentials import keyring
from gateway.store import Store
from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration

RESOURCE = "prod"


@pytest.fixture
def pair(pg: TempCluster, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    with closed_after(shared_store_pair(pg, tmp_path, FAST_PRESENCE)) as gateways:
        yield gateways


def ring_store(gw: Gateway) -> Store:
    """The store as *gw*'s host opens it: with its key ring, whatever it holds."""
    return Store.open(store_url(gw.home, load_settings(gw.home)), keyring.open_box(gw.home))


def status(gw: Gateway) -> dict[str, Any]:
    result = gw.cli("gateway", "rotate-master-key", "--status", "--json")
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def holds(gw: Gateway, holder: Gateway, version: int) -> bool:
    """Whether *gw*'s store shows *holder* live and reporting *version*."""
    return version in (status(gw)["gateways"].get(gateway_id(holder)) or [])


def copy_key(source: Gateway, target: Gateway, version: int) -> None:
    """What the operator does: the staged key file, to the other state directory."""
    directory = target.home / keyring.KEYRING_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    shutil.copy2(keyring.key_path(source.home, version), keyring.key_path(target.home, version))


class Authenticator:
    """An authenticator app: a code for a time step after the last one used, at
    most one step ahead of now (inside the gateway's window)."""

    def __init__(self, secret: str) -> None:
        key = base64.b32decode(secret + "=" * (-len(secret) % 8))
        self._totp = TOTP(key, 6, SHA1(), 30)  # noqa: S303 (RFC 6238's HMAC, as the apps)
        self._last: int | None = None

    def code(self) -> str:
        now = int(time.time() // 30)
        step = now if self._last is None else max(now, self._last + 1)
        if step > now + 1:
            wait_for(lambda: time.time() // 30 >= step - 1, timeout=60)
        self._last = step
        return self._totp.generate(step * 30).decode()


def sign_in_and_query(gw: Gateway, tag: str, *args: str) -> psycopg.Connection[Any]:
    """A new grant through *gw* (`pam db access` with *args*): the gateway signs
    in upstream with the stored (sealed) password; a client connection that ran
    one statement."""
    access = gw.access(*args).wait_ready()
    client = psycopg.connect(access.dsn(), autocommit=True)
    assert client.execute(f"select '{tag}'").fetchone() == (tag,)
    return client


def test_rotation_with_live_sessions_through_two_gateways_retires_the_old_key(
    pair: tuple[Gateway, Gateway], pg: TempCluster
) -> None:
    a, b = pair
    a.start()
    b.start()
    add_target(a, pg, RESOURCE, APP_DATABASE, "rot")
    clients = [sign_in_and_query(a, "a-before")]
    try:
        clients.append(sign_in_and_query(b, "b-before"))
        # B's admin turns a second factor on (a TOTP secret sealed in the store):
        # its grants need a code from now on, which B checks against the secret.
        app = Authenticator(json.loads(b.cli("mfa", "enroll", "--json").stdout)["secret"])
        b.cli("mfa", "confirm", app.code())

        # 1. Stage on A: a file path, never the key.
        staged = a.cli("gateway", "rotate-master-key")
        path = keyring.key_path(a.home, 2)
        assert str(path) in staged.stdout
        key_text = path.read_text().strip()
        assert key_text not in staged.stdout + staged.stderr
        # Every form a key could take in a log line: the file's base64, and hex.
        key_forms = [
            form
            for text in (key_text, (a.home / MASTER_KEY_FILE).read_text().strip())
            for form in (text, base64.b64decode(text).hex())
        ]
        assert status(a)["active"] == 1
        # Idempotent: a second stage names the same version.
        assert "Already staged" in a.cli("gateway", "rotate-master-key", "--stage").stdout
        wait_for(lambda: holds(a, a, 2))

        # 2. Refused while B, live, lacks it: one line naming B.
        refused = a.cli("gateway", "rotate-master-key", "--activate", check=False)
        line = assert_one_error_line(refused)
        assert gateway_id(b) in line and gateway_id(a) not in line
        assert "version 2" in line
        assert status(a)["active"] == 1

        # 3. B picks the copied key up at its next renewal, no restart.
        copy_key(a, b, 2)
        wait_for(lambda: holds(a, b, 2))
        for n, client in enumerate(clients):
            assert client.execute(f"select {n}").fetchone() == (n,)

        # 4. Activate: every secret re-sealed; both gateways follow.
        activated = a.cli("gateway", "rotate-master-key", "--activate")
        assert "Master key version 2 is active" in activated.stdout
        assert key_text not in activated.stdout
        now = status(a)
        assert now["active"] == 2
        assert set(now["sealed"]) == {"2"}
        assert set(now["files"].values()) == {2}
        wait_for(lambda: set(keyring.sealed_file_versions(b.home).values()) == {2})
        # The live sessions keep working; new ones sign in upstream through both.
        for n, client in enumerate(clients):
            assert client.execute(f"select {n + 10}").fetchone() == (n + 10,)
        clients.append(sign_in_and_query(a, "a-after"))
        clients.append(sign_in_and_query(b, "b-after", "--otp", app.code()))
        # Again: nothing left to do.
        again = a.cli("gateway", "rotate-master-key", "--activate")
        assert "re-sealed 0 stored secret(s)" in again.stdout

        # 5. Retire version 1 on both.
        for gw in (a, b):
            gw.cli("gateway", "rotate-master-key", "--retire", "1")
            assert not (gw.home / MASTER_KEY_FILE).exists()
            assert sorted(keyring.load_ring(gw.home)) == [2]
    finally:
        for client in clients:
            client.close()

    # 6. Both restart without the old key: the API's TLS (server key), upstream
    # sign-in (the account password) and every trail.
    logs = [gw.log() for gw in (a, b)]  # (each start begins a new log)
    for gw in (a, b):
        for access in gw.accesses:
            access.stop()
        gw.stop()
    a.start()
    b.start()
    sign_in_and_query(a, "a-restarted").close()
    sign_in_and_query(b, "b-restarted", "--otp", app.code()).close()
    with ring_store(a) as store:
        sessions = store.list_sessions()
        assert len(sessions) == 6
        assert store.verify_audit() == []
    assert "audit trail intact" in a.cli("audit", "verify").stdout
    # No key, old or new, reached either gateway's log, through the rotation
    # (reports, re-sealing, following the active version) or since the restart.
    assert all("master_key_version_active" in log for log in logs)
    logs += [gw.log() for gw in (a, b)]
    assert not [form for form in key_forms for log in logs if form in log]


def test_a_gateway_that_is_down_does_not_block_activation_and_then_needs_the_key(
    pair: tuple[Gateway, Gateway],
) -> None:
    a, b = pair
    a.start()
    b.start(own_process_group=True)
    a.cli("gateway", "rotate-master-key")
    wait_for(lambda: holds(a, b, 1) and holds(a, a, 2))
    assert b.proc is not None
    os.killpg(b.proc.pid, signal.SIGKILL)
    b.stop()
    # B's lease lapses (2 s): it no longer counts.
    wait_for(lambda: gateway_id(b) not in status(a)["gateways"], timeout=60)
    a.cli("gateway", "rotate-master-key", "--activate")
    assert status(a)["active"] == 2

    # B cannot start without version 2, and says which file it needs.
    with pytest.raises(AssertionError, match="gateway exited during start-up"):
        b.start()
    assert "active master key is version 2" in b.log()
    assert "Traceback" not in b.log()
    copy_key(a, b, 2)
    b.start()
    wait_for(lambda: set(keyring.sealed_file_versions(b.home).values()) == {2})
    wait_for(lambda: holds(a, b, 2))
