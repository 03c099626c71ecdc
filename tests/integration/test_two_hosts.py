"""The gateway on one host, the engineer's CLI on another: two network namespaces.

The "gateway host" namespace runs a PostgreSQL 15 of its own (listening on its
loopback only) and the daemon (API and tunnel on the veth address); the
"laptop" namespace runs `pam login`, `pam db access` (the CLI's forwarder) and
the clients, with a HOME and client config of its own. Everything is a real
process; the two hosts share only the file system (the test reads the laptop's
files to show that no password is in them).

Needs root (``ip netns add``), as CI has. ``PAM_SLOW_TESTS=1`` adds the
10-minute ``pg_sleep`` through the tunnel.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import (
    AccessProcess,
    ServerError,
    Transcript,
    _Drain,
    wait_for,
)
from netns import GATEWAY_ADDRESS, LAPTOP_ADDRESS, Namespace, TwoHosts, peer_sockets
from test_clients_jdbc import CHECK_CLASS, CompiledCheck, jdbc_check  # noqa: F401 (fixture)

from cli.client import ApiClient
from gateway.config import Profile
from gateway.net.tunnel import (
    KEEPALIVE_IDLE_SECONDS,
    KEEPALIVE_INTERVAL_SECONDS,
    KEEPALIVE_PROBES,
)
from gateway.protocol.sqlstate import SqlState
from gateway.testing.net import free_port
from gateway.testing.pgcluster import TempCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

ROLE, ROLE_PASSWORD = "app_remote", f"acct-{secrets.token_hex(12)}"
ADMIN_PASSWORD = f"admin-{secrets.token_hex(12)}"
ALICE_PASSWORD = f"alice-{secrets.token_hex(12)}"
DATABASE = "appdb"


@dataclass
class Host:
    """One side's CLI: its namespace, its own HOME, client config and output."""

    ns: Namespace
    root: Path
    transcript: Transcript = field(default_factory=Transcript)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PAM_"))}
        home = self.root / "home"
        env |= {
            "HOME": str(home),
            "PAM_HOME": str(home / ".local/share/pam"),
            "PAM_CONFIG": str(home / ".config/pam/client.json"),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "200",
        }
        return env

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.ns.argv(sys.executable, "-m", "cli", *args),
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        self.transcript.add(result.stdout)
        self.transcript.add(result.stderr)
        assert result.returncode == 0, f"pam {' '.join(args)}: {result.stderr}"
        return result

    def popen(self, *args: str) -> tuple[subprocess.Popen[bytes], _Drain, _Drain]:
        proc = subprocess.Popen(
            self.ns.argv(sys.executable, "-m", "cli", *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        return proc, _Drain(proc.stdout, self.transcript), _Drain(proc.stderr, self.transcript)

    def log(self) -> str:
        return self.transcript.text().decode(errors="replace")

    def api(self) -> ApiClient:
        from gateway.config import load_client_config

        old = os.environ.get("PAM_CONFIG")
        os.environ["PAM_CONFIG"] = self.env["PAM_CONFIG"]
        try:
            profile: Profile = load_client_config().current
        finally:
            os.environ.pop("PAM_CONFIG")
            if old is not None:
                os.environ["PAM_CONFIG"] = old
        return ApiClient(profile, timeout=30)


@dataclass
class Site:
    hosts: TwoHosts
    cluster: TempCluster
    daemon: Host
    admin: Host
    laptop: Host
    api_port: int
    tunnel_port: int
    accesses: list[AccessProcess] = field(default_factory=list)
    daemon_proc: subprocess.Popen[bytes] | None = None

    def access(self, duration: str = "1h") -> AccessProcess:
        proc, out, err = self.laptop.popen(
            "db", "access", "--resource", "prod", "--account", "scram", "--duration", duration
        )
        access = AccessProcess(proc, out, err)
        self.accesses.append(access)
        return access.wait_ready()

    def admin_get(self, path: str) -> Any:
        with self.hosts.gateway.entered(), self.admin.api() as api:
            return api.get(path)

    def session_of(self, access: AccessProcess) -> dict[str, Any]:
        """The session's record and its connections (the id prefix is unique)."""
        detail: dict[str, Any] = self.admin_get(f"/v1/sessions/{access.session_prefix}")
        return detail

    def psql(self, access: AccessProcess, *commands: str) -> subprocess.CompletedProcess[str]:
        args = ["psql", access.url, "-X", "-At", "-v", "ON_ERROR_STOP=0"]
        for command in commands:
            args += ["-c", command]
        env = {k: v for k, v in self.laptop.env.items() if not k.startswith("PG")}
        return subprocess.run(
            self.hosts.laptop.argv(*args), capture_output=True, text=True, env=env, timeout=120
        )

    def connect(self, access: AccessProcess, **params: str) -> psycopg.Connection[Any]:
        with self.hosts.laptop.entered():
            return psycopg.connect(access.dsn(**params))


def _start_cluster(ns: Namespace) -> TempCluster:
    cluster = TempCluster()
    with ns.entered():  # pg_ctl, and so the postmaster, start inside the namespace
        cluster.start()
    try:  # admin_sql goes over the Unix socket: the file system is shared
        cluster.create_database(DATABASE)
        cluster.create_role(ROLE, ROLE_PASSWORD, method="scram-sha-256")
        cluster.admin_sql(f"GRANT CONNECT, CREATE ON DATABASE {DATABASE} TO {ROLE};")
        cluster.admin_sql(f"GRANT ALL ON SCHEMA public TO {ROLE};", database=DATABASE)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_daemon(site: Site) -> None:
    gw = site.hosts.gateway
    api, tunnel = f"{gw.address}:{site.api_port}", f"{gw.address}:{site.tunnel_port}"
    site.daemon.cli(
        "gateway", "init", "--admin", "admin", "--password-stdin",
        "--public-host", gw.address, "--tunnel-listen", tunnel, "--api-port", str(site.api_port),
        input=ADMIN_PASSWORD + "\n",
    )  # fmt: skip
    proc, out, err = site.daemon.popen(
        "gateway", "run", "--log-format", "json", "--api-listen", api, "--tunnel-listen", tunnel
    )
    site.daemon_proc = proc
    wait_for(lambda: proc.poll() is not None or gw.can_connect(gw.address, site.api_port))
    assert proc.poll() is None, f"the daemon exited: {out.text()} {err.text()}"


def _provision(site: Site, ca_file: Path) -> None:
    url = f"https://{GATEWAY_ADDRESS}:{site.api_port}"
    admin, cluster = site.admin, site.cluster
    admin.cli("login", "--gateway", url, "--ca-cert", str(ca_file), "--user", "admin",
              "--password-stdin", input=ADMIN_PASSWORD + "\n")  # fmt: skip
    admin.cli("resource", "add", "prod", "--host", "127.0.0.1", "--port", str(cluster.port),
              "--database", DATABASE, "--ssl-mode", "verify-full",
              "--ca-cert", str(cluster.ca_cert_path))  # fmt: skip
    admin.cli("account", "add", "prod", "scram", "--username", ROLE, "--password-stdin",
              input=ROLE_PASSWORD + "\n")  # fmt: skip
    admin.cli("user", "add", "alice", "--role", "member", "--password-stdin",
              input=ALICE_PASSWORD + "\n")  # fmt: skip
    admin.cli("policy", "add", "alice-prod", "--subject", "alice", "--resource", "prod",
              "--account", "scram", "--max-duration", "2h")  # fmt: skip
    site.laptop.cli("login", "--gateway", url, "--ca-cert", str(ca_file), "--user", "alice",
                    "--password-stdin", input=ALICE_PASSWORD + "\n")  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Both hosts, PostgreSQL and the daemon on one, alice logged in on the other."""
    root = tmp_path_factory.mktemp("two-hosts")
    with TwoHosts() as hosts:
        cluster = _start_cluster(hosts.gateway)
        with hosts.gateway.entered():
            api_port, tunnel_port = free_port(GATEWAY_ADDRESS), free_port(GATEWAY_ADDRESS)
        site = Site(
            hosts,
            cluster,
            daemon=Host(hosts.gateway, root / "gateway"),
            admin=Host(hosts.gateway, root / "admin"),
            laptop=Host(hosts.laptop, root / "laptop"),
            api_port=api_port,
            tunnel_port=tunnel_port,
        )
        try:
            _start_daemon(site)
            ca_file = root / "gateway-ca.pem"
            ca_file.write_text(site.daemon.cli("gateway", "ca-cert").stdout)
            _provision(site, ca_file)
            yield site
        finally:
            for access in site.accesses:
                if access.proc.poll() is None:
                    access.proc.kill()
                    access.wait()
            if site.daemon_proc is not None and site.daemon_proc.poll() is None:
                site.daemon_proc.terminate()
                site.daemon_proc.wait(30)
            cluster.stop()


@pytest.fixture(scope="module")
def shared_access(site: Site) -> AccessProcess:
    """One `pam db access` on the laptop for the tests that only connect."""
    return site.access()


def test_the_laptop_cannot_reach_postgresql_directly(site: Site) -> None:
    gw, laptop, port = site.hosts.gateway, site.hosts.laptop, site.cluster.port
    assert gw.can_connect("127.0.0.1", port)  # it is up, on the gateway host's loopback
    assert not gw.can_connect(GATEWAY_ADDRESS, port)  # and only there
    assert not laptop.can_connect(GATEWAY_ADDRESS, port)
    assert not laptop.can_connect("127.0.0.1", port)
    assert laptop.can_connect(GATEWAY_ADDRESS, site.tunnel_port)  # the tunnel, though


def test_psql_and_psycopg_reach_the_database_and_the_session_records_the_laptop(
    site: Site, shared_access: AccessProcess
) -> None:
    result = site.psql(shared_access, "select current_user, current_database()", "select 40 + 2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{ROLE}|{DATABASE}", "42"]
    with site.connect(shared_access, application_name="from-laptop") as conn:
        row = conn.execute(
            "select count(*), inet_client_addr()::text from generate_series(1, 5000)"
        )
        assert row.fetchone() == (5000, "127.0.0.1/32")  # the gateway's upstream leg
    detail = site.session_of(shared_access)
    assert detail["session"]["requester"] == "alice", detail["session"]
    assert detail["session"]["policy_name"] == "alice-prod", detail["session"]
    assert detail["session"]["api_client_addr"].startswith(LAPTOP_ADDRESS), detail["session"]
    addrs = {c["client_addr"] for c in detail["connections"]}
    assert addrs and all(a.startswith(f"{LAPTOP_ADDRESS}:") for a in addrs), addrs


def test_jdbc_reads_through_the_tunnel(
    site: Site,
    shared_access: AccessProcess,
    jdbc_check: CompiledCheck,  # noqa: F811
) -> None:
    url = (
        f"jdbc:postgresql://127.0.0.1:{shared_access.port}/{shared_access.database}"
        f"?user={shared_access.user}&sslmode=disable&ApplicationName=pam-jdbc-laptop"
    )
    args = site.hosts.laptop.argv(
        jdbc_check.java, "-cp", jdbc_check.classpath, CHECK_CLASS, url, "fetch_size"
    )
    result = subprocess.run(args, capture_output=True, encoding="utf-8", timeout=180)
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = json.loads(result.stdout)
    assert (out["count"], out["in_order"], out["last"]) == (5000, True, "row 5000")


def test_a_cancel_goes_through_the_tunnel(site: Site, shared_access: AccessProcess) -> None:
    conn = site.connect(shared_access)
    with conn:

        def cancel() -> None:
            with site.hosts.laptop.entered():  # libpq opens the cancel's own socket
                conn.cancel()

        timer = threading.Timer(1.0, cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(60)")
        timer.join()
        conn.rollback()
        assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)


def test_two_connections_at_once(site: Site, shared_access: AccessProcess) -> None:
    with site.connect(shared_access) as first, site.connect(shared_access) as second:
        one = first.execute("select pg_backend_pid()").fetchone()
        two = second.execute("select pg_backend_pid()").fetchone()
        assert one != two
        first.execute("create temp table t as select 1 as x")
        assert second.execute("select 2").fetchone() == (2,)
        assert first.execute("select x from t").fetchone() == (1,)


def test_a_clients_ctrl_c_does_not_end_the_forwarder(
    site: Site, shared_access: AccessProcess
) -> None:
    sleeper = subprocess.Popen(
        site.hosts.laptop.argv(
            "psql", f"{shared_access.url}&application_name=sleeper", "-X", "-c",
            "select pg_sleep(60)",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    query = (
        "select count(*) from pg_stat_activity"
        " where application_name = 'sleeper' and query like 'select pg_sleep%'"
    )
    wait_for(lambda: site.psql(shared_access, query).stdout.strip() == "1")
    sleeper.send_signal(signal.SIGINT)  # `ip netns exec` exec'd psql: this is psql's pid
    _out, err = sleeper.communicate(timeout=60)
    assert "canceling statement due to user request" in err
    result = site.psql(shared_access, "select 'still serving'")
    assert result.stdout.strip() == "still serving", result.stderr
    assert shared_access.proc.poll() is None


def test_the_tunnel_sockets_keep_alive(site: Site, shared_access: AccessProcess) -> None:
    with site.connect(shared_access) as conn:
        conn.execute("select 1")
        tunnel = (GATEWAY_ADDRESS, site.tunnel_port)
        found = []
        for sock in peer_sockets(shared_access.proc.pid):
            with sock:
                try:
                    if sock.getpeername() != tunnel:
                        continue
                except OSError:
                    continue
                found.append(
                    (
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    )
                )
    expected = (1, KEEPALIVE_IDLE_SECONDS, KEEPALIVE_INTERVAL_SECONDS, KEEPALIVE_PROBES)
    assert found == [expected]


def test_expiry_cuts_a_live_query_with_a_fatal_naming_it(site: Site) -> None:
    access = site.access(duration="5s")
    conn = site.connect(access)
    with pytest.raises(psycopg.OperationalError) as caught:
        conn.execute("select pg_sleep(60)")
    conn.close()
    assert "expired" in str(caught.value), caught.value
    assert access.wait(60) == 0


def _connect_error(ns: Namespace, port: int) -> ServerError:
    import asyncpg  # type: ignore[import-untyped]

    async def attempt() -> ServerError:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=port, user=ROLE, database=DATABASE, ssl=False, timeout=60
            )
        except asyncpg.PostgresError as exc:
            return ServerError(exc.sqlstate, exc.severity, exc.message, exc.hint)
        await conn.close()
        raise AssertionError("the connection was accepted")

    with ns.entered():  # asyncio.run's loop runs in this thread
        return asyncio.run(attempt())


def test_an_unreachable_gateway_is_08001_naming_it(site: Site) -> None:
    access = site.access()
    site.hosts.set_link(up=False)
    try:
        error = _connect_error(site.hosts.laptop, access.port)
    finally:
        site.hosts.set_link(up=True)
    assert error.sqlstate == SqlState.SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, error
    assert f"{GATEWAY_ADDRESS}:{site.tunnel_port}" in error.message
    result = site.psql(access, "select 'back'")  # the same forwarder, once the link is back
    assert result.stdout.strip() == "back", result.stderr


def test_no_password_reaches_the_laptop(site: Site, shared_access: AccessProcess) -> None:
    laptop_files = [p for p in (site.laptop.root).rglob("*") if p.is_file()]
    assert any(p.name == "client.json" for p in laptop_files)  # the config is in there
    # Finished processes' output is in the transcript; running ones' is read live.
    live = [d.text() for a in site.accesses for d in (a.stdout, a.stderr)]
    output = site.laptop.transcript.text() + "\n".join(live).encode()
    for secret in (ROLE_PASSWORD, ALICE_PASSWORD, ADMIN_PASSWORD):
        for path in laptop_files:
            assert secret.encode() not in path.read_bytes(), path
        assert secret.encode() not in output


@pytest.mark.slow
@pytest.mark.timeout(900)  # the suite's 300 s would end the 600 s query (a bound, not a check)
@pytest.mark.skipif(os.environ.get("PAM_SLOW_TESTS") != "1", reason="set PAM_SLOW_TESTS=1")
def test_a_ten_minute_query_completes_through_the_idle_tunnel(
    site: Site, shared_access: AccessProcess
) -> None:
    with site.connect(shared_access) as conn:
        # pg_sleep returns void, which psycopg reads as "": only the marker counts.
        row = conn.execute("select pg_sleep(600), 'done'").fetchone()
        assert row is not None and row[1] == "done"
