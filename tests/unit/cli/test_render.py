"""Terminal output of the review commands: text from outside is shown, never obeyed.

SQL, requester names, application names and error text come from database
users. A control character in them reaches the auditor's terminal escaped
(``\\x1b``), and rich markup in them (``[bold]``) is shown as typed.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cli import render
from cli.render import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("select 1", "select 1"),
        ("select '\x1b[2J'", "select '\\x1b[2J'"),
        ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),
        ("nul\x00 bs\x08 cr\r", "nul\\x00 bs\\x08 cr\\r"),
        ("tab\there", "tab\\there"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b2J nel\x85", "csi\\x9b2J nel\\x85"),
        ("bidi \u202eevil\u202c", "bidi \\u202eevil\\u202c"),
        ("line\u2028sep", "line\\u2028sep"),
        ("a\nb", "a\\nb"),
        ("héllo wörld ✓ 数据", "héllo wörld ✓ 数据"),
        ("[bold]not markup[/bold]", "[bold]not markup[/bold]"),
    ],
)
def test_printable_escapes_every_control_character(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_printable_keeps_newlines_only_when_asked() -> None:
    assert printable("select 1\n  from t\x1b[2J\r\n", newlines=True) == (
        "select 1\n  from t\\x1b[2J\\r\n"
    )


def test_printable_shows_none_as_a_dash() -> None:
    assert printable(None) == "-"
    assert printable(42) == "42"


def _rendered(monkeypatch: pytest.MonkeyPatch, width: int, *, terminal: bool) -> io.StringIO:
    out = io.StringIO()
    console = Console(
        file=out, width=width, force_terminal=terminal, highlight=False, soft_wrap=True
    )
    monkeypatch.setattr(render, "console", console)
    return out


def test_table_cells_are_escaped_and_never_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _rendered(monkeypatch, 120, terminal=True)
    render.table(None, ["WHO", "WHAT"], [["[bold]eve[/bold]", "select '\x1b[2J'"]])
    text = out.getvalue()
    assert "[bold]eve[/bold]" in text
    assert "select '\\x1b[2J'" in text
    assert "\x1b[2J" not in text


def test_key_values_are_escaped_and_never_markup(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _rendered(monkeypatch, 120, terminal=False)
    render.key_values([("requester", "[red]mallory\x1b[31m")])
    assert out.getvalue() == "requester  [red]mallory\\x1b[31m\n"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _console(width: int, *, tty: bool) -> tuple[Console, io.StringIO]:
    out: io.StringIO = _Tty() if tty else io.StringIO()
    console = Console(file=out, width=width, highlight=False, soft_wrap=True, color_system=None)
    return console, out


SESSION_ROW = [
    "3f2a9c1d2e4b",
    "requester-with-a-long-name",
    "production-db/readonly",
    "2024-06-01 14:30:00 CEST",
    "2024-06-01 15:30:00 CEST",
    "1h00m00s",
    "client_closed",
]
COLUMNS = ["SESSION", "REQUESTER", "RESOURCE/ACCOUNT", "STARTED", "ENDED", "DURATION", "STATE"]


def test_a_table_too_wide_for_80_columns_shows_one_block_per_record() -> None:
    console, out = _console(80, tty=True)
    console.print(render.grid(COLUMNS, [SESSION_ROW, SESSION_ROW], out=console))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "REQUESTER         requester-with-a-long-name" in lines
    assert "STATE             client_closed" in lines
    assert lines.count("") == 1  # a blank line between the two records
    assert not any(char in out.getvalue() for char in "│┃━─")


def test_a_table_that_fits_is_boxed_with_no_cell_broken() -> None:
    console, out = _console(200, tty=True)
    console.print(render.grid(COLUMNS, [SESSION_ROW], out=console))
    text = out.getvalue()
    assert "│ requester-with-a-long-name │" in text
    assert all(len(line) <= 200 for line in text.splitlines())


@pytest.mark.parametrize("width", [80, 200])
def test_piped_output_is_plain_aligned_lines_one_per_record(width: int) -> None:
    console, out = _console(width, tty=False)
    console.print(render.grid(COLUMNS, [SESSION_ROW, [*SESSION_ROW[:-1], "active"]], out=console))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].split() == [*COLUMNS[:3], "STARTED", "ENDED", "DURATION", "STATE"]
    assert lines[1].split("  ")[0] == "3f2a9c1d2e4b"
    assert lines[1].endswith("client_closed") and lines[2].endswith("active")
    assert lines[0].index("REQUESTER") == lines[1].index("requester-with")
    assert not any(char in out.getvalue() for char in "│┃━─")


def test_the_statement_page_is_one_request_whatever_its_number() -> None:
    import httpx

    from cli.client import ApiClient
    from gateway.config import ClientConfig

    requests: list[tuple[str, dict[str, str]]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append((request.url.path, dict(request.url.params)))
        return httpx.Response(200, json={"records": [], "next_cursor": None})

    config = ClientConfig(api_url="http://pam.test:7745", token="t0ken")
    with ApiClient(config, transport=httpx.MockTransport(answer)) as client:
        client.statement_page("ab" * 16, page=1, page_size=200)
        client.statement_page("ab" * 16, page=766, page_size=200)
    assert requests == [
        (f"/v1/sessions/{'ab' * 16}/statements", {"page": "1", "page_size": "200"}),
        (f"/v1/sessions/{'ab' * 16}/statements", {"page": "766", "page_size": "200"}),
    ]


def test_relative_times_use_the_one_duration_parser() -> None:
    from datetime import UTC, datetime, timedelta

    import click

    from cli.review import parse_when

    now = datetime(2024, 6, 8, 12, 0, tzinfo=UTC)
    assert parse_when("7d", now=now) == now - timedelta(days=7)
    assert parse_when("1h30m", now=now) == now - timedelta(minutes=90)
    assert parse_when("2w", now=now) == now - timedelta(weeks=2)
    assert parse_when("2024-06-01T00:00:00+00:00") == datetime(2024, 6, 1, tzinfo=UTC)
    with pytest.raises(click.BadParameter, match="is not a time"):
        parse_when("last tuesday")
