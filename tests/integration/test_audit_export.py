"""The audit trail exported to a SIEM by a real daemon (issue 17, point 5): a
syslog collector over TCP (RFC 5424, octet-counted) and a JSON-lines file get
every record of a session, once, in order, with its session id and seq, exactly
as the trail holds them; a collector that is down blocks nothing (statements
relay and are recorded), gets what it missed once it is back, and a queue too
small for the outage drops and says so in the log."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import psycopg
import pytest
from conftest import provision_gateway
from harness import Gateway, wait_for
from test_audit import trail

from gateway.testing.net import LOOPBACK_HOST, free_port
from gateway.testing.pgcluster import PgRole, TempCluster
from gateway.testing.syslog_receiver import SyslogMessage, SyslogReceiver

pytestmark = pytest.mark.integration

SD = "pam@32473"


def run_statements(gw: Gateway, count: int) -> str:
    """*count* statements on one connection through a grant; the session's full id
    once its trail holds the connection's end."""
    access = gw.access().wait_ready()
    with psycopg.connect(access.dsn(), autocommit=True) as conn:
        for n in range(count):
            assert conn.execute("select %s::int", (n,)).fetchone() == (n,)

    def ended() -> str | None:
        records = trail(gw, access.session_prefix)
        if any(r["kind"] == "connection_end" for r in records):
            return str(records[0]["session_id"])
        return None

    session_id: str = wait_for(ended)
    return session_id


def exported(messages: list[SyslogMessage]) -> list[tuple[str, int, str, str | None]]:
    return [
        (
            m.structured_data[SD]["session_id"],
            int(m.structured_data[SD]["seq"]),
            m.msgid,
            m.json()["sql"],
        )
        for m in messages
    ]


def stored(gw: Gateway, session_id: str) -> list[tuple[str, int, str, str | None]]:
    return [(r["session_id"], r["seq"], r["kind"], r["sql"]) for r in trail(gw, session_id)]


def with_collector_down(
    tmp_path: Path, pg: TempCluster, pg_roles: Mapping[str, PgRole], **settings: object
) -> tuple[Gateway, int]:
    """A gateway exporting to a syslog collector on a port nobody listens on yet;
    the gateway and that port."""
    port = free_port()
    syslog = [{"host": LOOPBACK_HOST, "port": port}]
    gw = provision_gateway(
        tmp_path, pg, pg_roles, settings={"audit_export_syslog": syslog, **settings}
    )
    return gw, port


def test_every_record_reaches_syslog_and_the_file_once_in_order(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> None:
    export_file = tmp_path / "export" / "trail.jsonl"
    export_file.parent.mkdir()
    with SyslogReceiver() as receiver:
        gw = provision_gateway(
            tmp_path,
            pg,
            pg_roles,
            settings={
                "audit_export_syslog": [{"host": LOOPBACK_HOST, "port": receiver.port}],
                "audit_export_file": {"path": str(export_file)},
            },
        )
        try:
            session_id = run_statements(gw, 20)
            expected = stored(gw, session_id)
            assert [seq for _, seq, _, _ in expected] == list(range(1, len(expected) + 1))
            assert len(expected) == 22  # start, 20 statements, end
            messages = receiver.wait_for(len(expected))
            assert exported(messages) == expected
            lines = [json.loads(line) for line in export_file.read_text().splitlines()]
            assert [(r["session_id"], r["seq"], r["kind"], r["sql"]) for r in lines] == expected
            assert all(m.app_name == "pam" and m.version == 1 for m in messages)
        finally:
            gw.close()


def test_a_collector_that_is_down_blocks_nothing_and_catches_up_once_back(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> None:
    gw, port = with_collector_down(tmp_path, pg, pg_roles)
    try:
        # The collector is down: every statement is relayed and the whole trail
        # written all the same (nothing waits on the export).
        session_id = run_statements(gw, 50)
        expected = stored(gw, session_id)
        assert len(expected) == 52
        with SyslogReceiver(port=port) as receiver:
            messages = receiver.wait_for(len(expected), timeout=20)
        assert exported(messages) == expected
        events = {e.get("event") for e in gw.log_events()}
        assert "audit_export_unavailable" in events
    finally:
        gw.close()


def test_a_queue_too_small_for_the_outage_drops_counts_and_logs(
    pg: TempCluster, pg_roles: Mapping[str, PgRole], tmp_path: Path
) -> None:
    gw, port = with_collector_down(tmp_path, pg, pg_roles, audit_export_queue=5)
    try:
        session_id = run_statements(gw, 30)
        expected = stored(gw, session_id)
        assert len(expected) == 32  # the trail itself is whole
        dropped = [e for e in gw.log_events() if e.get("event") == "audit_export_dropped"]
        assert dropped and dropped[0]["queue"] == 5
        with SyslogReceiver(port=port) as receiver:
            messages = receiver.wait_for(5, timeout=20)
            time.sleep(0.5)
            messages = receiver.messages
        # the queue keeps the outage's first records and drops the new ones
        assert exported(messages) == expected[:5]
    finally:
        gw.close()
