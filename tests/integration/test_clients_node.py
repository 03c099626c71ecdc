"""node-postgres through `pam db access`.

``tests/clients/node/check.js`` runs in a real Node.js process per check with the
``pg`` and ``pg-query-stream`` versions pinned by the committed
``package-lock.json``; it prints one JSON object whose values are asserted here.
The daemon, the CLI and PostgreSQL 15 are real processes too.

A missing ``node``/``npm`` fails these tests (naming what to install) rather than
skipping them: CI must run them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import AccessProcess, Gateway, run_json_check

pytestmark = pytest.mark.integration


@pytest.fixture
def gateway(shared_gateway: Gateway) -> Gateway:
    """These tests only open access sessions: one daemon serves the module."""
    return shared_gateway


NODE_DIR = Path(__file__).parents[1] / "clients" / "node"
#: Bound on one node run or on `npm ci`.
RUN_TIMEOUT = 300

RunCheck = Callable[[AccessProcess, str], dict[str, Any]]


def _require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"the node-postgres tests need `{name}`: apt-get install nodejs npm", pytrace=False
        )
    return path


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary, with tests/clients/node/node_modules installed from the lock file."""
    node = _require_tool("node")
    # Under pytest-xdist another worker may be installing the same directory:
    # one `npm ci` at a time (a lock on the lock file), the others then see it done.
    with (NODE_DIR / "package-lock.json").open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (NODE_DIR / "node_modules").is_dir():
            npm = _require_tool("npm")
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
            )
            assert result.returncode == 0, (
                f"npm ci in {NODE_DIR} failed (it needs the npm registry):\n"
                f"{result.stdout}{result.stderr}"
            )
    return node


@pytest.fixture
def run_check(node: str, gateway: Gateway) -> RunCheck:
    """Run one check of check.js against a `pam db access` port; its JSON result."""

    def run(access: AccessProcess, check: str) -> dict[str, Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGHOST="127.0.0.1",
            PGPORT=str(access.port),
            PGUSER=access.user,
            PGDATABASE=access.database,
        )
        return run_json_check(
            gateway, check, [node, "check.js", check], timeout=RUN_TIMEOUT, cwd=NODE_DIR, env=env
        )

    return run


def test_parameterised_queries_bind_every_placeholder_including_ten_and_up(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "params")
    label = "Grüße 世界 🐘"
    assert out == {
        "sum": 42,
        "label": label,
        "bytes": len(label.encode()),
        "all": [f"v{i}" for i in range(1, 13)],
        "tail": "v10|v11|v12|v1",
        "named": [49, 64],
        "named_statements": 1,
        "error": {"code": "22012", "message": "division by zero"},
        "after": "here",
    }


def test_a_pool_of_ten_answers_fifty_concurrent_queries_each_with_its_own_argument(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "pool")
    assert out == {"returned": list(range(50)), "distinct_backends": 10, "opened": 10}
    detail = gateway.cli_json("sessions", "show", access.session_prefix)
    names = [c["application_name"] for c in detail["connections"]]
    assert names == ["pam-node-pool"] * 10


def test_a_streamed_result_of_100000_rows_arrives_complete_and_in_order(
    gateway: Gateway, run_check: RunCheck
) -> None:
    access = gateway.access().wait_ready()
    out = run_check(access, "stream")
    assert out == {
        "count": 100_000,
        "sum": 100_000 * 100_001 // 2,
        "in_order": True,
        "first": "row 1",
        "last": "row 100000",
        "after": 10,
    }


def test_a_client_that_ends_before_its_startup_packet_sees_no_error(
    gateway: Gateway, run_check: RunCheck
) -> None:
    # node-postgres's quick-disconnect: Terminate goes out before the startup
    # packet, and, as PostgreSQL does, pam closes without answering it.
    access = gateway.access().wait_ready()
    assert run_check(access, "quick_disconnect") == {"error": None}
