"""Fixtures for tests that talk to a real PostgreSQL server.

``pg`` is one :class:`~gateway.testing.pgcluster.TempCluster` per test session, with TLS,
a database ``appdb`` and one login role per password method (``pg_roles``).
Tests must not change these roles or drop ``appdb``; create their own objects
when they need to mutate something.

Missing PostgreSQL binaries fail these tests rather than skip them: CI must run
them, and a silent skip would hide that it did not. When a test that used ``pg``
fails, the server log lines written during that test are attached to its report.

``fault_proxy`` starts :class:`~faultproxy.FaultProxy` instances (drop, delay,
reset, stall on command) in front of any host:port, stopped when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from faultproxy import FaultProxy
from harness import Gateway, write_settings

from cli.forwarder import Forwarder
from gateway.testing.pgcluster import PasswordEncryption, PgRole, PostgresNotInstalled, TempCluster

APP_DATABASE = "appdb"
#: How many trailing server log lines a failed test's report shows.
FAILURE_LOG_LINES = 200


@dataclass(frozen=True, slots=True)
class _RoleSpec:
    role: PgRole
    stored_as: PasswordEncryption


_ROLE_SPECS: Mapping[str, _RoleSpec] = MappingProxyType(
    {
        "scram": _RoleSpec(
            PgRole("app_scram", "s3cret-scram-Pw!", "scram-sha-256"), "scram-sha-256"
        ),
        # The md5_ prefix selects the md5 pg_hba.conf line; an md5 hash is what
        # that method needs to avoid falling back to SCRAM.
        "md5": _RoleSpec(PgRole("md5_app", "s3cret-md5-Pw!", "md5"), "md5"),
        # The plain_ prefix selects cleartext "password" over hostssl.
        "plain": _RoleSpec(PgRole("plain_app", "s3cret-plain-Pw!", "password"), "scram-sha-256"),
    }
)

_PG_LOG_START = pytest.StashKey[tuple[TempCluster, int]]()


def _provision(cluster: TempCluster) -> None:
    cluster.create_database(APP_DATABASE)
    for spec in _ROLE_SPECS.values():
        cluster.create_role(spec.role.name, spec.role.password, method=spec.stored_as)
    names = ", ".join(f'"{spec.role.name}"' for spec in _ROLE_SPECS.values())
    cluster.admin_sql(f"GRANT CONNECT, CREATE ON DATABASE {APP_DATABASE} TO {names};")
    cluster.admin_sql(f"GRANT ALL ON SCHEMA public TO {names};", database=APP_DATABASE)


@pytest.fixture(scope="session")
def pg() -> Iterator[TempCluster]:
    """A started PostgreSQL cluster with ``appdb`` and the roles of ``pg_roles``."""
    cluster = TempCluster()
    try:
        cluster.start()
    except PostgresNotInstalled as exc:
        pytest.fail(f"integration tests need a PostgreSQL server: {exc}", pytrace=False)
    try:
        _provision(cluster)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_roles(pg: TempCluster) -> Mapping[str, PgRole]:
    """The login roles of ``pg``, by short name: ``scram``, ``md5``, ``plain``."""
    return MappingProxyType({key: spec.role for key, spec in _ROLE_SPECS.items()})


@pytest.fixture(autouse=True)
def _pg_log_start(request: pytest.FixtureRequest) -> None:
    # Remember where the log stood when the test began, so a failure report
    # shows this test's server lines rather than the whole session's.
    if "pg" in request.fixturenames:
        cluster: TempCluster = request.getfixturevalue("pg")
        request.node.stash[_PG_LOG_START] = (cluster, cluster.log_size())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    start = item.stash.get(_PG_LOG_START, None)
    if report.failed and start is not None:
        cluster, offset = start
        lines = cluster.read_log(offset).splitlines()[-FAILURE_LOG_LINES:]
        report.sections.append(("PostgreSQL server log", "\n".join(lines)))
    return report


def provision_gateway(
    root: Path,
    pg: TempCluster,
    pg_roles: Mapping[str, PgRole],
    settings: Mapping[str, Any] | None = None,
) -> Gateway:
    """A running daemon (with *settings* in its gateway.json), resource ``prod``
    and one account per role of ``pg_roles``."""
    gw = Gateway(root)
    gw.init()
    if settings:
        write_settings(gw, settings)
    gw.start()
    try:
        # Through the API in-process: the CLI's own commands are tested in test_cli.
        with gw.api() as api:
            api.post(
                "/v1/resources",
                {
                    "name": "prod",
                    "host": pg.host,
                    "port": pg.port,
                    "database": APP_DATABASE,
                    "ssl_mode": "verify-full",
                    "ca_cert": pg.ca_cert_path.read_text(),
                },
            )
            for key, role in pg_roles.items():
                api.post(
                    "/v1/resources/prod/accounts",
                    {"name": key, "username": role.name, "password": role.password},
                )
    except BaseException:
        gw.close()
        raise
    return gw


@pytest.fixture
def gateway(pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path) -> Iterator[Gateway]:
    """A running daemon of its own with resource ``prod`` (verify-full against
    ``pg``) and one account per role of ``pg_roles``, all registered through the
    CLI. For tests that stop, restart or reconfigure the daemon."""
    gw = provision_gateway(tmp_path, pg, pg_roles)
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture(scope="module")
def module_gateway(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """One daemon for a whole test module (set up like ``gateway``)."""
    gw = provision_gateway(tmp_path_factory.mktemp("gateway"), pg, pg_roles)
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture
def shared_gateway(module_gateway: Gateway) -> Iterator[Gateway]:
    """The module's daemon, for tests that only open access sessions and connect:
    each test's `pam db access` processes are ended when the test ends."""
    started = len(module_gateway.accesses)
    yield module_gateway
    for access in module_gateway.accesses[started:]:
        if access.proc.poll() is None:
            access.stop()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str, int], FaultProxy]]:
    """Starts a fault-injecting TCP proxy to a host:port (``fault_proxy(host, port)``);
    every proxy started is stopped, and its sockets closed, when the test ends."""
    started: list[FaultProxy] = []

    def start(host: str, port: int) -> FaultProxy:
        proxy = FaultProxy(host, port).start()
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


@pytest.fixture
def forwarders() -> Iterator[list[Forwarder]]:
    """Tunnel forwarders a test starts (harness.forward_tunnel), stopped after it."""
    made: list[Forwarder] = []
    yield made
    for forwarder in made:
        forwarder.stop()
