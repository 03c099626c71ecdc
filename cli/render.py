"""Terminal output for the CLI: rich tables for people, JSON for scripts.

Times are shown in the viewer's local time zone; JSON keeps ISO-8601 UTC.

Invariant: text that came from outside (SQL, names, error messages) reaches the
terminal only through :func:`printable`, as a :class:`rich.text.Text` (never as
markup): a control character is shown escaped (``\\x1b``), never sent, so a
statement cannot clear, retitle or recolour the reviewer's terminal, and
``[bold]`` in a name is shown as typed. JSON, JSONL and CSV keep the exact data.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(highlight=False, soft_wrap=True)

#: What a terminal would obey rather than show: C0 controls, DEL, C1 controls
#: (CSI U+009B alone starts an escape sequence on many terminals), the Unicode
#: line and paragraph separators and the bidirectional overrides that reorder
#: what is shown ("Trojan Source", CVE-2021-42574).
_UNSAFE: Final = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE_CHARS: Final = re.compile(f"[{_UNSAFE}]")
_UNSAFE_BUT_NEWLINE: Final = re.compile(f"(?!\n)[{_UNSAFE}]")
_NAMED_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(value: object, *, newlines: bool = False) -> str:
    """*value* as text safe to show: every control character escaped Python-style.

    ``None`` is ``-``. *newlines* keeps line feeds (a multi-line SQL block);
    everything else, ``\\r`` and ``\\t`` included, is escaped. Backslashes are
    left alone, so SQL reads as typed.
    """
    if value is None:
        return "-"
    pattern = _UNSAFE_BUT_NEWLINE if newlines else _UNSAFE_CHARS
    return pattern.sub(_escape, str(value))


def plain(value: object, *, style: str = "") -> Text:
    """*value* escaped (:func:`printable`) as rich text that is never read as markup."""
    return Text(printable(value), style=style)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def local_time(value: str | None) -> str:
    moment = parse_time(value)
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = round(seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    grid = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*(plain(cell) for cell in row))
    console.print(grid)


def key_values(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        line = Text(key.ljust(width), style="bold")
        line.append("  " + printable(value))
        console.print(line)
