"""Reviewing access sessions and their audit trail: what `pam sessions` and `pam audit` show.

Role: the terminal rendering behind the review commands (:mod:`cli.commands`),
kept thin over the control API (``/v1/sessions``, ``/v1/sessions/{id}/statements``
and ``/trail``, ``/v1/audit/search``, ``/v1/audit/verify``). Paging, export
columns and formats and type names are :mod:`gateway.audit.review`'s, shared
with the server (and a future web page); nothing here reads the store or
recomputes anything the daemon already decided.

Invariants:

* One request per page, whatever the page number: the server finds a page by a
  keyed cursor and answers the cursor of the next one. Memory stays bounded by
  one API page: exports and ``--all`` listings stream pages straight to their
  output; only session ids are collected, never records.
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
from rich.console import Console, RenderableType
from rich.text import Text

from cli.access import parse_duration
from cli.client import ApiClient, seg
from cli.render import (
    grid,
    human_bytes,
    human_duration,
    local_time,
    parse_time,
    plain,
    printable,
)

# Re-exported: the commands take paging and the export writer from here.
from gateway.audit.review import API_MAX_PAGE as API_MAX_PAGE
from gateway.audit.review import DEFAULT_PAGE_SIZE as DEFAULT_PAGE_SIZE
from gateway.audit.review import EXPORT_PAGE, Cursor, Paging, type_name
from gateway.audit.review import ExportWriter as ExportWriter
from gateway.audit.review import paging as paging

_WHITESPACE: Final = re.compile(r"\s+")

_STATUS_STYLES: Final = {
    "ok": "green",
    "error": "bold red",
    "cancelled": "bold yellow",
    "skipped": "yellow",
    "incomplete": "magenta",
}
_PROTOCOLS: Final = {"simple": "simple", "extended": "extended", "function_call": "fncall"}
#: Longest parameter value shown inline in the timeline (the trail keeps more).
_PARAMETER_CHARS: Final = 60
_INDENT: Final = " " * 7


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


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


# --- paging the API ------------------------------------------------------------------


def iter_sessions(
    client: ApiClient, *, page_size: int = API_MAX_PAGE, **filters: Any
) -> Iterator[dict[str, Any]]:
    """Every session matching *filters* (the list API's), newest first, page by page.

    The list API has no cursor; it pages on ``until`` (exclusive ``started_at``).
    Sessions sharing the oldest start time of a page are fetched again with the
    next page and skipped by id (more than a page of sessions started in the same
    microsecond would end the listing early).
    """
    until: datetime | None = filters.pop("until", None)
    boundary: datetime | None = None
    at_boundary: set[str] = set()
    while True:
        page: list[dict[str, Any]] = client.get(
            "/v1/sessions", limit=page_size, until=iso(until), **filters
        )
        fresh = [s for s in page if s["id"] not in at_boundary]
        yield from fresh
        if len(page) < page_size or not fresh:
            return
        oldest = _started(page[-1])
        if oldest != boundary:
            at_boundary = set()
        boundary = oldest
        at_boundary |= {s["id"] for s in page if _started(s) == oldest}
        until = oldest + timedelta(microseconds=1)


def _started(session: Mapping[str, Any]) -> datetime:
    moment = parse_time(session["started_at"])
    assert moment is not None
    return moment


def iter_audit_pages(
    client: ApiClient,
    session_id: str,
    *,
    kind: str | None = None,
    page_size: int = EXPORT_PAGE,
    after_seq: int = 0,
) -> Iterator[list[dict[str, Any]]]:
    """One session's records in seq order (*kind* ``statement``: its statements), a
    page at a time, each page read by the cursor the server gave with the last."""
    path = f"/v1/sessions/{seg(session_id)}/" + ("statements" if kind == "statement" else "trail")
    if kind not in (None, "statement"):
        raise ValueError(f"kind {kind!r}: pages are of statements or of every record")
    cursor: str | None = None
    if after_seq:
        full_id = client.get(f"/v1/sessions/{seg(session_id)}")["session"]["id"]
        cursor = Cursor(full_id, after_seq).encode()
    while True:
        if cursor is None:
            answer = client.get(path, page=1, page_size=page_size)
        else:
            answer = client.get(path, cursor=cursor, page_size=page_size)
        records: list[dict[str, Any]] = answer["records"]
        if records:
            yield records
        cursor = answer["next_cursor"]
        if cursor is None:
            return


def statement_page(
    client: ApiClient, session_id: str, page: int, page_size: int
) -> list[dict[str, Any]]:
    """Statements ``(page-1)*page_size+1 .. page*page_size`` of a session, in seq order:
    one request, which the server answers at the same cost for every page."""
    answer = client.get(
        f"/v1/sessions/{seg(session_id)}/statements", page=page, page_size=page_size
    )
    records: list[dict[str, Any]] = answer["records"]
    return records


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


# --- sessions show -------------------------------------------------------------------


def connection_labels(connections: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``#1``, ``#2``, ... by start order, as the Connections table numbers them."""
    return {c["id"]: f"#{n}" for n, c in enumerate(connections, start=1)}


CONNECTION_COLUMNS: Final = (
    "#",
    "STARTED",
    "CLIENT",
    "APPLICATION",
    "PID",
    "DURATION",
    "FROM CLIENT",
    "FROM SERVER",
    "END",
    "ERROR",
)


def session_header(detail: Mapping[str, Any]) -> list[RenderableType]:
    s = detail["session"]
    pairs: list[tuple[str, Any]] = [
        ("session", s["id"]),
        ("requester", s["requester"]),
        ("resource", s["resource_name"]),
        ("account", f"{s['account_name']} (user {s['username']})"),
        ("database", s["database"]),
        ("listener", f"{s['listen_host']}:{s['listen_port']}"),
        ("started", local_time(s["started_at"])),
        ("expires", local_time(s["expires_at"])),
        ("ended", local_time(s.get("ended_at"))),
        ("duration", human_duration(s.get("duration_seconds"))),
        (
            "end reason",
            (s.get("end_reason") or "active")
            + (f" ({s['end_detail']})" if s.get("end_detail") else ""),
        ),
        ("live connections", detail["live_connections"]),
        ("statements", detail.get("statements", "-")),
    ]
    width = max(len(key) for key, _ in pairs)
    out: list[RenderableType] = []
    for key, value in pairs:
        line = Text(key.ljust(width), style="bold")
        line.append("  " + printable(value))
        out.append(line)
    rows = [
        [
            f"#{n}",
            local_time(c["started_at"]),
            c["client_addr"],
            c.get("application_name"),
            c.get("backend_pid"),
            human_duration(c.get("duration_seconds")),
            human_bytes(c.get("bytes_from_client")),
            human_bytes(c.get("bytes_from_server")),
            c.get("end_reason") or "live",
            f"{c['error_sqlstate']}: {c['error_message']}" if c.get("error_sqlstate") else None,
        ]
        for n, c in enumerate(detail["connections"], start=1)
    ]
    out.append(grid(CONNECTION_COLUMNS, rows, title="Connections"))
    return out


def one_line(text: str | None) -> str:
    return _WHITESPACE.sub(" ", text or "").strip()


def truncate(text: str, width: int) -> str:
    if width <= 1:
        return "…" if text else ""
    return text if len(text) <= width else text[: width - 1] + "…"


def _clock(value: str) -> tuple[str, str]:
    moment = parse_time(value)
    assert moment is not None
    local = moment.astimezone()
    return local.strftime("%Y-%m-%d %Z"), local.strftime("%H:%M:%S.%f")[:-3]


def _outcome(record: Mapping[str, Any]) -> str:
    outcome = record.get("command_tag") or ""
    if not outcome and record.get("rows") is not None:
        outcome = f"{record['rows']} rows"
    if record.get("copy_direction"):
        copied = record.get("copy_bytes")
        outcome += f" (copy {record['copy_direction']}, {copied if copied is not None else '?'} B)"
    return outcome.strip() or "-"


def format_parameter(parameter: Mapping[str, Any]) -> str:
    name = f"${parameter['index']}"
    value = parameter.get("value")
    if parameter.get("format") == "null":
        return f"{name}=NULL"
    if value is None:
        return f"{name}::{type_name(parameter.get('type_oid'))}"
    cut = parameter.get("truncated") or len(value) > _PARAMETER_CHARS
    shown = printable(one_line(value)[:_PARAMETER_CHARS])
    if parameter.get("format") == "binary":
        return f"{name}=b64:{shown}{'…' if cut else ''}"
    return f"{name}='{shown}{'…' if cut else ''}'"


class Timeline:
    """Statement lines for a terminal of ``width`` columns, with date separators."""

    def __init__(self, labels: Mapping[str, str], width: int) -> None:
        self._labels = labels
        self._width = max(width, 60)
        self._day: str | None = None

    def heading(self) -> Text:
        return Text(
            f"{'SEQ':>5} {'TIME':<12} {'CONN':<4} {'PROTOCOL':<8} {'DURATION':>11}"
            f" {'STATUS':<10} {'OUTCOME':<18} SQL",
            style="bold",
        )

    def lines(self, record: Mapping[str, Any]) -> list[Text]:
        out: list[Text] = []
        day, clock = _clock(record["occurred_at"])
        if day != self._day:
            out.append(Text(f"-- {day}", style="dim"))
            self._day = day
        status = record.get("status") or "-"
        style = _STATUS_STYLES.get(status, "")
        connection = record.get("connection_id") or ""
        label = self._labels.get(connection, connection[:4])
        duration = record.get("duration_ms")
        shown_duration = "-" if duration is None else f"{duration:.1f} ms"
        protocol = _PROTOCOLS.get(record.get("protocol") or "", record.get("protocol") or "-")
        line = Text(
            f"{record['seq']:>5} {clock:<12} {label:<4} {protocol:<8} {shown_duration:>11} "
        )
        line.append(f"{status:<10}", style=style)
        line.append(f" {truncate(printable(_outcome(record)), 18):<18} ")
        sql = printable(one_line(record.get("sql")))
        line.append(truncate(sql, self._width - len(line.plain)))
        out.append(line)
        parameters = record.get("parameters")
        if parameters:
            text = "  ".join(format_parameter(p) for p in parameters)
            out.append(Text(_INDENT + truncate(text, self._width - len(_INDENT)), style="cyan"))
        if status in ("error", "cancelled"):
            label_text = "ERROR" if status == "error" else "CANCELLED"
            sqlstate = record.get("sqlstate") or "-"
            message = printable(one_line(record.get("error_message")))
            out.append(Text(f"{_INDENT}{label_text} {sqlstate}: {message}", style=style))
        elif status == "skipped":
            out.append(
                Text(f"{_INDENT}skipped: an earlier statement of its batch failed", style=style)
            )
        return out


def page_footer(session_id: str, view: Paging) -> Text | None:
    if view.page is None or view.pages <= 1:
        return None
    footer = f"page {view.page} of {view.pages}"
    if view.page < view.pages:
        extra = f" --page-size {view.page_size}" if view.page_size != DEFAULT_PAGE_SIZE else ""
        footer += f" — next: pam sessions show {session_id} --page {view.page + 1}{extra}"
    return Text(footer, style="bold")


def show_timeline(
    console: Console,
    client: ApiClient,
    detail: Mapping[str, Any],
    view: Paging,
    first_page: list[dict[str, Any]] | None,
) -> None:
    """Print the header, the connections and the page's (or every) statements.

    Long output on a terminal goes through rich's pager; otherwise statements
    stream as their pages arrive.
    """
    session_id = detail["session"]["id"]
    labels = connection_labels(detail["connections"])
    timeline = Timeline(labels, console.width)
    shown = view.total if view.page is None else min(view.page_size, view.total)
    expected_lines = 16 + 4 + len(detail["connections"]) + shown
    # Not console.is_terminal: FORCE_COLOR makes that true for a pipe.
    use_pager = sys.stdout.isatty() and expected_lines > console.height

    def emit() -> None:
        for renderable in session_header(detail):
            console.print(renderable)
        title = f"Statements ({view.total}"
        if view.page is not None and view.pages > 1:
            title += f"; page {view.page} of {view.pages}"
        console.print(Text(title + ")", style="bold italic"))
        if view.total == 0 and not first_page:
            console.print(Text("no statements recorded", style="dim"))
            return
        console.print(timeline.heading())
        pages: Iterator[list[dict[str, Any]]]
        if view.page is None:
            pages = iter_audit_pages(client, session_id, kind="statement")
        else:
            pages = iter([first_page or []])
        for records in pages:
            for record in records:
                for line in timeline.lines(record):
                    console.print(line)
        footer = page_footer(session_id[:12], view)
        if footer is not None:
            console.print(footer)

    if use_pager:
        with console.pager(styles=True):
            emit()
    else:
        emit()


# --- export ----------------------------------------------------------------------------


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


def export_sessions(
    client: ApiClient,
    writer: ExportWriter,
    session_id: str | None,
    *,
    since: datetime | None,
    until: datetime | None,
) -> int:
    """Write every record of one session, or of each session started in the window.

    Sessions go oldest first; each session's records in seq order. Returns the
    number of sessions exported.
    """
    if session_id is not None:
        full_id = client.get(f"/v1/sessions/{seg(session_id)}")["session"]["id"]
        ids = [full_id]
    else:
        # Ids only (never records) are collected, to export oldest first.
        ids = [s["id"] for s in iter_sessions(client, since=iso(since), until=until)]
        ids.reverse()
    for sid in ids:
        for page in iter_audit_pages(client, sid, page_size=EXPORT_PAGE):
            writer.write(page)
    return len(ids)


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
                plain(status, style=_STATUS_STYLES.get(status, "")),
                truncate(printable(one_line(r.get("sql"))), _EXCERPT_CHARS) or "-",
            ]
        )
    return grid(SEARCH_COLUMNS, rows)


def problem_line(problem: Mapping[str, Any]) -> str:
    where = f"session {printable(problem['session_id'])}"
    if problem.get("seq") is not None:
        where += f" seq {problem['seq']}"
    return f"{where}: {printable(problem['problem'])}: {printable(problem['detail'])}"
