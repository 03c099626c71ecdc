"""A long session: 1,000,000 statements are all recorded, in order, and the
daemon's memory stays bounded while the audit writer keeps up (or slows the
session down). Issue 12's volume check: pgbench's select-only workload through
one session, several clients."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest
from conftest import APP_DATABASE
from harness import Gateway, current_rss_kib, peak_rss_kib, store_path, wait_for

from gateway.audit.batch import decode_records
from gateway.testing.pgcluster import PgRole, TempCluster

pytestmark = pytest.mark.integration

STATEMENTS = 1_000_000
CLIENTS = 4
#: The daemon's growth over the whole session: the audit journal's backlog is
#: capped in bytes and every record is written; a leak per statement (even 100
#: bytes) would blow through this.
GROWTH_LIMIT_KIB = 64 * 1024
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
PGBENCH_SCALE_QUERY = "select count(*) from pgbench_branches"


def _pgbench() -> str:
    found = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
    if not Path(found).exists():
        pytest.fail("pgbench is missing: apt-get install postgresql-15")
    return found


def _trail(gateway: Gateway, session_id: str) -> list[list[object]]:
    """Every record of the session, read from the store's batches in seq order."""
    with sqlite3.connect(f"file:{store_path(gateway)}?mode=ro", uri=True) as db:
        blobs = db.execute(
            "SELECT records FROM audit_batches WHERE session_id = ? ORDER BY first_seq",
            (session_id,),
        ).fetchall()
    return [record for (blob,) in blobs for record in decode_records(blob)]


@pytest.mark.timeout(1800)
def test_a_session_of_a_million_statements_is_recorded_whole_in_order_with_bounded_memory(
    gateway: Gateway, pg: TempCluster, pg_roles: Mapping[str, PgRole]
) -> None:
    role = pg_roles["scram"]
    direct = pg.dsn(role.name, role.password, APP_DATABASE)
    init = subprocess.run(
        [_pgbench(), "-i", "-q", "-s", "1", direct], capture_output=True, text=True, timeout=300
    )
    assert init.returncode == 0, init.stderr
    access = gateway.access().wait_ready()
    assert gateway.proc is not None
    pid = gateway.proc.pid
    before = current_rss_kib(pid)
    per_client = STATEMENTS // CLIENTS
    result = subprocess.run(
        [
            _pgbench(),
            "-n",
            "-S",
            "-M",
            "prepared",
            "-c",
            str(CLIENTS),
            "-j",
            "2",
            "-t",
            str(per_client),
            access.url,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr
    assert f"number of transactions actually processed: {STATEMENTS}/{STATEMENTS}" in result.stdout
    growth = peak_rss_kib(pid) - before
    with gateway.api() as api:
        # A read waits (bounded) for the writer; at this volume it may still be
        # catching up, which is allowed: the session was slowed, nothing dropped.
        detail = wait_for(
            lambda: (
                (d := api.get(f"/v1/sessions/{access.session_prefix}"))["statements"] >= STATEMENTS
                and d
            ),
            timeout=600,
            interval=1.0,
        )
    assert growth < GROWTH_LIMIT_KIB, f"daemon peak RSS grew by {growth} KiB"

    records = _trail(gateway, detail["session"]["id"])
    # seq, kind, occurred_at, connection_id, protocol, sql, ...
    assert [r[0] for r in records] == list(range(1, len(records) + 1))
    statements = [r for r in records if r[1] == "statement"]
    assert len(statements) == detail["statements"]
    # Besides the workload, pgbench asks the scale and the partitioning of
    # pgbench_accounts once, on a connection of its own.
    selects = [r for r in statements if r[5] == SELECT]
    others = [str(r[5]) for r in statements if r[5] != SELECT]
    assert len(others) == 2 and others[0] == PGBENCH_SCALE_QUERY, others
    assert "pgbench_accounts" in others[1] and "partstrat" in others[1], others
    assert len(selects) == STATEMENTS
    assert {r[11] for r in statements} == {"ok"}
    per_connection = Counter(r[3] for r in selects)
    assert sorted(per_connection.values()) == [per_client] * CLIENTS
    # In order: each connection's records start, run and end in time order.
    last: dict[object, tuple[str, int]] = {}
    for record in records:
        kind, at, connection = record[1], record[2], record[3]
        seen = last.get(connection)
        if kind == "connection_start":
            assert seen is None
        else:
            assert seen is not None and seen[0] != "connection_end"
            assert at >= seen[1]
        last[connection] = (str(kind), int(at))  # type: ignore[call-overload]
    assert {kind for kind, _ in last.values()} == {"connection_end"}
    assert len(last) == CLIENTS + 1
    verify = gateway.cli("audit", "verify", access.session_prefix)
    assert "intact" in verify.stdout
