"""Network faults on either side of the gateway, injected by a TCP proxy.

:class:`~faultproxy.FaultProxy` sits between the gateway and PostgreSQL (the
resource's host:port is the proxy's; the server certificate names 127.0.0.1,
so ``verify-full`` holds through it, TLS passing through untouched) or between a
client and the gateway's listener, and resets, drops or stalls one connection
while the others go on. Each test checks what the client sees, what the
gateway records for the connection, that PostgreSQL's backend is released, and
that the session and the gateway keep working.

Real daemon, CLI, PostgreSQL 15 and clients. Waits are bounded polls (a count
of tries) or joins with a generous deadline, never timing assertions.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from faultproxy import Direction, FaultProxy, ProxiedConnection
from harness import AccessProcess, Gateway, RawClient, unique

from gateway.protocol import messages
from gateway.protocol.constants import FrontendType
from gateway.protocol.sqlstate import SqlState
from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

ProxyFactory = Callable[[str, int], FaultProxy]

#: The resource whose upstream is reached through the proxy.
PROXIED = "proxied"
#: A result far larger than any test lets through: it is still streaming when the fault hits.
BIG_RESULT = "select repeat('x', 1000) from generate_series(1, 2000000)"
#: Bytes of result the client must have been sent before the reset: mid-stream.
STREAMED_BEFORE_RESET = 256 * 1024
#: Bounds on polls (tries, 0.1 s apart) and on joins: hang guards, not thresholds.
TRIES = 600
JOIN_SECONDS = 60.0


# --- helpers ------------------------------------------------------------------------


def eventually(predicate: Callable[[], Any], tries: int = TRIES, interval: float = 0.1) -> Any:
    """Poll *predicate* until it is truthy, at most *tries* times."""
    for _ in range(tries):
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met after {tries} tries")


def add_proxied_resource(
    gateway: Gateway, pg: TempCluster, role: PgRole, proxy: FaultProxy
) -> None:
    """Resource ``proxied`` (account ``scram``): PostgreSQL through *proxy*, verify-full."""
    with gateway.api() as api:
        api.post(
            "/v1/resources",
            {
                "name": PROXIED,
                "host": pg.host,
                "port": proxy.port,
                "database": APP_DATABASE,
                "ssl_mode": "verify-full",
                "ca_cert": pg.ca_cert_path.read_text(),
            },
        )
        # Unchecked: a check would be the proxy's first connection, and the
        # tests number the proxied connections from the first client's.
        api.post(
            f"/v1/resources/{PROXIED}/accounts",
            {"name": "scram", "username": role.name, "password": role.password, "verify": False},
        )


def proxied_access(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole], proxy_to: ProxyFactory
) -> tuple[FaultProxy, AccessProcess]:
    proxy = proxy_to(pg.host, pg.port)
    add_proxied_resource(gateway, pg, pg_roles["scram"], proxy)
    return proxy, gateway.access(resource=PROXIED).wait_ready()


def backend_is_gone(pg: TempCluster, pid: int) -> bool:
    return pg.admin_sql(f"select count(*) from pg_stat_activity where pid = {pid}") == "0"


def backend_state(pg: TempCluster, pid: int) -> str:
    """``state|query`` of a backend, as pg_stat_activity shows it."""
    return pg.admin_sql(f"select state || '|' || query from pg_stat_activity where pid = {pid}")


def session_detail(gateway: Gateway, session: str) -> dict[str, Any]:
    detail: dict[str, Any] = gateway.cli_json("sessions", "show", session)
    return detail


def connection_record(gateway: Gateway, session: str, application_name: str) -> dict[str, Any]:
    """The connection's record once it has ended."""

    def ended() -> dict[str, Any] | None:
        for record in session_detail(gateway, session)["connections"]:
            if record["application_name"] == application_name and record["ended_at"]:
                return dict(record)
        return None

    record: dict[str, Any] = eventually(ended)
    return record


def internal_failures(gateway: Gateway) -> list[dict[str, Any]]:
    """Log events of the listener's last line of defence (an unexpected exception)."""
    return [e for e in gateway.log_events() if e.get("event") == "connection_failed"]


def select_one(dsn: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select 'still serving'").fetchone()
    return row[0] if row else None


class Running:
    """One statement on a psycopg connection, run in a thread: the test waits
    for it to finish or fail while it injects the fault."""

    def __init__(self, conn: psycopg.Connection[Any], sql: str) -> None:
        self.conn = conn
        self.sql = sql
        self.error: psycopg.Error | None = None
        self.thread = threading.Thread(target=self._run, name="statement", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.execute(self.sql).fetchall()
        except psycopg.Error as exc:
            self.error = exc

    def join(self) -> psycopg.Error:
        """The error that ended the statement; fails if it ran on or succeeded."""
        self.thread.join(JOIN_SECONDS)
        assert not self.thread.is_alive(), f"{self.sql!r} is still running"
        self.conn.close()
        assert self.error is not None, f"{self.sql!r} succeeded instead of failing"
        return self.error


def copy_data(row: str) -> bytes:
    return messages.encode_message(FrontendType.COPY_DATA, row.encode())


# --- the proxy itself ----------------------------------------------------------------


@pytest.fixture
def echo_server() -> Any:
    """A loopback TCP echo server (one thread per connection)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass  # reset by the proxy: the point of some tests

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()
    server.close()


def test_the_proxy_stalls_resumes_resets_and_drops_one_connection_at_a_time(
    echo_server: tuple[str, int], fault_proxy: ProxyFactory
) -> None:
    proxy = fault_proxy(*echo_server)
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as first,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as second,
    ):
        first.sendall(b"one")
        assert first.recv(16) == b"one"
        second.sendall(b"two")
        assert second.recv(16) == b"two"
        link, other = proxy.wait_for_connections(2)

        link.stall(Direction.TO_CLIENT)
        first.sendall(b"held")
        eventually(lambda: link.held(Direction.TO_CLIENT) == 4)
        second.sendall(b"flows")
        assert second.recv(16) == b"flows"
        link.resume()
        assert first.recv(16) == b"held"

        link.reset()
        with pytest.raises(ConnectionResetError):
            first.recv(16)
        assert link.closed.wait(JOIN_SECONDS)
        assert not other.closed.is_set()
        other.drop()
        assert second.recv(16) == b""
        assert other.closed.wait(JOIN_SECONDS)
    assert [c.forwarded(Direction.BOTH) for c in proxy.connections] == [14, 16]


# --- an upstream reset mid-query -----------------------------------------------------------


@pytest.mark.timeout(240)
def test_an_upstream_reset_mid_result_fails_that_connection_only(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole], fault_proxy: ProxyFactory
) -> None:
    proxy, access = proxied_access(gateway, pg, pg_roles, fault_proxy)
    with psycopg.connect(access.dsn(application_name="bystander"), autocommit=True) as bystander:
        victim = psycopg.connect(access.dsn(application_name="victim"), autocommit=True)
        victim_pid = victim.info.backend_pid
        _, link = proxy.wait_for_connections(2)
        # Slow the result down so it is still streaming when the reset comes.
        link.delay(0.02, Direction.TO_CLIENT)
        before = link.forwarded(Direction.TO_CLIENT)
        statement = Running(victim, BIG_RESULT)
        eventually(lambda: link.forwarded(Direction.TO_CLIENT) > before + STREAMED_BEFORE_RESET)

        link.reset()

        error = statement.join()
        # The other connection of the session carries on.
        assert bystander.execute("select 'unaffected'").fetchone() == ("unaffected",)
    # The gateway closes the client's connection; it cannot send an
    # ErrorResponse in the middle of a server message, so the client sees what
    # a server that vanished mid-result looks like.
    assert isinstance(error, psycopg.OperationalError), repr(error)
    assert error.sqlstate is None, repr(error)
    record = connection_record(gateway, access.session_prefix, "victim")
    assert record["end_reason"] == "error"
    assert record["error_sqlstate"] == SqlState.CONNECTION_FAILURE
    assert record["error_message"].startswith("connection failure: ")
    assert record["bytes_from_server"] > STREAMED_BEFORE_RESET
    # The session takes new connections; the backend is released.
    assert select_one(access.dsn(application_name="after")) == "still serving"
    eventually(lambda: backend_is_gone(pg, victim_pid))
    assert session_detail(gateway, access.session_prefix)["session"]["ended_at"] is None
    assert internal_failures(gateway) == []


@pytest.mark.timeout(240)
def test_an_upstream_reset_between_messages_tells_the_client_why_with_08006(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole], fault_proxy: ProxyFactory
) -> None:
    proxy, access = proxied_access(gateway, pg, pg_roles, fault_proxy)
    victim = psycopg.connect(access.dsn(application_name="victim"), autocommit=True)
    victim_pid = victim.info.backend_pid
    [link] = proxy.wait_for_connections(1)
    statement = Running(victim, "select pg_sleep(600)")
    try:
        # The server has sent nothing since the query: the relay is between messages.
        eventually(lambda: backend_state(pg, victim_pid) == "active|select pg_sleep(600)")

        link.reset()

        error = statement.join()
        record = connection_record(gateway, access.session_prefix, "victim")
        assert record["end_reason"] == "error"
        assert record["error_sqlstate"] == SqlState.CONNECTION_FAILURE
        assert isinstance(error, psycopg.OperationalError), repr(error)
        assert error.sqlstate == SqlState.CONNECTION_FAILURE, repr(error)
        assert error.diag.severity_nonlocalized == "FATAL"
    finally:
        # pg_sleep does not notice its client went away; do not leave it behind.
        pg.admin_sql(f"select pg_terminate_backend({victim_pid})")


# --- a client vanishing mid-COPY ---------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("fault", "partial", "end_reason"),
    [("reset", True, "error"), ("drop", False, "client_closed")],
    ids=["reset-mid-message", "drop-between-messages"],
)
def test_a_client_vanishing_mid_copy_releases_the_backend_and_records_the_end(
    gateway: Gateway,
    pg: TempCluster,
    fault_proxy: ProxyFactory,
    fault: str,
    partial: bool,
    end_reason: str,
) -> None:
    access = gateway.access().wait_ready()
    # The client reaches the gateway's listener through the proxy.
    proxy = fault_proxy("127.0.0.1", access.port)
    table = unique("copy_target")
    app = unique("copier")
    client = RawClient(proxy.port)
    try:
        [link] = proxy.wait_for_connections(1)
        client.startup(access.user, access.database, application_name=app)
        client.query(f"create table {table} (id int, body text)")
        backend_pid = int(
            pg.admin_sql(f"select pid from pg_stat_activity where application_name = '{app}'")
        )
        copy = f"copy {table} from stdin"
        client.send(messages.encode_message(FrontendType.QUERY, copy.encode() + b"\0"))
        client.read_until(b"G")  # CopyInResponse: the server waits for CopyData (55.2.6)
        rows = b"".join(copy_data(f"{i}\trow {i}\n") for i in range(1000))
        if partial:
            rows += copy_data("1000\tcut short\n")[:9]
        sent = link.forwarded(Direction.TO_SERVER) + len(rows)
        client.send(rows)
        eventually(lambda: link.forwarded(Direction.TO_SERVER) == sent)
        eventually(lambda: backend_state(pg, backend_pid) == f"active|{copy}")

        getattr(link, fault)()
    finally:
        client.close()

    eventually(lambda: backend_is_gone(pg, backend_pid))
    record = connection_record(gateway, access.session_prefix, app)
    assert record["end_reason"] == end_reason
    assert record["backend_pid"] == backend_pid
    assert record["bytes_from_client"] >= len(rows)
    # Nothing of the cut COPY was committed; nothing is left open.
    assert pg.admin_sql(f"select count(*) from {table}", database=APP_DATABASE) == "0"
    assert session_detail(gateway, access.session_prefix)["live_connections"] == 0
    assert select_one(access.dsn()) == "still serving"
    assert internal_failures(gateway) == []


# --- a stalled server -----------------------------------------------------------------------


def is_hung(statement: Running, link: ProxiedConnection, direction: Direction) -> bool:
    """The statement waits on bytes the proxy holds back."""
    return statement.thread.is_alive() and link.held(direction) > 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "stalled", [Direction.TO_CLIENT, Direction.BOTH], ids=["server-to-gateway", "both-ways"]
)
def test_ending_the_grant_cuts_a_client_hung_on_a_stalled_server_with_57p01(
    gateway: Gateway,
    pg: TempCluster,
    pg_roles: Mapping[str, PgRole],
    fault_proxy: ProxyFactory,
    stalled: Direction,
) -> None:
    proxy, access = proxied_access(gateway, pg, pg_roles, fault_proxy)
    conn = psycopg.connect(access.dsn(application_name="stalled"), autocommit=True)
    backend_pid = conn.info.backend_pid
    [link] = proxy.wait_for_connections(1)
    proxy.stall(stalled)
    sql = "select 'never seen'"
    statement = Running(conn, sql)
    if stalled is Direction.TO_CLIENT:
        # The server answered; the answer waits in the proxy.
        eventually(lambda: backend_state(pg, backend_pid) == f"idle|{sql}")
        eventually(lambda: is_hung(statement, link, Direction.TO_CLIENT))
    else:
        eventually(lambda: is_hung(statement, link, Direction.TO_SERVER))
    # Meanwhile the gateway serves other sessions.
    other = gateway.access().wait_ready()
    assert select_one(other.dsn()) == "still serving"

    assert access.stop(signal.SIGINT) == 0

    error = statement.join()
    assert isinstance(error, psycopg.OperationalError), repr(error)
    assert error.sqlstate == SqlState.ADMIN_SHUTDOWN
    assert error.diag.severity_nonlocalized == "FATAL"
    assert error.diag.message_primary == (
        f"terminating connection because access session {access.session_prefix}"
        " was ended by its owner"
    )
    record = connection_record(gateway, access.session_prefix, "stalled")
    assert record["end_reason"] == "session_ended"
    proxy.resume()
    eventually(lambda: backend_is_gone(pg, backend_pid))
    assert select_one(other.dsn()) == "still serving"
    assert select_one(gateway.access(resource=PROXIED).wait_ready().dsn()) == "still serving"
    assert internal_failures(gateway) == []
