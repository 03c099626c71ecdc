"""pgjdbc through `pam db access`: the driver DBeaver and DataGrip use.

``tests/clients/java/PamJdbcCheck.java`` is compiled once per session with the
installed JDK against Debian's ``libpostgresql-jdbc-java`` and run as a real JVM
per check; it prints one JSON object whose values are asserted here. The daemon,
the CLI and PostgreSQL 15 are real processes too.

A missing JDK or driver fails these tests (naming the package to install)
rather than skipping them: CI must run them.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import AccessProcess, Gateway, run_json_check

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    """These tests only open access sessions: one daemon serves the module."""
    return shared_gateway


JDBC_JAR = Path("/usr/share/java/postgresql.jar")
CHECK_SOURCE = Path(__file__).parents[1] / "clients" / "java" / "PamJdbcCheck.java"
CHECK_CLASS = "PamJdbcCheck"
#: Bound on one JVM run; the slowest check (cancel) ends well within it when it works.
RUN_TIMEOUT = 180

RunCheck = Callable[..., dict[str, Any]]


def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"the pgjdbc tests need `{name}`: install a JDK (apt-get install {package})",
            pytrace=False,
        )
    return path


@dataclass(frozen=True, slots=True)
class CompiledCheck:
    java: str
    classpath: str


@pytest.fixture(scope="session")
def jdbc_check(tmp_path_factory: pytest.TempPathFactory) -> CompiledCheck:
    """PamJdbcCheck compiled into a temporary directory, and how to run it."""
    javac = _require_tool("javac", "default-jdk-headless")
    java = _require_tool("java", "default-jdk-headless")
    if not JDBC_JAR.is_file():
        pytest.fail(
            f"the pgjdbc tests need {JDBC_JAR}: apt-get install libpostgresql-jdbc-java",
            pytrace=False,
        )
    classes = tmp_path_factory.mktemp("jdbc-classes")
    # -encoding: the source has non-ASCII literals, and javac otherwise follows the locale.
    args = [javac, "-encoding", "UTF-8", "-Xlint:all", "-Werror", "-d", str(classes)]
    args += ["-cp", str(JDBC_JAR), str(CHECK_SOURCE)]
    result = subprocess.run(args, capture_output=True, encoding="utf-8", timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"javac failed:\n{result.stdout}{result.stderr}"
    return CompiledCheck(java, f"{JDBC_JAR}:{classes}")


@pytest.fixture
def run_check(jdbc_check: CompiledCheck, gateway: Gateway) -> RunCheck:
    """Run one check of PamJdbcCheck against a `pam db access` port; its JSON result."""

    def run(access: AccessProcess, check: str, table: str | None = None) -> dict[str, Any]:
        url = (
            f"jdbc:postgresql://127.0.0.1:{access.port}/{access.database}"
            f"?user={access.user}&sslmode=disable&ApplicationName=pam-jdbc-{check}"
        )
        args = [jdbc_check.java, "-cp", jdbc_check.classpath, CHECK_CLASS, url, check]
        if table is not None:
            args.append(table)
        return run_json_check(gateway, check, args, timeout=RUN_TIMEOUT)

    return run


def unique_table(prefix: str) -> str:
    return f"jdbc_{prefix}_{secrets.token_hex(4)}"


def test_metadata_calls_a_gui_makes_on_connect_see_the_table_and_its_columns(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    table = unique_table("meta")
    out = run_check(access, "metadata", table)
    assert out["product"] == "PostgreSQL"
    assert out["user"] == "app_scram"
    assert "public" in out["schemas"]
    assert "information_schema" in out["schemas"]
    assert out["catalogs"] == ["appdb"]
    assert ["public", table, "TABLE", "made by PamJdbcCheck"] in out["tables"]
    assert all(row[0] == "public" and row[2] == "TABLE" for row in out["tables"])
    # (position, name, TYPE_NAME, java.sql.Types code, IS_NULLABLE)
    assert out["columns"] == [
        [1, "id", "int4", 4, "NO"],
        [2, "name", "text", 12, "NO"],
        [3, "amount", "numeric", 2, "YES"],
        [4, "created_at", "timestamptz", 93, "YES"],
        [5, "payload", "jsonb", 1111, "YES"],
        [6, "tags", "_text", 2003, "YES"],
    ]
    assert out["primary_key"] == ["id"]


def test_prepared_statements_carry_typed_and_unicode_parameters_across_prepare_threshold(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "prepared", unique_table("prep"))
    text = "Grüße, 世界 🐘 'quoted' \\ back"
    amount = "12345678901234567890.0123456789"
    # 8 runs: pgjdbc switches from the unnamed statement to a named one at the 5th.
    expected = [
        [
            i,
            f"123456789012345678{90 + i}.0123456789",
            f"{text} #{i}",
            f"2024-03-{i:02d}T18:29:58.123456Z",
            f"2024-01-{i:02d}",
            i % 2 == 0,
            str(2**63 - 1 - i),
            True,
        ]
        for i in range(1, 9)
    ]
    assert out["rows"] == expected
    assert out["named_statements"] == 1
    assert out["stored"] == [[1, text, amount, "2024-02-29T18:29:58.123456Z", len(text.encode())]]


def test_a_batch_of_1000_inserts_is_pipelined_and_every_row_lands(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "batch", unique_table("batch"))
    assert out == {
        "counts_length": 1000,
        "counts_distinct": [1],
        "count": 1000,
        "sum": 500500,
        "min_label": "row 1",
        "max_id": 1000,
        "matching_labels": 1000,
    }


def test_an_error_in_the_middle_of_a_batch_fails_it_and_rollback_leaves_nothing(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "batch_error", unique_table("batcherr"))
    assert out == {
        "raised": True,
        "sqlstate": "23505",
        "next_sqlstate": "23505",
        "count_after_rollback": 0,
    }


def test_rollback_and_savepoint_discard_uncommitted_rows(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "rollback", unique_table("rollback"))
    assert out == {"in_transaction": 1, "after_rollback": 0, "committed_rows": [[2, "kept"]]}


def test_set_fetch_size_reads_5000_rows_in_order_through_a_suspended_portal(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "fetch_size")
    assert out == {
        "open_portals_midway": 1,
        "count": 5000,
        "sum": 5000 * 5001 // 2,
        "in_order": True,
        "first": "row 1",
        "last": "row 5000",
        "open_portals_after": 0,
    }


def test_statement_cancel_stops_pg_sleep_and_the_connection_stays_usable(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "cancel")
    assert out["raised"] is True
    assert out["sqlstate"] == "57014"
    assert out["message"] == "ERROR: canceling statement due to user request"
    assert out["after"] == "still here"
    assert out["same_backend"] is True
    assert out["observer_after"] == "observer still here"
