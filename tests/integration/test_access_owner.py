"""A grant's port is its owner's alone: real daemon, real PostgreSQL 15, and a
second OS user created for the test (``useradd``, removed at the end) whose
clients run through ``runuser``.

The daemon and the `pam db access` processes run as this test's user (root in
CI), so root owns every grant here; the second user's psql is refused with
FATAL 28000 naming both uids, its refusal is recorded, its CancelRequest (even
with the right key) is dropped, and it cannot reach a ``--socket`` grant.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from harness import (
    STARTUP_TIMEOUT,
    AccessProcess,
    Gateway,
    RawClient,
    assert_one_error_line,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates an OS user: needs root"),
    pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux /proc/net/tcp"),
]

#: A stdlib-only frontend for the second user (who cannot read this venv): sends
#: a StartupMessage (or a CancelRequest) and prints the answer as one JSON line.
FOREIGN_CLIENT = r"""
import json, socket, struct, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sock = socket.create_connection((host, port), timeout=60)
if mode == "cancel":
    pid, secret = int(sys.argv[4]), bytes.fromhex(sys.argv[5])
    sock.sendall(struct.pack("!III", 16, 80877102, pid) + secret)
    print(json.dumps({"reply": sock.recv(1).hex()}))
    sys.exit()
params = b"user\0" + sys.argv[4].encode() + b"\0database\0" + sys.argv[5].encode() + b"\0\0"
sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
data = b""
while chunk := sock.recv(65536):
    data += chunk
fields = {}
if data[:1] == b"E":
    for item in data[5:].split(b"\0"):
        if item:
            fields[chr(item[0])] = item[1:].decode()
print(json.dumps({"type": data[:1].decode(), "fields": fields}))
"""


@pytest.fixture(scope="module")
def other_user() -> Iterator[str]:
    name = f"pamt{secrets.token_hex(3)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    return shared_gateway


def uid_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def as_user(user: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *args],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        cwd="/",
    )


def foreign(user: str, *args: str) -> dict[str, object]:
    result = as_user(user, "/usr/bin/python3", "-c", FOREIGN_CLIENT, *args)
    assert result.returncode == 0, result.stderr
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def owner_message(other_uid: int) -> str:
    return (
        "connection refused: this pam grant's port accepts connections only from OS user"
        f" root (uid 0); the connecting process runs as uid {other_uid}"
    )


def test_the_owner_connects_with_psql_and_psycopg(gateway: Gateway) -> None:
    access = gateway.access().wait_ready()
    result = subprocess.run(
        ["psql", access.url, "-X", "-At", "-c", "select current_user"],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "app_scram"), result.stderr
    with psycopg.connect(access.dsn()) as conn:
        assert conn.execute("select 42").fetchone() == (42,)


def test_another_os_user_is_refused_with_28000_and_the_reason(
    gateway: Gateway, other_user: str
) -> None:
    access = gateway.access().wait_ready()
    other_uid = uid_of(other_user)
    answer = foreign(other_user, "startup", "127.0.0.1", str(access.port), access.user, "appdb")
    assert answer["type"] == "E"
    fields = answer["fields"]
    assert isinstance(fields, dict)
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28000", owner_message(other_uid))
    assert fields["H"] == (
        "connect as OS user root, or open a grant of your own with `pam db access`"
    )
    # psql, through an SSLRequest answered with TLS, gets the same FATAL.
    dsn = f"host=127.0.0.1 port={access.port} user={access.user} dbname=appdb sslmode=prefer"
    result = as_user(other_user, "psql", dsn, "-X", "-At", "-c", "select 1")
    assert result.returncode == 2
    assert owner_message(other_uid) in result.stderr
    # Every refusal is in the session's record (psql's sslmode=prefer tries
    # again without TLS after a FATAL: two of them), and the owner still gets in.
    detail = wait_for(lambda: _refused(gateway, access, 3))
    assert {c["error_message"] for c in detail} == {owner_message(other_uid)}
    with psycopg.connect(access.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def _refused(gateway: Gateway, access: AccessProcess, count: int) -> list[dict] | None:
    connections = gateway.cli_json("sessions", "show", access.session_prefix)["connections"]
    refused = [c for c in connections if c["error_sqlstate"] == "28000"]
    return refused if len(refused) == count else None


def test_another_os_user_cannot_cancel_even_with_the_key(gateway: Gateway, other_user: str) -> None:
    access = gateway.access().wait_ready()
    with RawClient(access.port) as owner:
        greeting = owner.startup(access.user, access.database)
        key = next(m for m in greeting if m.type == ord("K")).body
        pid = int.from_bytes(key[:4], "big")
        owner.send(_query("select pg_sleep(600)"))
        wait_for(lambda: _backend_state(access, pid) == "active")
        answer = foreign(
            other_user, "cancel", "127.0.0.1", str(access.port), str(pid), key[4:].hex()
        )
        assert answer == {"reply": ""}  # closed without a word, as PostgreSQL does
        wait_for(lambda: _logged(gateway, "cancel_refused"))
        assert _backend_state(access, pid) == "active"
        # The owner's own cancel with the same key goes through. Like libpq it
        # holds its socket until the gateway closes it: a client gone before
        # its owner is looked up has no owner any more, and is refused.
        with RawClient(access.port) as canceller:
            canceller.send(_cancel_request(key))
            assert canceller.recv_raw() == b""
        errors = [m for m in owner.read_until(b"Z") if m.type == ord("E")]
        assert b"C57014" in errors[0].body


def _query(sql: str) -> bytes:
    from gateway.protocol import messages

    return messages.encode_message(ord("Q"), sql.encode() + b"\x00")


def _cancel_request(key: bytes) -> bytes:
    import struct

    return struct.pack("!III", 16, 80877102, int.from_bytes(key[:4], "big")) + key[4:]


def _backend_state(access: AccessProcess, pid: int) -> str:
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        row = conn.execute("select state from pg_stat_activity where pid = %s", (pid,)).fetchone()
    return str(row[0]) if row else ""


def _logged(gateway: Gateway, event: str) -> bool:
    return any(e.get("event") == event for e in gateway.log_events())


# --- --socket -------------------------------------------------------------------------

SOCKET_URL = re.compile(r"postgresql://(?P<user>[^@\s]+)@/(?P<db>[^?\s]+)\?host=\S+&port=\d+")


def socket_access(gateway: Gateway, directory: Path, port: int) -> AccessProcess:
    access = gateway.access("--socket", str(directory), "--port", str(port))
    wait_for(lambda: SOCKET_URL.search(access.stdout.text()) or access.proc.poll() is not None)
    match = SOCKET_URL.search(access.stdout.text())
    assert match, (access.stdout.text(), access.stderr.text())
    access.url, access.user, access.database = match[0], match["user"], match["db"]
    access.session_prefix = re.search(r"session ([0-9a-f]{8})", access.stdout.text())[1]
    return access


@pytest.fixture
def socket_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pg"
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)
    return directory


def test_a_socket_grant_serves_psql_psycopg_and_cancel(
    gateway: Gateway, socket_dir: Path, other_user: str
) -> None:
    access = socket_access(gateway, socket_dir, 6543)
    text = access.stdout.text()
    path = socket_dir / ".s.PGSQL.6543"
    assert f"?host={quote(str(socket_dir), safe='')}&port=6543" in access.url
    assert f'psql "{access.url}"' in text
    assert "socketFactory=org.newsclub.net.unix.AFUNIXSocketFactory$FactoryArg" in text
    assert f"socketFactoryArg={quote(str(path), safe='')}" in text
    assert "junixsocket" in text
    assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o600
    result = subprocess.run(
        ["psql", access.url, "-X", "-At", "-c", "select current_user"],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "app_scram"), result.stderr
    conn = psycopg.connect(host=str(socket_dir), port=6543, user=access.user, dbname="appdb")
    failure: list[BaseException] = []

    def sleep() -> None:
        try:
            conn.execute("select pg_sleep(600)")
        except BaseException as exc:
            failure.append(exc)

    sleeper = threading.Thread(target=sleep)
    sleeper.start()
    pid = conn.info.backend_pid
    with psycopg.connect(host=str(socket_dir), port=6543, user=access.user, dbname="appdb") as a:
        wait_for(
            lambda: (
                a.execute("select state from pg_stat_activity where pid = %s", (pid,)).fetchone()[0]
                == "active"
            )
        )
    conn.cancel()
    sleeper.join(STARTUP_TIMEOUT)
    assert isinstance(failure[0], psycopg.errors.QueryCanceled)
    conn.rollback()
    assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)
    conn.close()
    # Another OS user cannot even reach the socket (its directory is 0700).
    other = as_user(other_user, "psql", f"host={socket_dir} port=6543 dbname=appdb", "-X")
    assert other.returncode == 2 and "Permission denied" in other.stderr, other.stderr
    assert access.stop(signal.SIGINT) == 0
    assert not path.exists()


def test_a_socket_directory_is_created_0700_when_missing(gateway: Gateway, tmp_path: Path) -> None:
    directory = tmp_path / "new"
    access = socket_access(gateway, directory, 5432)
    assert stat.S_IMODE(directory.lstat().st_mode) == 0o700
    with psycopg.connect(host=str(directory), user=access.user, dbname="appdb") as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("mode", "has mode 0755; it must be 0700 so that no other OS user can reach the socket"),
        ("owner", "belongs to uid {uid}, not to the OS user asking for access (uid 0)"),
        ("symlink", "is not a directory (a symbolic link is refused)"),
        ("in_use", "cannot listen on {dir}/.s.PGSQL.5432:"),
    ],
)
def test_an_unfit_socket_directory_is_refused_in_one_line(
    gateway: Gateway, socket_dir: Path, other_user: str, setup: str, expected: str
) -> None:
    target = socket_dir
    if setup == "mode":
        socket_dir.chmod(0o755)
    elif setup == "owner":
        os.chown(socket_dir, uid_of(other_user), -1)
    elif setup == "symlink":
        target = socket_dir.parent / "link"
        target.symlink_to(socket_dir)
    else:
        (socket_dir / ".s.PGSQL.5432").write_text("not a socket")
    result = gateway.cli(
        "db",
        "access",
        "--resource",
        "prod",
        "--account",
        "scram",
        "--socket",
        str(target),
        check=False,
    )
    line = assert_one_error_line(result)
    assert expected.format(uid=uid_of(other_user), dir=socket_dir) in line
