"""The throwaway cluster behaves as the gateway's tests assume: verified TLS,
one pg_hba.conf method per role prefix, and nothing left behind after stop()."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import psycopg
import pytest

from gateway.errors import GatewayError
from gateway.testing import pgcluster
from gateway.testing.pgcluster import (
    ClusterError,
    PgRole,
    PostgresNotInstalled,
    TempCluster,
    find_pg_bin_dir,
)

pytestmark = pytest.mark.integration

APP_DATABASE = "appdb"

#: "SSLRequest" in "Message Formats" of the PostgreSQL protocol documentation.
SSL_REQUEST_CODE = 80877103
SSL_REQUEST_LENGTH = 8
SOCKET_TIMEOUT_S = 10.0
SEARCHABLE_DIR_MODE = 0o711
PRIVATE_DIR_MODE = 0o700


def _authenticated_line(role: PgRole) -> str:
    # Logged with log_connections=on since PostgreSQL 14 ("connection authenticated").
    return f'connection authenticated: identity="{role.name}" method={role.method} '


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return not stat.rpartition(") ")[2].startswith("Z")


@pytest.mark.parametrize("key", ["scram", "md5", "plain"])
def test_each_role_logs_in_with_verify_full_using_its_own_hba_method(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], key: str
) -> None:
    role = pg_roles[key]
    log_start = pg.log_size()
    with psycopg.connect(pg.dsn(role.name, role.password, APP_DATABASE)) as conn:
        row = conn.execute(
            "select 1, current_user, current_database(),"
            " (select ssl from pg_stat_ssl where pid = pg_backend_pid())"
        ).fetchone()
        assert row == (1, role.name, APP_DATABASE, True)
        assert conn.pgconn.ssl_in_use is True
    assert _authenticated_line(role) in pg.read_log(log_start)


def test_roles_can_create_tables_in_appdb(pg: TempCluster, pg_roles: Mapping[str, PgRole]) -> None:
    role = pg_roles["md5"]
    with psycopg.connect(pg.dsn(role.name, role.password, APP_DATABASE)) as conn:
        conn.execute("create temporary table t (x int)")
        conn.execute("create table if not exists public.pgcluster_probe (x int)")
        conn.execute("insert into public.pgcluster_probe values (42)")
        assert conn.execute("select max(x) from public.pgcluster_probe").fetchone() == (42,)
        conn.rollback()


def test_verify_full_against_an_unrelated_ca_is_refused(
    pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    role = pg_roles["scram"]
    dsn = pg.dsn(role.name, role.password, APP_DATABASE)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn, sslrootcert=str(pg.other_ca_cert_path))


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost"])
def test_python_ssl_verifies_the_server_certificate(pg: TempCluster, server_hostname: str) -> None:
    context = ssl.create_default_context(cafile=str(pg.ca_cert_path))
    with socket.create_connection((pg.host, pg.port), timeout=SOCKET_TIMEOUT_S) as raw:
        raw.sendall(struct.pack("!II", SSL_REQUEST_LENGTH, SSL_REQUEST_CODE))
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            peer = tls.getpeercert()
    assert peer is not None
    assert set(peer["subjectAltName"]) == {("DNS", "localhost"), ("IP Address", "127.0.0.1")}


def test_python_ssl_rejects_the_server_under_the_other_ca(pg: TempCluster) -> None:
    context = ssl.create_default_context(cafile=str(pg.other_ca_cert_path))
    with socket.create_connection((pg.host, pg.port), timeout=SOCKET_TIMEOUT_S) as raw:
        raw.sendall(struct.pack("!II", SSL_REQUEST_LENGTH, SSL_REQUEST_CODE))
        assert raw.recv(1) == b"S"
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname=pg.host)


def test_md5_role_password_is_stored_as_md5_and_the_others_as_scram(
    pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    stored = dict(
        line.split("|", 1)
        for line in pg.admin_sql(
            "select rolname, rolpassword from pg_authid"
            " where rolname in ('app_scram', 'md5_app', 'plain_app')"
        ).splitlines()
    )
    md5_hash = stored[pg_roles["md5"].name]
    # "md5" followed by 32 hex digits ("Password Authentication" in the docs).
    assert md5_hash.startswith("md5")
    assert len(md5_hash) == len("md5") + 32
    assert stored[pg_roles["scram"].name].startswith("SCRAM-SHA-256$4096:")
    assert stored[pg_roles["plain"].name].startswith("SCRAM-SHA-256$4096:")


def test_plain_tcp_is_allowed_and_uses_scram_for_the_plain_role(
    pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    # Cleartext passwords are only for hostssl; without TLS the role falls
    # through to the generic "host ... scram-sha-256" line.
    role = pg_roles["plain"]
    log_start = pg.log_size()
    dsn = pg.dsn(role.name, role.password, APP_DATABASE, sslmode="disable")
    with psycopg.connect(dsn) as conn:
        assert conn.pgconn.ssl_in_use is False
        row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
        assert row == (False,)
    expected = PgRole(role.name, role.password, "scram-sha-256")
    assert _authenticated_line(expected) in pg.read_log(log_start)


def test_plainnossl_prefix_uses_cleartext_over_plain_tcp(pg: TempCluster) -> None:
    role = PgRole("plainnossl_probe", "s3cret-nossl-Pw!", "password")
    pg.create_role(role.name, role.password)
    try:
        log_start = pg.log_size()
        dsn = pg.dsn(role.name, role.password, "postgres", sslmode="disable")
        with psycopg.connect(dsn) as conn:
            assert conn.execute("select current_user").fetchone() == (role.name,)
        assert _authenticated_line(role) in pg.read_log(log_start)
    finally:
        pg.admin_sql(f"DROP ROLE {role.name}")


def test_wrong_password_is_refused(pg: TempCluster, pg_roles: Mapping[str, PgRole]) -> None:
    role = pg_roles["scram"]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(role.name, "not-the-password", APP_DATABASE))


def test_superuser_can_log_in_over_tls_with_its_password(pg: TempCluster) -> None:
    with psycopg.connect(pg.superuser_dsn()) as conn:
        assert conn.execute("select current_setting('is_superuser')").fetchone() == ("on",)
        assert conn.pgconn.ssl_in_use is True


def test_cluster_reports_its_version_and_addresses(pg: TempCluster) -> None:
    assert pg.host == "127.0.0.1"
    assert pg.port > 0
    assert pg.server_version.split(".")[0].isdigit()
    assert pg.admin_sql("show server_version").startswith(pg.server_version)
    assert pg.admin_sql("show port") == str(pg.port)
    assert pg.admin_sql("show ssl") == "on"


def test_admin_sql_errors_carry_stderr_with_secrets_masked(pg: TempCluster) -> None:
    with pytest.raises(ClusterError) as excinfo:
        pg.admin_sql("select 'hunter2-secret' +", redact=["hunter2-secret"])
    message = str(excinfo.value)
    assert "syntax error" in message
    assert "hunter2-secret" not in message
    assert "***" in message


def test_create_role_failure_does_not_reveal_the_password(
    pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    with pytest.raises(ClusterError, match="already exists") as excinfo:
        pg.create_role(pg_roles["scram"].name, "Another-s3cret")
    assert "Another-s3cret" not in str(excinfo.value)


def test_repr_does_not_show_the_superuser_password(pg: TempCluster) -> None:
    assert pg.superuser_password not in repr(pg)


def test_stop_leaves_no_process_and_removes_the_directory_it_created() -> None:
    with TempCluster() as cluster:
        pid = cluster.postmaster_pid
        base_dir = cluster.base_dir
        assert pid is not None
        assert _is_alive(pid)
    assert base_dir is not None
    assert not base_dir.exists()
    assert not _is_alive(pid)
    cluster.stop()  # idempotent
    assert cluster.is_running is False


def test_stop_keeps_a_base_dir_it_was_given() -> None:
    with tempfile.TemporaryDirectory(prefix="pam-pg-test-") as parent:
        # As root the server runs as "postgres", which must be able to reach base_dir.
        Path(parent).chmod(SEARCHABLE_DIR_MODE)
        given = Path(parent) / "cluster"
        cluster = TempCluster(base_dir=given)
        cluster.start()
        pid = cluster.postmaster_pid
        cluster.stop()
        assert pid is not None
        assert not _is_alive(pid)
        assert given.is_dir()
        assert (given / "tls" / "ca.crt").is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another OS user")
def test_a_base_dir_the_server_user_cannot_reach_is_refused_clearly() -> None:
    with tempfile.TemporaryDirectory(prefix="pam-pg-test-") as parent:
        Path(parent).chmod(PRIVATE_DIR_MODE)
        cluster = TempCluster(base_dir=Path(parent) / "cluster")
        with pytest.raises(ClusterError, match="is not searchable"):
            cluster.start()
        assert cluster.postmaster_pid is None


def test_failure_after_the_server_started_kills_it_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, object] = {}

    def fail_midway(self: TempCluster) -> None:
        seen["pid"] = self.postmaster_pid
        seen["base_dir"] = self.base_dir
        raise RuntimeError("injected failure")

    monkeypatch.setattr(TempCluster, "_create_hba_groups", fail_midway)
    with pytest.raises(RuntimeError, match="injected failure"):
        TempCluster().start()
    pid, base_dir = seen["pid"], seen["base_dir"]
    assert isinstance(pid, int)
    assert isinstance(base_dir, Path)
    assert not _is_alive(pid)
    assert not base_dir.exists()


def test_a_server_that_cannot_start_raises_with_the_log_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pgcluster, "_PG_HBA_CONF", "this is not a pg_hba line\n")
    cluster = TempCluster()
    with pytest.raises(ClusterError, match="did not start") as excinfo:
        cluster.start()
    assert "pg_hba.conf" in str(excinfo.value)
    assert cluster.base_dir is not None
    assert not cluster.base_dir.exists()


def test_missing_binaries_raise_with_install_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(pgcluster.PG_BIN_ENV, str(tmp_path))
    with pytest.raises(PostgresNotInstalled, match="apt-get install postgresql-15") as excinfo:
        find_pg_bin_dir()
    assert isinstance(excinfo.value, GatewayError)


def test_bin_dir_is_found_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pgcluster.PG_BIN_ENV, raising=False)
    bin_dir = find_pg_bin_dir()
    assert all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))
