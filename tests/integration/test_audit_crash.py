"""Nothing executed goes unrecorded, even when the daemon is killed with -9 (issue 12).

A DELETE is sent through the gateway and held by a lock another connection
keeps; the daemon and its audit writer process are killed (the whole process
group, as an OOM killer or a power button on a container would); the lock is
released and the DELETE commits on the server with nobody left to see its
outcome. The next start of the daemon must find it in the journal and record it
as ``incomplete`` with the reason, end its connection as ``gateway_crash``, and
leave a trail that verifies.

Real daemon, CLI, PostgreSQL 15 and psycopg; waits are bounded polls.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import psycopg
import pytest
from conftest import APP_DATABASE
from harness import Gateway, unique, wait_for

from gateway.audit.journal import JOURNAL_DIR, list_runs
from gateway.testing.pgcluster import TempCluster

pytestmark = pytest.mark.integration

WAIT_SECONDS = 30.0


def _trail(gateway: Gateway, session: str) -> list[dict[str, Any]]:
    with gateway.api() as client:
        records: list[dict[str, Any]] = client.get(f"/v1/sessions/{session}/audit", limit=10_000)
    return records


@pytest.mark.timeout(240)
def test_a_statement_running_when_the_daemon_is_killed_is_on_record_as_incomplete(
    gateway: Gateway, pg: TempCluster
) -> None:
    # A process group of its own, so that -9 reaches the writer process too.
    gateway.stop()
    gateway.start(own_process_group=True)
    table = unique("crash_delete")
    access = gateway.access().wait_ready()
    conn = psycopg.connect(access.dsn(), autocommit=True)
    conn.execute(f"create table {table} (id int)")
    conn.execute(f"insert into {table} select generate_series(1, 10)")
    backend = conn.info.backend_pid
    delete = f"delete from {table} where id > 0"

    holder = psycopg.connect(pg.superuser_dsn(APP_DATABASE))
    holder.execute(f"lock table {table} in access exclusive mode")
    failures: list[BaseException] = []

    def run_delete() -> None:
        try:
            conn.execute(delete)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run_delete, name="held-delete")
    thread.start()
    try:
        wait_for(
            lambda: (
                pg.admin_sql(f"select wait_event_type from pg_stat_activity where pid = {backend}")
                == "Lock"
            ),
            timeout=WAIT_SECONDS,
        )
        assert gateway.proc is not None
        os.killpg(gateway.proc.pid, signal.SIGKILL)
        assert gateway.stop() == -signal.SIGKILL
        # Only now can the DELETE run: it commits with no gateway left to see it.
        holder.commit()
        wait_for(
            lambda: pg.admin_sql(f"select count(*) from {table}", APP_DATABASE) == "0",
            timeout=WAIT_SECONDS,
        )
    finally:
        holder.close()
        thread.join(WAIT_SECONDS)
        conn.close()
    assert failures and isinstance(failures[0], psycopg.OperationalError)
    access.proc.kill()
    access.wait()

    gateway.start()

    def recorded() -> list[dict[str, Any]] | None:
        records = _trail(gateway, access.session_prefix)
        return records if any(r.get("sql") == delete for r in records) else None

    records = wait_for(recorded, timeout=WAIT_SECONDS)
    statement = [r for r in records if r["kind"] == "statement"]
    assert [(r["sql"], r["status"]) for r in statement] == [
        (f"create table {table} (id int)", "ok"),
        (f"insert into {table} select generate_series(1, 10)", "ok"),
        (delete, "incomplete"),
    ]
    assert "the pam gateway stopped before the outcome" in statement[-1]["error_message"]
    ends = [r for r in records if r["kind"] == "connection_end"]
    assert [e["detail"]["end_reason"] for e in ends] == ["gateway_crash"]
    assert gateway.cli("audit", "verify", access.session_prefix).returncode == 0
    # The killed run's journal is gone once it is in the trail: only the new run's is left.
    assert len(list_runs(gateway.home / JOURNAL_DIR)) == 1
