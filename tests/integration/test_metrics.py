"""/metrics, /healthz and /readyz of a real daemon (issue 17, point 5): the
metrics parse with Prometheus's own text parser and move when traffic flows
through a grant (psycopg through `pam db access`, a real PostgreSQL); a
connection refused by the gateway counts its SQLSTATE; /readyz answers 503
naming the store and the lease while the store is black-holed (a PostgreSQL
store behind the fault proxy, as in test_gateways_shared_store), and 200 again
once it is back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from faultproxy import FaultProxy
from harness import (
    FAST_PRESENCE,
    Gateway,
    add_target,
    connect_error,
    unique,
    wait_for,
    write_settings,
)
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.net import free_port
from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration

#: every family the daemon exposes (counters without their _total suffix)
FAMILIES = {
    "pam_gateway_info",
    "pam_grants_live",
    "pam_connections_live",
    "pam_connections",
    "pam_relayed_bytes",
    "pam_statements_relayed",
    "pam_statement_errors",
    "pam_errors_sent",
    "pam_refusals",
    "pam_rotations",
    "pam_upstream_connect_seconds",
    "pam_audit_backlog_bytes",
    "pam_audit_batch_write_seconds",
    "pam_presence_lease_age_seconds",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(gw: Gateway, path: str) -> Any:
    with gw.api() as api:
        return api.probe(path)


def scrape(gw: Gateway) -> tuple[set[str], Samples]:
    answer = get(gw, "/metrics")
    assert answer.status_code == 200, answer.text
    families = list(text_string_to_metric_families(answer.text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_parse_and_move_with_traffic_through_a_grant(shared_gateway: Gateway) -> None:
    gw = shared_gateway
    names, before = scrape(gw)
    assert names >= FAMILIES
    access = gw.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        for n in range(3):
            assert conn.execute("select %s::int", (n,)).fetchone() == (n,)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table_here")
        _, live = scrape(gw)
        assert value(live, "pam_grants_live") >= 1
        assert value(live, "pam_connections_live") >= 1
    refused = connect_error(access.port, access.user, "not_the_database")
    assert refused.sqlstate == "3D000"

    def moved() -> Samples | None:
        _, after = scrape(gw)
        grew = [
            value(after, name, **labels) - value(before, name, **labels) >= least
            for name, labels, least in (
                ("pam_statements_relayed_total", {}, 4),
                ("pam_statement_errors_total", {"sqlstate": "42P01"}, 1),
                ("pam_connections_total", {"end_reason": "client_closed"}, 1),
                ("pam_upstream_connect_seconds_count", {"outcome": "ok"}, 1),
                ("pam_errors_sent_total", {"sqlstate": "3D000"}, 1),
                ("pam_refusals_total", {"place": "listener", "reason": "wrong_database"}, 1),
                ("pam_audit_batch_write_seconds_count", {}, 1),
            )
        ]
        return after if all(grew) else None

    after = wait_for(moved)
    for direction in ("client_to_server", "server_to_client"):
        grown = value(after, "pam_relayed_bytes_total", direction=direction) - value(
            before, "pam_relayed_bytes_total", direction=direction
        )
        assert grown > 0, direction
    assert 0 <= value(after, "pam_presence_lease_age_seconds") < 15
    ready = get(gw, "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert get(gw, "/healthz").status_code == 200


def test_readyz_names_the_store_and_the_lease_while_the_store_is_out_of_reach(
    pg: TempCluster, tmp_path: Path, fault_proxy: Callable[[str, int], FaultProxy]
) -> None:
    database = unique("pam_store")
    pg.create_database(database)
    proxy = fault_proxy(pg.host, pg.port)
    url = pg.superuser_dsn(database).replace(f":{pg.port}/", f":{proxy.port}/", 1)
    gw = Gateway(tmp_path)
    gw.home.mkdir(parents=True, mode=0o700)
    write_settings(gw, {**FAST_PRESENCE, "store_url": url})
    gw.cli("gateway", "init", "--force", "--api-port", str(free_port()))
    try:
        gw.start()
        add_target(gw, pg, "prod", APP_DATABASE, "metrics")
        wait_for(lambda: get(gw, "/readyz").status_code == 200)
        proxy.stall()

        def not_ready() -> dict[str, Any] | None:
            answer = get(gw, "/readyz")
            body: dict[str, Any] = answer.json()
            failed = set(body["failed"])
            return body if answer.status_code == 503 and {"store", "lease"} <= failed else None

        body = wait_for(not_ready)
        assert body["status"] == "not_ready"
        assert body["checks"]["store"]["ok"] is False
        assert "lease lasts" in body["checks"]["lease"]["detail"]
        assert str(proxy.port) not in str(body) and database not in str(body)
        assert get(gw, "/healthz").status_code == 200
        # The lease's age shows it too.
        _, samples = scrape(gw)
        assert (
            value(samples, "pam_presence_lease_age_seconds")
            > FAST_PRESENCE["presence_lease_seconds"]
        )
        proxy.resume()
        wait_for(lambda: get(gw, "/readyz").status_code == 200)
    finally:
        proxy.resume()
        gw.close()


def test_a_revoked_grant_counts_the_fatal_it_sent_and_its_connection_end(
    shared_gateway: Gateway,
) -> None:
    gw = shared_gateway
    _, before = scrape(gw)
    access = gw.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        sessions = gw.cli_json("sessions", "list", "--active")
        session_id = next(s["id"] for s in sessions if s["id"].startswith(access.session_prefix))
        gw.cli("sessions", "revoke", session_id[:8], "--reason", "metrics test")
        with pytest.raises(psycopg.errors.AdminShutdown):
            conn.execute("select 2")
    access.wait()

    def moved() -> bool:
        _, after = scrape(gw)
        return all(
            value(after, name, **labels) - value(before, name, **labels) >= 1
            for name, labels in (
                ("pam_errors_sent_total", {"sqlstate": "57P01"}),
                ("pam_connections_total", {"end_reason": "session_ended"}),
            )
        )

    wait_for(moved)
