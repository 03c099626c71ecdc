"""Reviewing access sessions and their audit trail: what `pam sessions` and `pam audit` show.

Role: the terminal side of the review commands (:mod:`cli.commands`), kept thin
over the typed control API client (:class:`cli.client.ApiClient`): times on the
command line, the sessions list and search tables, and following the server's
cursors. The page of one session is :mod:`cli.timeline`'s, the streamed export
:mod:`cli.export`'s. Paging, export columns and formats and type names are
:mod:`gateway.audit.review`'s, shared with the server (and a future web page);
nothing here reads the store or recomputes anything the daemon already decided.

Invariants:

* One request per page, whatever the page number: the server finds a page by a
  keyed cursor and answers the cursor of the next one, which is passed back
  unchanged (never built here). ``--all`` prints pages as they arrive.
* Times are shown in the viewer's local zone; JSON, JSONL and CSV keep the API's
  ISO-8601 UTC. A time the user types without a zone is local time; a relative
  one (``7d``) is :func:`cli.access.parse_duration`'s.
* Text from outside (SQL, parameters, error messages, requester and application
  names) is printed through :func:`cli.render.printable` as plain
  :class:`rich.text.Text`, never as markup and never with a raw control
  character, so a statement cannot restyle, hide or clear the review output.
* Tables fit: boxed when they fit the terminal, one block per record when they
  do not, plain aligned lines when stdout is not a terminal (:func:`cli.render.grid`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import click
from rich.console import RenderableType

from cli.access import parse_duration
from cli.client import ApiClient, AuditRecordJson
from cli.render import grid, human_duration, local_time, plain, printable

# Re-exported: the commands take paging from here.
from gateway.audit.chain import ACCESS_TRAIL, ROTATION_RECORD
from gateway.audit.review import API_MAX_PAGE as API_MAX_PAGE
from gateway.audit.review import DEFAULT_PAGE_SIZE as DEFAULT_PAGE_SIZE
from gateway.audit.review import EXPORT_PAGE
from gateway.audit.review import Paging as Paging
from gateway.audit.review import paging as paging

_WHITESPACE: Final = re.compile(r"\s+")

STATUS_STYLES: Final = {
    "ok": "green",
    "error": "bold red",
    "cancelled": "bold yellow",
    "skipped": "yellow",
    "incomplete": "magenta",
}


# --- times ---------------------------------------------------------------------------


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO-8601 date or datetime, or a duration ago (``7d``, ``12h``, ``1h30m``).

    The duration is :func:`cli.access.parse_duration`'s (the one parser of
    ``pam db access --duration`` too). A date or datetime without a zone is
    local time. Returns an aware UTC datetime.
    """
    value = text.strip()
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        try:
            seconds = parse_duration(re.sub(r"\s+", "", value))
        except click.BadParameter:
            raise click.BadParameter(
                f"{text!r} is not a time: use 7d, 12h, 30m (ago) or an ISO-8601 date"
                " or datetime such as 2024-06-01 or 2024-06-01T14:30"
            ) from None
        return (now or datetime.now(UTC)).astimezone(UTC) - timedelta(seconds=seconds)
    if moment.tzinfo is None:
        moment = moment.astimezone()  # the viewer's local time
    return moment.astimezone(UTC)


class When(click.ParamType[datetime]):
    """A click parameter for :func:`parse_when`."""

    name = "WHEN"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_when(str(value))
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


# --- paging the API ------------------------------------------------------------------


def iter_statement_pages(
    client: ApiClient, session_id: str, *, page_size: int = EXPORT_PAGE
) -> Iterator[list[AuditRecordJson]]:
    """Every statement of a session in seq order, a page at a time, each page read
    by the cursor the server gave with the one before."""
    answer = client.statement_page(session_id, page=1, page_size=page_size)
    while True:
        if answer["records"]:
            yield answer["records"]
        cursor = answer["next_cursor"]
        if cursor is None:
            return
        answer = client.statement_page(session_id, cursor=cursor, page_size=page_size)


# --- text ------------------------------------------------------------------------------


def one_line(text: str | None) -> str:
    return _WHITESPACE.sub(" ", text or "").strip()


def truncate(text: str, width: int) -> str:
    if width <= 1:
        return "…" if text else ""
    return text if len(text) <= width else text[: width - 1] + "…"


# --- sessions list -------------------------------------------------------------------


def session_rows(items: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    rows = []
    for s in items:
        state = "active" if not s.get("ended_at") else s.get("end_reason")
        rows.append(
            [
                s["id"][:12],
                s["requester"],
                f"{s['resource_name']}/{s['account_name']}",
                local_time(s["started_at"]),
                local_time(s["ended_at"])
                if s.get("ended_at")
                else f"expires {local_time(s['expires_at'])}",
                human_duration(s.get("duration_seconds")),
                state,
            ]
        )
    return rows


SESSION_COLUMNS: Final = (
    "SESSION",
    "REQUESTER",
    "RESOURCE/ACCOUNT",
    "STARTED",
    "ENDED",
    "DURATION",
    "STATE",
)


# --- output ----------------------------------------------------------------------------


@contextmanager
def closed_pipe_ends_quietly() -> Iterator[None]:
    """Output cut short downstream (``| head``) ends the command like any Unix filter:
    no error line, exit status 141 (128 + SIGPIPE)."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush of stdout again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(141)


# --- audit search and verify ------------------------------------------------------------


SEARCH_COLUMNS: Final = (
    "TIME",
    "SESSION",
    "SEQ",
    "REQUESTER",
    "RESOURCE/ACCOUNT",
    "STATUS",
    "SQL",
)
_EXCERPT_CHARS: Final = 100


def search_table(records: Sequence[Mapping[str, Any]]) -> RenderableType:
    rows = []
    for r in records:
        status = r.get("status") or r.get("kind") or "-"
        rows.append(
            [
                local_time(r["occurred_at"]),
                r["session_id"][:8],
                r["seq"],
                r["requester"],
                f"{r['resource_name']}/{r['account_name']}",
                plain(status, style=STATUS_STYLES.get(status, "")),
                truncate(printable(one_line(r.get("sql"))), _EXCERPT_CHARS) or "-",
            ]
        )
    return grid(SEARCH_COLUMNS, rows)


def problem_line(problem: Mapping[str, Any]) -> str:
    trails = {ACCESS_TRAIL: "access trail", ROTATION_RECORD: "rotation record"}
    where = trails.get(problem["session_id"]) or f"session {printable(problem['session_id'])}"
    if problem.get("seq") is not None:
        where += f" seq {problem['seq']}"
    return f"{where}: {printable(problem['problem'])}: {printable(problem['detail'])}"


def refusal_line(record: Mapping[str, Any]) -> str:
    """One refusal record: when last, how many, where, from, who, why."""
    count = int(record["count"])
    when = local_time(record["last_at"])
    if count > 1:
        when = f"{local_time(record['first_at'])} .. {when}"
    where = printable(record["place"])
    if record.get("session_id"):
        where += f" session {printable(record['session_id'])[:8]}"
    who = f" {printable(record['who'])}" if record.get("who") else ""
    return (
        f"{when}  x{count}  {printable(record['reason'])}  {where}"
        f"  from {printable(record['source'])}{who}: {printable(record['message'])}"
    )
