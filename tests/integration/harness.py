"""A real gateway daemon and real `pam` CLI processes, for integration tests.

Everything runs as separate processes, exactly as a user runs them: the daemon
is ``python -m cli gateway run`` on a temporary state directory, and every CLI
call is ``python -m cli ...`` with ``PAM_HOME``/``PAM_CONFIG`` pointing at it.
All output of every process is kept so tests can search it (for example for a
password that must never appear).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from cli.client import ApiClient, ApiError
from cli.forwarder import Forwarder, TunnelTarget
from gateway.config import MASTER_KEY_FILE, load_client_config, load_settings, store_url
from gateway.credentials import pki
from gateway.credentials.secretbox import SecretBox, load_master_key
from gateway.store import Store
from gateway.testing.net import child_pids, free_port
from gateway.testing.pgcluster import TempCluster
from gateway.testing.pgconf import sql_ident, sql_literal

STARTUP_TIMEOUT = 30.0
URL_PATTERN = re.compile(
    r"postgresql://(?P<user>[^@\s]+)@127\.0\.0\.1:(?P<port>\d+)/(?P<db>[^?\s]+)\?sslmode=disable"
)


@dataclass
class Transcript:
    """Everything the processes of one test printed, for leak checks."""

    chunks: list[bytes] = field(default_factory=list)

    def add(self, data: bytes | str) -> None:
        self.chunks.append(data.encode() if isinstance(data, str) else data)

    def text(self) -> bytes:
        return b"\n".join(self.chunks)


class _Drain(threading.Thread):
    """Copies a process pipe into a buffer as it comes, so pipes never fill."""

    def __init__(self, stream: Any, transcript: Transcript) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.buffer = bytearray()
        self.transcript = transcript
        self.lock = threading.Lock()
        self.start()

    def run(self) -> None:
        with self.stream:
            for line in iter(self.stream.readline, b""):
                with self.lock:
                    self.buffer += line
        self.transcript.add(bytes(self.buffer))

    def text(self) -> str:
        with self.lock:
            return self.buffer.decode(errors="replace")


@dataclass
class AccessProcess:
    """A running `pam db access` command."""

    proc: subprocess.Popen[bytes]
    stdout: _Drain
    stderr: _Drain
    url: str = ""
    port: int = 0
    user: str = ""
    database: str = ""
    session_prefix: str = ""

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> AccessProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = URL_PATTERN.search(self.stdout.text())
            if match:
                self.url = match.group(0)
                self.port = int(match["port"])
                self.user = match["user"]
                self.database = match["db"]
                session = re.search(r"session ([0-9a-f]{8})", self.stdout.text())
                self.session_prefix = session.group(1) if session else ""
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"pam db access did not print a URL; stdout={self.stdout.text()!r}"
            f" stderr={self.stderr.text()!r}"
        )

    def dsn(self, **overrides: str) -> str:
        params = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "user": self.user,
            "dbname": self.database,
            "sslmode": "disable",
        }
        params.update(overrides)
        return " ".join(f"{k}={v}" for k, v in params.items())

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self.stdout.join(5)
        self.stderr.join(5)
        return code


@dataclass
class Gateway:
    """A gateway daemon on a temporary state directory, driven through the CLI."""

    root: Path
    transcript: Transcript = field(default_factory=Transcript)
    proc: subprocess.Popen[bytes] | None = None
    _drains: list[_Drain] = field(default_factory=list)
    accesses: list[AccessProcess] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def config_path(self) -> Path:
        return self.root / "client.json"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGPASSWORD", "PAM_"))}
        env.update(
            {
                "PAM_HOME": str(self.home),
                "PAM_CONFIG": str(self.config_path),
                "PYTHONUNBUFFERED": "1",
                "COLUMNS": "200",
            }
        )
        return env

    def cli(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        self.transcript.add(result.stdout)
        self.transcript.add(result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"pam {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def init(self) -> None:
        self.cli("gateway", "init", "--api-port", str(free_port()))

    def start(
        self,
        *,
        own_process_group: bool = False,
        extra_env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        """Start the daemon; *own_process_group* puts it (and its children) in a
        process group of its own, as a terminal or a service manager would;
        *extra_env* is added to its environment (test hooks); *args* are more
        options of `pam gateway run`."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "gateway", "run", "--log-format", "json", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**self.env, **(extra_env or {})},
            start_new_session=own_process_group,
        )
        self._drains = [
            _Drain(self.proc.stdout, self.transcript),
            _Drain(self.proc.stderr, self.transcript),
        ]
        deadline = time.monotonic() + STARTUP_TIMEOUT
        client = self.api()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"gateway exited during start-up: {self.log()}")
                try:
                    client.get("/v1/health")
                    return
                except ApiError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            client.close()

    def api(self) -> ApiClient:
        old = os.environ.get("PAM_CONFIG")
        os.environ["PAM_CONFIG"] = str(self.config_path)
        try:
            return ApiClient(load_client_config(), timeout=30)
        finally:
            if old is None:
                os.environ.pop("PAM_CONFIG")
            else:
                os.environ["PAM_CONFIG"] = old

    def log(self) -> str:
        return "".join(d.text() for d in self._drains)

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        for drain in self._drains:
            drain.join(5)
        return code

    def access(
        self, *args: str, resource: str = "prod", account: str = "scram", duration: str = "1h"
    ) -> AccessProcess:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "db",
                "access",
                "--resource",
                resource,
                "--account",
                account,
                "--duration",
                duration,
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        access = AccessProcess(
            proc, _Drain(proc.stdout, self.transcript), _Drain(proc.stderr, self.transcript)
        )
        self.accesses.append(access)
        return access

    def close(self) -> None:
        for access in self.accesses:
            if access.proc.poll() is None:
                access.proc.kill()
                access.wait()
        self.stop()


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it is truthy: a bounded wait, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def cut_error(client: psycopg.Connection[Any]) -> psycopg.Error | None:
    """The error a psycopg connection's next statement gets, or None while it
    works (poll it with :func:`wait_for`)."""
    try:
        client.execute("select 1")
    except psycopg.Error as exc:
        return exc
    time.sleep(0.05)
    return None


@dataclass(frozen=True)
class ServerError:
    sqlstate: str
    severity: str
    message: str
    hint: str | None


def connect_error(port: int, user: str, database: str, timeout: float = 60.0) -> ServerError:
    """Connect with asyncpg (which keeps the SQLSTATE of a refused login, unlike
    libpq) and return the ErrorResponse that refused it."""
    import asyncio

    import asyncpg

    async def attempt() -> ServerError:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user=user,
                database=database,
                ssl=False,
                timeout=timeout,
            )
        except asyncpg.PostgresError as exc:
            return ServerError(exc.sqlstate, exc.severity, exc.message, exc.hint)
        await conn.close()
        raise AssertionError("the connection was accepted")

    return asyncio.run(attempt())


class RawClient:
    """A hand-driven frontend over a plain socket, built on the sans-IO codec,
    for the protocol cases no real client produces (grease, bad input, 3.2)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        from gateway.protocol.framing import MessageReader

        self.reader = MessageReader(max_length=1 << 30)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self, size: int = 65536) -> bytes:
        return self.sock.recv(size)

    def read_message(self) -> Any:
        """The next whole message; None when the gateway closed the connection."""
        while True:
            message = self.reader.next_message()
            if message is not None:
                return message
            data = self.sock.recv(262144)
            if not data:
                return None
            self.reader.feed(data)

    def read_until(self, msg_type: bytes) -> list[Any]:
        messages = []
        while True:
            message = self.read_message()
            if message is None:
                raise AssertionError(f"connection closed before {msg_type!r}; got {messages}")
            messages.append(message)
            if message.type == msg_type[0]:
                return messages

    def read_all_until_close(self) -> list[Any]:
        messages = []
        while (message := self.read_message()) is not None:
            messages.append(message)
        return messages

    def startup(
        self, user: str, database: str, *, version: int | None = None, **params: str
    ) -> list[Any]:
        from gateway.protocol import messages
        from gateway.protocol.constants import PROTOCOL_3_0

        self.send(
            messages.startup_message(
                {"user": user, "database": database, **params}, version or PROTOCOL_3_0
            )
        )
        return self.read_until(b"Z")

    def query(self, sql: str) -> list[Any]:
        from gateway.protocol import messages

        self.send(messages.encode_message(ord("Q"), sql.encode() + b"\x00"))
        return self.read_until(b"Z")


def error_fields(message: Any) -> dict[str, str]:
    from gateway.protocol.messages import parse_error_fields

    assert message is not None and message.type == ord("E"), message
    return dict(parse_error_fields(message.body).fields)


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def current_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def run_json_check(
    gateway: Gateway,
    check: str,
    args: list[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run a client check program that prints exactly one JSON line; a failure
    shows its output and the gateway's log."""
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, encoding="utf-8", timeout=timeout
    )
    assert result.returncode == 0, (
        f"{check} exited {result.returncode}\nstdout: {result.stdout}\n"
        f"stderr: {result.stderr}\ngateway log:\n{gateway.log()}"
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    parsed: dict[str, Any] = json.loads(lines[0])
    return parsed


def store_path(gateway: Gateway) -> Path:
    """The daemon's SQLite store (the embedded default)."""
    return gateway.home / "pam.db"


def edit_store(gateway: Gateway, *sql: str) -> None:
    """Run statements on the daemon's SQLite store with the sqlite3 module, as a
    person with write access to the file would."""
    with sqlite3.connect(store_path(gateway), timeout=STARTUP_TIMEOUT) as db:
        for statement in sql:
            db.execute(statement)
    db.close()


def audit_sink_pid(gateway: Gateway) -> int:
    """The daemon's audit writer process."""
    assert gateway.proc is not None
    for child in child_pids(gateway.proc.pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"gateway.app.audit_process" in cmdline:
            return child
    raise AssertionError("the daemon has no audit writer process")


def write_settings(gw: Gateway, settings: Mapping[str, Any]) -> None:
    """*settings* merged into the daemon settings file of *gw*'s state directory."""
    path = gw.home / "gateway.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**current, **settings}))


def open_store(gw: Gateway) -> Store:
    """The store as someone holding the gateway host's master key could open it."""
    box = SecretBox(load_master_key(gw.home / MASTER_KEY_FILE))
    return Store.open(store_url(gw.home, load_settings(gw.home)), box)


def gateway_id(gw: Gateway) -> str:
    """The id *gw*'s settings give it (its presence lease, its sessions' ``gateway_id``)."""
    return load_settings(gw.home).gateway_id


#: presence renewed every half second, gone after two: a gateway that stops is
#: soon known to be gone by the others on its store
FAST_PRESENCE: Mapping[str, Any] = {"presence_renew_seconds": 0.5, "presence_lease_seconds": 2.0}

_Gateways = TypeVar("_Gateways", bound=Sequence[Gateway])


@contextlib.contextmanager
def closed_after(gateways: _Gateways) -> Iterator[_Gateways]:
    """*gateways*, each closed (stopped if started) when the block ends, however it ends."""
    try:
        yield gateways
    finally:
        for gw in gateways:
            gw.close()


def shared_store_pair(
    pg: TempCluster, tmp_path: Path, settings: Mapping[str, Any]
) -> tuple[Gateway, Gateway]:
    """:func:`shared_store_fleet` of two."""
    first, second = shared_store_fleet(pg, tmp_path, settings, 2)
    return first, second


#: the files of the gateway CA and its server certificate (docs/operations.md,
#: "Adding a gateway": copied to share the CA)
CA_FILES = (
    "gateway-ca.crt",
    "gateway-ca.key.sealed",
    "gateway-server.crt",
    "gateway-server.key.sealed",
)
#: the admin each gateway after the first makes at its init (the first's is the OS user)
FLEET_ADMINS = ("second-admin", "third-admin", "fourth-admin")


def shared_store_fleet(
    pg: TempCluster, tmp_path: Path, settings: Mapping[str, Any], count: int
) -> list[Gateway]:
    """*count* daemons' state directories (not started) on one PostgreSQL store,
    a fresh database of *pg*, with *settings*, as docs/operations.md adds a
    gateway: each after the first has the first's master key (the store's
    secrets are sealed with it) and CA (so a grant's client certificate is good
    at any of them), and an admin of its own (``FLEET_ADMINS``)."""
    database = unique("pam_store")
    pg.create_database(database)
    url = pg.superuser_dsn(database)
    fleet = [Gateway(tmp_path / name) for name in "abcd"[:count]]
    for gw in fleet:
        gw.home.mkdir(parents=True, mode=0o700)
        write_settings(gw, {**settings, "store_url": url})
    first = fleet[0]
    first.cli("gateway", "init", "--force", "--api-port", str(free_port()))
    ca_pem = (first.home / CA_FILES[0]).read_text()
    for gw, admin in zip(fleet[1:], FLEET_ADMINS, strict=False):
        shutil.copy2(first.home / MASTER_KEY_FILE, gw.home / MASTER_KEY_FILE)
        gw.cli("gateway", "init", "--force", "--api-port", str(free_port()), "--admin", admin)
        for name in CA_FILES:
            shutil.copy2(first.home / name, gw.home / name)
        config = json.loads(gw.config_path.read_text())
        gw.config_path.write_text(json.dumps({**config, "ca_cert": ca_pem}))
    return fleet


def make_login_role(pg: TempCluster, prefix: str, database: str) -> tuple[str, str]:
    """A new login role of *pg* that may connect to *database*: its name and password."""
    name, password = unique(prefix), "typed-" + os.urandom(9).hex()
    pg.admin_sql(
        f"CREATE ROLE {sql_ident(name)} LOGIN PASSWORD {sql_literal(password)};\n"
        f"GRANT CONNECT ON DATABASE {database} TO {sql_ident(name)};",
        redact=[password],
    )
    return name, password


def add_verified_resource(gw: Gateway, pg: TempCluster, name: str, database: str) -> None:
    """Resource *name*: *database* of *pg*, over TLS with its certificate verified."""
    with gw.api() as api:
        api.post(
            "/v1/resources",
            {
                "name": name,
                "host": pg.host,
                "port": pg.port,
                "database": database,
                "ssl_mode": "verify-full",
                "ca_cert": pg.ca_cert_path.read_text(),
            },
        )


def add_target(gw: Gateway, pg: TempCluster, name: str, database: str, role_prefix: str) -> None:
    """Resource *name* (*database* of *pg*, :func:`add_verified_resource`) with
    account ``scram``: a new login role (:func:`make_login_role`, named from
    *role_prefix*) whose password is given on stdin, as an operator types it."""
    role, password = make_login_role(pg, role_prefix, database)
    add_verified_resource(gw, pg, name, database)
    gw.cli(
        "account", "add", name, "scram", "--username", role, "--password-stdin",
        input=password + "\n",
    )  # fmt: skip


def unique(prefix: str) -> str:
    """A role or object name no other test uses (the cluster lives for the whole run)."""
    return f"{prefix}_{secrets.token_hex(4)}"


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The CLI failed with ``code`` and said why in exactly one line on stderr."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def psql(access: AccessProcess, *commands: str) -> subprocess.CompletedProcess[str]:
    """psql through an access session, one ``-c`` per command, unaligned, errors not fatal."""
    args = ["psql", access.url, "-X", "-At", "-v", "ON_ERROR_STOP=0"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, timeout=STARTUP_TIMEOUT)


def forward_tunnel(
    made: list[Forwarder],
    cert_pem: bytes,
    key: pki.ec.EllipticCurvePrivateKey,
    ca_pem: bytes,
    port: int,
) -> int:
    """A forwarder, as `pam db access --tunnel` runs one, to the tunnel on
    127.0.0.1:*port* presenting *cert_pem*; its local port. It goes in *made*
    (the ``forwarders`` fixture stops them)."""
    target = TunnelTarget(
        "127.0.0.1", port, pki.tunnel_client_context(cert_pem, key, ca_pem), "localhost"
    )
    forwarder = Forwarder(target)
    made.append(forwarder)
    return forwarder.start()
