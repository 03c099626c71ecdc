"""A long session: 100,000 statements are all recorded and the daemon's memory
stays bounded while the audit writer keeps up (or slows the session down)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from harness import Gateway, current_rss_kib, peak_rss_kib

pytestmark = pytest.mark.integration

STATEMENTS = 100_000
CLIENTS = 4
#: The daemon's growth over the whole session: the audit backlog is capped
#: (50,000 events, a few hundred bytes each) and every record is written; a leak
#: per statement (even 1 KB) would blow through this.
GROWTH_LIMIT_KIB = 64 * 1024


def _pgbench() -> str:
    found = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
    if not Path(found).exists():
        pytest.fail("pgbench is missing: apt-get install postgresql-15")
    return found


def test_a_session_of_100000_statements_is_recorded_whole_with_bounded_memory(
    gateway: Gateway,
) -> None:
    access = gateway.access().wait_ready()
    assert gateway.proc is not None
    pid = gateway.proc.pid
    script = gateway.root / "one.sql"
    script.write_text("select :client_id, 1;\n")
    before = current_rss_kib(pid)
    result = subprocess.run(
        [
            _pgbench(),
            "-n",
            "-M",
            "prepared",
            "-c",
            str(CLIENTS),
            "-j",
            "2",
            "-t",
            str(STATEMENTS // CLIENTS),
            "-f",
            str(script),
            access.url,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert f"number of transactions actually processed: {STATEMENTS}/{STATEMENTS}" in result.stdout
    growth = peak_rss_kib(pid) - before
    with gateway.api() as api:
        detail = api.get(f"/v1/sessions/{access.session_prefix}")
    assert detail["statements"] == STATEMENTS
    assert growth < GROWTH_LIMIT_KIB, f"daemon peak RSS grew by {growth} KiB"
    verify = gateway.cli("audit", "verify", access.session_prefix)
    assert "intact" in verify.stdout
