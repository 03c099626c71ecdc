"""`pam sessions export` and `pam audit verify` in process, over the real review router.

The daemon here is the control API (``create_app``) over a real SQLite store;
the CLI's client reaches it through an httpx transport that runs each request
through the ASGI app on an event loop of its own. What the export writes is compared byte for byte
with what the CLI wrote before the export moved to the server: the records of
``/trail`` pages, through the same writer.
"""

from __future__ import annotations

import asyncio
import csv
import io
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from fastapi import FastAPI

from cli.client import ApiClient
from cli.export import ExportCounter
from cli.main import cli
from gateway.app.api import create_app, review_access
from gateway.app.runtime import StoreThread
from gateway.audit.records import AuditEvent, Parameter
from gateway.audit.review import ExportWriter
from gateway.config import ClientConfig
from gateway.credentials.secretbox import SecretBox
from gateway.identity.hashing import token_digest
from gateway.identity.principals import ALL_PROJECTS, PrincipalKind, Role
from gateway.identity.service import IdentityService
from gateway.store import Store

TOKEN = "t0ken-" + "e" * 32
CONFIG = ClientConfig(api_url="http://pam.test:7745", token=TOKEN)
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
CONNECTION = "c" * 32


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class WatchedStore:
    """The store, noting each call: its name, its keywords, and whether it ran on an
    event loop's thread (it must not: store reads belong on the store thread)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: list[tuple[str, dict[str, Any], bool]] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs, _on_event_loop()))
            return attr(*args, **kwargs)

        return call


class Served:
    """What the review router uses of the composed gateway."""

    def __init__(self, store: WatchedStore) -> None:
        self.store = store
        self.db = StoreThread()
        self.audit_writer = None
        self.identity = IdentityService(store, self.db, session_ttl=timedelta(hours=1))  # type: ignore[arg-type]

    def live_connection_count(self, session_id: str) -> int:
        return 0


@dataclass
class Daemon:
    store: WatchedStore
    sessions: list[str]  # oldest first
    transport: httpx.MockTransport

    def client(self) -> ApiClient:
        return ApiClient(CONFIG, transport=self.transport)

    def run(self, *args: str) -> Result:
        return CliRunner().invoke(cli, list(args), obj=self.client, prog_name="pam")


def _statements(session_id: str, n: int) -> list[AuditEvent]:
    # Data a CSV must quote (comma, quote, newline), non-ASCII, floats, parameters.
    return [
        AuditEvent(
            session_id=session_id,
            connection_id=CONNECTION,
            kind="statement",
            occurred_at=T0 + timedelta(seconds=k),
            protocol="extended",
            sql=f"select $1, 'a,\"b\"'\n  -- é {k}",
            parameters=(Parameter(1, 25, "text", f'v"{k},\n'), Parameter(2, 23, "null", None)),
            command_tag="SELECT 1",
            rows=1,
            status="ok" if k % 3 else "error",
            sqlstate=None if k % 3 else "22012",
            error_message=None if k % 3 else "division by zero",
            duration_ms=0.1 * k,
        )
        for k in range(n)
    ]


def _forward(app: FastAPI) -> httpx.MockTransport:
    async def send(request: httpx.Request) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=CONFIG.api_url) as http:
            return await http.request(
                request.method,
                request.url.path,
                params=request.url.params,
                headers={"Authorization": request.headers["Authorization"]},
            )

    def handle(request: httpx.Request) -> httpx.Response:
        answer = asyncio.run(send(request))
        kept = {k: v for k, v in answer.headers.items() if k != "content-length"}
        return httpx.Response(answer.status_code, headers=kept, content=answer.content)

    return httpx.MockTransport(handle)


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    # Small export pages, so a session takes several keyed reads.
    monkeypatch.setattr(review_access, "EXPORT_PAGE", 4)
    with Store.open(
        f"sqlite:///{tmp_path / 'state.db'}", SecretBox(secrets.token_bytes(32))
    ) as store:
        store.add_resource("prod", "db.internal", 5432, "app")
        store.add_account("prod", "ro", "app_reader", "pw-" + secrets.token_hex(8))
        # The caller: an admin of every project, by the client's token.
        ann = store.add_principal("ann", kind=PrincipalKind.USER, roles={ALL_PROJECTS: Role.ADMIN})
        store.add_token(ann.id, kind="machine", digest=token_digest(TOKEN), expires_at=None)
        ids = []
        for count in (10, 3):
            session = store.create_session(
                requester="ann",
                resource="prod",
                account="ro",
                listen_host="127.0.0.1",
                expires_at=datetime(2100, 1, 1, tzinfo=UTC),
            )
            store.append_audit(_statements(session.id, count))
            ids.append(session.id)
        watched = WatchedStore(store)
        served = Served(watched)
        app = create_app(served)  # type: ignore[arg-type]
        yield Daemon(watched, ids, _forward(app))
        served.db.shutdown()


def export_as_before(client: ApiClient, session_ids: list[str], fmt: str) -> bytes:
    """What the CLI wrote before the export moved server-side: /trail pages, the writer."""
    out = io.StringIO()
    writer = ExportWriter(out, fmt)
    for session_id in session_ids:
        answer = client.trail_page(session_id, page=1, page_size=1000)
        while True:
            writer.write(answer["records"])
            if answer["next_cursor"] is None:
                break
            answer = client.trail_page(session_id, cursor=answer["next_cursor"], page_size=1000)
    return out.getvalue().encode()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_session_export_is_byte_for_byte_what_the_cli_wrote_before(
    daemon: Daemon, fmt: str
) -> None:
    first = daemon.sessions[0]
    with daemon.client() as client:
        expected = export_as_before(client, [first], fmt)
    daemon.store.calls.clear()

    result = daemon.run("sessions", "export", first[:8], "--format", fmt)

    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == expected
    reads = [kw for name, kw, _ in daemon.store.calls if name == "list_audit"]
    # Keyed pages of four (10 records: 4, 4, 2), never a skip through earlier pages.
    assert [(kw["after_seq"], kw["limit"]) for kw in reads] == [(0, 4), (4, 4), (8, 4)]
    assert not any(on_loop for _, _, on_loop in daemon.store.calls)


def test_a_window_export_to_a_file_counts_its_records_and_sessions(
    daemon: Daemon, tmp_path: Path
) -> None:
    target = tmp_path / "window.csv"
    with daemon.client() as client:
        expected = export_as_before(client, daemon.sessions, "csv")

    result = daemon.run(
        "sessions", "export", "--since", "2024-06-01", "--format", "csv", "--output", str(target)
    )

    assert result.exit_code == 0, result.output
    assert target.read_bytes() == expected  # oldest session first
    assert result.stdout.strip() == f"Exported 13 records of 2 sessions to {target}."
    assert not any(on_loop for _, _, on_loop in daemon.store.calls)


def test_an_export_refused_before_its_first_byte_is_one_error_line_and_no_file(
    daemon: Daemon, tmp_path: Path
) -> None:
    target = tmp_path / "nothing.jsonl"
    result = daemon.run("sessions", "export", "0123abcd", "--output", str(target))
    assert result.exit_code == 1
    assert result.stderr == "error: session '0123abcd' not found\n"
    assert not target.exists()


def test_verify_reports_every_session_checked_in_one_request(daemon: Daemon) -> None:
    result = daemon.run("audit", "verify")
    assert result.exit_code == 0, result.output
    assert result.stdout == "audit trail intact: 2 sessions checked\n"


# --- counting the records of a stream ------------------------------------------------------


def _chunkings(data: bytes) -> list[Callable[[bytes], list[bytes]]]:
    whole = [data]
    bytewise = [data[n : n + 1] for n in range(len(data))]
    sevens = [data[n : n + 7] for n in range(0, len(data), 7)]
    return [lambda _: whole, lambda _: bytewise, lambda _: sevens]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_the_record_count_is_exact_however_the_stream_is_cut(fmt: str) -> None:
    records = [
        {"seq": 1, "sql": 'a "quoted", multi\nline\r\nstatement', "detail": {"k": '"\n"'}},
        {"seq": 2, "sql": "plain é"},
        {"seq": 3, "sql": '""'},
    ]
    out = io.StringIO()
    ExportWriter(out, fmt).write(records)
    data = out.getvalue().encode()
    if fmt == "csv":
        assert len(list(csv.reader(io.StringIO(out.getvalue())))) == 4  # header + 3
    for chunking in _chunkings(data):
        counter = ExportCounter(fmt)
        for chunk in chunking(data):
            counter.feed(chunk)
        assert counter.records == 3
