"""Secrets at rest and in output: passwords never leak, the master key is guarded,
and a damaged ciphertext is refused with an ErrorResponse, not a crash.

Real daemon and CLI processes, a real PostgreSQL 15, psql and asyncpg clients.
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
import sqlite3
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Gateway, connect_error

from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration

RESOURCE = "prod"
DATABASE = "appdb"


@dataclass(frozen=True)
class Role:
    account: str
    username: str
    password: str


def distinctive_password(kind: str) -> str:
    # Non-ASCII letters make the UTF-8 form differ from any single-byte one, and
    # the random tail makes an accidental match impossible.
    return f"Leak-{kind}-Ünï€ode-{secrets.token_hex(12)}"


def encodings(password: str) -> dict[str, bytes]:
    """Every form in which a leaked password would be recognisable."""
    utf8 = password.encode()
    return {
        "utf-8": utf8,
        "base64": base64.b64encode(utf8),
        "base64url": base64.urlsafe_b64encode(utf8).rstrip(b"="),
        "json-escaped": json.dumps(password)[1:-1].encode(),
        "random tail": password.rsplit("-", 1)[1].encode(),
    }


def leaks(blob: bytes, passwords: list[str]) -> list[str]:
    return [
        f"{password!r} as {form}"
        for password in passwords
        for form, needle in encodings(password).items()
        if needle in blob
    ]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def psql(url: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["psql", url, "-X", "-At"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def create_roles(pg: TempCluster) -> dict[str, Role]:
    tag = secrets.token_hex(4)
    roles = {
        "scram": Role("scram", f"leak_scram_{tag}", distinctive_password("scram")),
        "md5": Role("md5", f"md5_leak_{tag}", distinctive_password("md5")),
        "plain": Role("plain", f"plain_leak_{tag}", distinctive_password("plain")),
    }
    for key, role in roles.items():
        pg.create_role(
            role.username, role.password, method="md5" if key == "md5" else "scram-sha-256"
        )
    names = ", ".join(f'"{role.username}"' for role in roles.values())
    pg.admin_sql(f"GRANT CONNECT ON DATABASE {DATABASE} TO {names};")
    return roles


@pytest.mark.timeout(300)
def test_no_password_appears_in_any_state_file_or_any_output(
    pg: TempCluster, tmp_path: Path
) -> None:
    roles = create_roles(pg)
    wrong_password = distinctive_password("wrong")
    rotated_password = distinctive_password("rotated")
    passwords = [role.password for role in roles.values()] + [wrong_password, rotated_password]
    gateway = Gateway(tmp_path)
    try:
        gateway.init()
        gateway.start()
        gateway.cli(
            "resource",
            "add",
            RESOURCE,
            "--host",
            pg.host,
            "--port",
            str(pg.port),
            "--database",
            DATABASE,
            "--ssl-mode",
            "verify-full",
            "--ca-cert",
            str(pg.ca_cert_path),
        )
        for role in roles.values():
            gateway.cli(
                "account",
                "add",
                RESOURCE,
                role.account,
                "--username",
                role.username,
                "--password-stdin",
                input=role.password + "\n",
            )
        gateway.cli(
            "account",
            "add",
            RESOURCE,
            "wrong",
            "--username",
            roles["scram"].username,
            "--password-stdin",
            "--no-verify",
            input=wrong_password + "\n",
        )
        pg.admin_sql(
            f"ALTER ROLE \"{roles['scram'].username}\" PASSWORD '{rotated_password}';",
            redact=[rotated_password],
        )
        gateway.cli(
            "account",
            "rotate",
            RESOURCE,
            "scram",
            "--password-stdin",
            input=rotated_password + "\n",
        )

        for role in roles.values():
            access = gateway.access(account=role.account).wait_ready()
            result = psql(access.url, "select current_user", "select 6 * 7")
            gateway.transcript.add(result.stdout + result.stderr)
            assert result.stdout.splitlines() == [role.username, "42"], result.stderr
            assert access.stop(signal.SIGINT) == 0

        access = gateway.access(account="wrong").wait_ready()
        refused = psql(access.url, "select 1")
        gateway.transcript.add(refused.stdout + refused.stderr)
        error = connect_error(access.port, roles["scram"].username, DATABASE)
        gateway.transcript.add(f"{error}")
        assert access.stop(signal.SIGINT) == 0
        assert refused.returncode == 2
        assert error.sqlstate == "28P01"

        verify = gateway.cli("resource", "verify", RESOURCE, "--json", check=False)
        assert verify.returncode == 1
        assert [(r["account"], r["ok"]) for r in json.loads(verify.stdout)] == [
            ("md5", True),
            ("plain", True),
            ("scram", True),
            ("wrong", False),
        ]
        listed = gateway.cli_json("sessions", "list")
        assert len(listed) == 4
        for session in listed:
            gateway.cli_json("sessions", "show", session["id"])
        gateway.cli("sessions", "list")
        gateway.cli("account", "list")
        gateway.cli("resource", "show", RESOURCE)

        assert gateway.stop(signal.SIGTERM) == 0
        gateway.start()
        access = gateway.access(account="scram").wait_ready()
        after_restart = psql(access.url, "select 'after restart'")
        gateway.transcript.add(after_restart.stdout + after_restart.stderr)
        assert after_restart.stdout == "after restart\n", after_restart.stderr

        # While the daemon runs, SQLite keeps recent writes in -wal and -shm.
        running = files_under(tmp_path)
        assert {Path(name).name for name in running} >= {"pam.db", "pam.db-wal", "pam.db-shm"}
        assert access.stop(signal.SIGINT) == 0
    finally:
        gateway.close()

    stopped = files_under(tmp_path)
    found = {
        name: leaked
        for name, data in [
            *running.items(),
            *stopped.items(),
            ("output", gateway.transcript.text()),
        ]
        if (leaked := leaks(data, passwords))
    }
    assert found == {}
    # The searches can find what they look for: the transcript holds the
    # account names and the psql output.
    assert b"after restart" in gateway.transcript.text()
    assert roles["md5"].username.encode() in gateway.transcript.text()


def test_the_api_token_and_the_master_key_stay_in_their_own_files(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    assert psql(access.url, "select 1").stdout == "1\n"
    assert access.stop() == 0
    token = json.loads(gateway.config_path.read_text())["token"].encode()
    key_text = (gateway.home / "master.key").read_bytes().strip()
    key = base64.b64decode(key_text)
    gateway.stop()

    assert token not in gateway.transcript.text()
    assert key_text not in gateway.transcript.text()
    assert key not in gateway.transcript.text()
    wanted = (("token", token), ("key", key_text), ("raw key", key))
    holders = {
        name: [label for label, secret in wanted if secret in data]
        for name, data in files_under(gateway.root).items()
    }
    assert {name: found for name, found in holders.items() if found} == {
        str(gateway.config_path): ["token"],
        str(gateway.home / "master.key"): ["key"],
    }


def test_the_master_key_is_32_random_bytes_in_a_file_only_its_owner_can_read(
    gateway: Gateway, tmp_path: Path
) -> None:
    key_path = gateway.home / "master.key"
    other = Gateway(tmp_path / "other")
    other.init()

    mode = stat.S_IMODE(key_path.stat().st_mode)
    key = base64.b64decode(key_path.read_bytes().strip(), validate=True)
    other_key = base64.b64decode((other.home / "master.key").read_bytes().strip(), validate=True)
    assert mode == 0o600
    assert len(key) == 32
    assert key != other_key
    assert len(set(key)) > 8  # not a constant or a short repeated pattern


def corrupt_ciphertext(home: Path, account: str) -> None:
    """Flip one bit inside an account's sealed password, behind the daemon's back."""
    with sqlite3.connect(home / "pam.db", timeout=30) as db:
        account_id, sealed = db.execute(
            "select a.id, a.password_ciphertext from accounts a"
            " join resources r on r.id = a.resource_id where r.name = ? and a.name = ?",
            (RESOURCE, account),
        ).fetchone()
        damaged = bytearray(sealed)
        damaged[len(damaged) // 2] ^= 0x01
        db.execute(
            "update accounts set password_ciphertext = ? where id = ?", (bytes(damaged), account_id)
        )
    db.close()


@pytest.mark.timeout(180)
def test_a_damaged_ciphertext_refuses_the_connection_with_an_error_response(
    gateway: Gateway,
) -> None:
    corrupt_ciphertext(gateway.home, "md5")
    access = gateway.access(account="md5").wait_ready()

    error = connect_error(access.port, "md5_app", DATABASE)
    by_psql = psql(access.url, "select 1")

    message = (
        "cannot decrypt the password of account 'md5' on resource 'prod': cannot decrypt"
        " secret: wrong master key, or the stored value was altered or belongs to another record"
    )
    hint = (
        "check that the gateway uses the master key the password was stored with,"
        " or set the password again"
    )
    assert (error.severity, error.sqlstate, error.message, error.hint) == (
        "FATAL",
        "XX000",
        message,
        hint,
    )
    assert by_psql.returncode == 2
    assert f"FATAL:  {message}" in by_psql.stderr
    # The daemon is unharmed: the same session answers again, and other
    # accounts still work.
    assert connect_error(access.port, "md5_app", DATABASE).sqlstate == "XX000"
    assert access.stop() == 0
    healthy = gateway.access(account="scram").wait_ready()
    assert psql(healthy.url, "select 'still serving'").stdout == "still serving\n"
    assert healthy.stop() == 0
    connections = gateway.cli_json("sessions", "show", access.session_prefix)["connections"]
    assert [(c["end_reason"], c["error_sqlstate"], c["error_message"]) for c in connections] == [
        ("error", "XX000", message)
    ] * 3
    verify = gateway.cli("resource", "verify", RESOURCE, "--account", "md5", check=False)
    assert verify.returncode == 1
    assert verify.stderr.splitlines() == [f"error: {message} (hint: {hint})"]
