"""`pam sessions`: list, show and export access sessions and their statements.

The rendering is :mod:`cli.review`'s and :mod:`cli.timeline`'s, the export's
output :mod:`cli.export`'s; these commands parse options, ask the typed client
and hand over.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import click

from cli.client import ApiClient, ExportStream
from cli.commands import api_client, json_option
from cli.export import write_export
from cli.render import console, print_json, printable, table
from cli.review import (
    API_MAX_PAGE,
    DEFAULT_PAGE_SIZE,
    SESSION_COLUMNS,
    When,
    closed_pipe_ends_quietly,
    iter_statement_pages,
    paging,
    session_rows,
)
from cli.timeline import show_timeline


@click.group()
def sessions() -> None:
    """Review access sessions: their connections and every statement."""


@sessions.command("list")
@click.option("--resource", "resource_name", default=None, help="Only sessions on this resource.")
@click.option("--account", "account_name", default=None, help="Only sessions as this account.")
@click.option("--user", "requester", default=None, help="Only sessions of this requester.")
@click.option("--since", type=When(), default=None, help="Started at or after: 7d, 12h, ISO.")
@click.option("--until", type=When(), default=None, help="Started before: 7d, 12h, ISO.")
@click.option("--active", is_flag=True, help="Only sessions that have not ended.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@json_option
def sessions_list(
    resource_name: str | None,
    account_name: str | None,
    requester: str | None,
    since: datetime | None,
    until: datetime | None,
    active: bool,
    limit: int,
    as_json: bool,
) -> None:
    """List access sessions, newest first.

    WHEN is relative (7d, 12h, 30m: that long ago) or an ISO-8601 date or
    datetime (local time unless it names a zone).
    """
    with api_client() as client:
        items = client.list_sessions(
            active=True if active else None,
            limit=limit,
            resource=resource_name,
            account=account_name,
            requester=requester,
            since=since,
            until=until,
        )
    if as_json:
        print_json(items)
    else:
        table(None, SESSION_COLUMNS, session_rows(items))


@sessions.command("show")
@click.argument("session_id")
@click.option("--page", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--page-size",
    type=click.IntRange(1, API_MAX_PAGE),
    default=DEFAULT_PAGE_SIZE,
    show_default=True,
    help="Statements per page.",
)
@click.option("--all", "show_all", is_flag=True, help="Every statement, not one page.")
@json_option
def sessions_show(
    session_id: str, page: int, page_size: int, show_all: bool, as_json: bool
) -> None:
    """Show a session: its connections, then its statements in order (paged)."""
    with api_client() as client:
        detail = client.get_session(session_id)
        full_id = detail["session"]["id"]
        view = paging(int(detail.get("statements") or 0), None if show_all else page, page_size)
        first = None
        if not show_all:
            first = client.statement_page(full_id, page=page, page_size=page_size)["records"]
        if not as_json:
            with closed_pipe_ends_quietly():
                show_timeline(console, client, detail, view, first)
            return
        if first is None:
            first = [r for p in iter_statement_pages(client, full_id) for r in p]
    print_json(
        {
            "session": detail["session"],
            "connections": detail["connections"],
            "live_connections": detail["live_connections"],
            "statement_count": view.total,
            "page": view.page,
            "pages": view.pages,
            "page_size": view.page_size,
            "statements": first,
        }
    )


@sessions.command("revoke")
@click.argument("session_id", metavar="ID")
@click.option("--reason", default=None, help="Why (shown to the cut connections, recorded).")
def sessions_revoke(session_id: str, reason: str | None) -> None:
    """End a live session now: its connections get a FATAL naming you and the reason."""
    with api_client() as client:
        ended = client.revoke_session(session_id, reason)
    console.print(
        f"Revoked session {printable(ended['id'][:8])} ({printable(ended['end_detail'] or '')})",
        markup=False,  # the reason is anyone's text
    )


@sessions.command("export")
@click.argument("session_id", required=False)
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option("--since", type=When(), default=None, help="Sessions started at or after WHEN.")
@click.option("--until", type=When(), default=None, help="Sessions started before WHEN.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Write here instead of stdout.",
)
def sessions_export(
    session_id: str | None,
    fmt: str,
    since: datetime | None,
    until: datetime | None,
    output: Path | None,
) -> None:
    """Export every audit record of a session, or of every session started in a window.

    One JSON object per line (jsonl) or CSV with a fixed header (parameters and
    detail as JSON text). Streams page by page, oldest session first.
    """
    if session_id is not None and (since is not None or until is not None):
        raise click.UsageError("--since/--until select sessions; leave them out with SESSION_ID")
    with api_client() as client, _export(client, session_id, fmt, since, until) as stream:
        if output is None:
            with closed_pipe_ends_quietly():
                sys.stdout.flush()
                write_export(stream, fmt, sys.stdout.buffer)
            return
        with output.open("wb") as handle:
            records = write_export(stream, fmt, handle)
    count = stream.sessions
    console.print(
        f"Exported {records} records of {count} session{'s' if count != 1 else ''} to {output}."
    )


@contextmanager
def _export(
    client: ApiClient,
    session_id: str | None,
    fmt: str,
    since: datetime | None,
    until: datetime | None,
) -> Iterator[ExportStream]:
    # The daemon picks the sessions, reads, orders and encodes; this only asks.
    if session_id is not None:
        with client.export_session(session_id, fmt=fmt) as stream:
            yield stream
    else:
        with client.export_window(fmt=fmt, since=since, until=until) as stream:
            yield stream
