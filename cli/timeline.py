"""The page of one session in the terminal: its header, connections and statement timeline.

Role: what ``pam sessions show`` prints, from the API's JSON (the session
detail and pages of ``/v1/sessions/{id}/statements``). Nothing here pages or
reads the store; :func:`cli.review.iter_statement_pages` follows the server's
cursors for ``--all``.

Invariants:

* Text from outside (SQL, parameters, error messages, application names) goes
  through :func:`cli.render.printable`, as plain :class:`rich.text.Text`.
* One line per statement, cut to the terminal width; its parameters and its
  error (if any) on the lines under it; a date line when the day changes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from rich.console import Console, RenderableType
from rich.text import Text

from cli.client import ApiClient
from cli.render import grid, human_bytes, human_duration, local_time, parse_time, printable
from cli.review import (
    DEFAULT_PAGE_SIZE,
    STATUS_STYLES,
    Paging,
    iter_statement_pages,
    one_line,
    truncate,
)
from gateway.audit.review import type_name

_PROTOCOLS: Final = {"simple": "simple", "extended": "extended", "function_call": "fncall"}
#: Longest parameter value shown inline in the timeline (the trail keeps more).
_PARAMETER_CHARS: Final = 60
_INDENT: Final = " " * 7


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
        style = STATUS_STYLES.get(status, "")
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
    first_page: Sequence[Mapping[str, Any]] | None,
) -> None:
    """Print the header, the connections and the page's (or every) statements.

    Long output on a terminal goes through rich's pager; otherwise statements
    stream as their pages arrive.
    """
    shown = view.total if view.page is None else min(view.page_size, view.total)
    expected_lines = 16 + 4 + len(detail["connections"]) + shown
    # Not console.is_terminal: FORCE_COLOR makes that true for a pipe.
    if sys.stdout.isatty() and expected_lines > console.height:
        with console.pager(styles=True):
            _print_session(console, client, detail, view, first_page)
    else:
        _print_session(console, client, detail, view, first_page)


def _print_session(
    console: Console,
    client: ApiClient,
    detail: Mapping[str, Any],
    view: Paging,
    first_page: Sequence[Mapping[str, Any]] | None,
) -> None:
    session_id = detail["session"]["id"]
    for renderable in session_header(detail):
        console.print(renderable)
    title = f"Statements ({view.total}"
    if view.page is not None and view.pages > 1:
        title += f"; page {view.page} of {view.pages}"
    console.print(Text(title + ")", style="bold italic"))
    if view.total == 0 and not first_page:
        console.print(Text("no statements recorded", style="dim"))
        return
    timeline = Timeline(connection_labels(detail["connections"]), console.width)
    console.print(timeline.heading())
    pages: Iterable[Sequence[Mapping[str, Any]]] = (
        iter_statement_pages(client, session_id) if view.page is None else [first_page or []]
    )
    for records in pages:
        for record in records:
            for line in timeline.lines(record):
                console.print(line)
    footer = page_footer(session_id[:12], view)
    if footer is not None:
        console.print(footer)
