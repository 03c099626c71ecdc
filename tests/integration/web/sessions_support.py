"""What the Sessions pages' tests share: grants opened through the API, and
psycopg connections to them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
from conftest import Console
from harness import wait_for


def open_grant(console: Console, user: str, *, account: str = "scram") -> dict[str, Any]:
    """A grant on prod opened by *user* through the API (as its CLI would)."""
    with console.api_as(user) as api:
        answer = api.post(
            "/v1/access",
            json={"resource": "prod", "account": account, "duration_seconds": 1200},
        )
    assert answer.status_code == 201, answer.text
    grant: dict[str, Any] = answer.json()
    return grant


#: How often a held grant tells the daemon its holder is still there (the
#: daemon ends an API grant whose holder falls silent for a few seconds).
HEARTBEAT_SECONDS = 1.0


@contextlib.contextmanager
def held_grant(console: Console, user: str, *, account: str = "scram") -> Iterator[dict[str, Any]]:
    """A grant opened by *user* and kept alive by heartbeats, as `pam db access`
    keeps its own, until the block ends (then it is ended, if still live)."""
    grant = open_grant(console, user, account=account)
    done = threading.Event()

    def beat() -> None:
        with console.api_as(user) as api:
            while not done.wait(HEARTBEAT_SECONDS):
                with contextlib.suppress(httpx.HTTPError):
                    api.post(f"/v1/access/{grant['id']}/heartbeat")

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        yield grant
    finally:
        done.set()
        beating.join(30)
        with contextlib.suppress(httpx.HTTPError), console.admin_api() as api:
            api.post(f"/v1/access/{grant['id']}/end")


def connect(grant: dict[str, Any], application: str = "web-test") -> psycopg.Connection[Any]:
    return psycopg.connect(
        f"host=127.0.0.1 port={grant['listen_port']} user={grant['username']}"
        f" dbname={grant['database']} sslmode=disable application_name={application}",
        autocommit=True,
    )


def statements(console: Console, session_id: str) -> list[dict[str, Any]]:
    with console.admin_api() as api:
        answer = api.get(f"/v1/sessions/{session_id}/audit", params={"kind": "statement"})
    answer.raise_for_status()
    found: list[dict[str, Any]] = answer.json()
    return found


def wait_recorded(console: Console, session_id: str, sql: str) -> dict[str, Any]:
    """The statement *sql* once the trail holds it (a bounded wait)."""
    found: dict[str, Any] = wait_for(
        lambda: next((r for r in statements(console, session_id) if r["sql"] == sql), None)
    )
    return found


def end_grant(console: Console, session_id: str) -> None:
    with console.admin_api() as api:
        api.post(f"/v1/access/{session_id}/end").raise_for_status()


def session_of(console: Console, session_id: str) -> dict[str, Any]:
    with console.admin_api() as api:
        answer = api.get(f"/v1/sessions/{session_id}")
    answer.raise_for_status()
    found: dict[str, Any] = answer.json()["session"]
    return found
