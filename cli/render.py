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

from rich.console import Console, Group, RenderableType
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


def is_interactive(out: Console | None = None) -> bool:
    """Whether *out* (default: the CLI's console) writes to a terminal a person reads.

    Not ``Console.is_terminal`` alone: ``FORCE_COLOR`` makes that true for a pipe,
    and a pipe gets plain rows (colours are still rich's choice).
    """
    out = out or console
    isatty = getattr(out.file, "isatty", None)
    return out.is_terminal and callable(isatty) and bool(isatty())


def _cell(value: object) -> Text:
    return value if isinstance(value, Text) else plain(value)


def grid(
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    title: str | None = None,
    out: Console | None = None,
) -> RenderableType:
    """Rows for people: a boxed table if it fits the terminal, else one block per row;
    plain aligned lines (one per row, never wrapped) when not on a terminal.

    Cells are escaped (:func:`plain`) unless they are already :class:`Text`.
    """
    out = out or console
    cells = [[_cell(value) for value in row] for row in rows]
    heads = [Text(column, style="bold") for column in columns]
    widths = [max([h.cell_len] + [row[i].cell_len for row in cells]) for i, h in enumerate(heads)]
    parts: list[RenderableType] = [] if title is None else [Text(title, style="bold italic")]
    if not is_interactive(out):
        for row in [heads, *cells]:
            line = Text("  ").join(
                cell
                if i == len(row) - 1
                else Text.assemble(cell, " " * (widths[i] - cell.cell_len))
                for i, cell in enumerate(row)
            )
            parts.append(line)
        return Group(*parts)
    # A box with one space of padding each side: 3 columns of frame per column, plus 1.
    if sum(widths) + 3 * len(widths) + 1 <= out.width:
        boxed = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
        for column in columns:
            boxed.add_column(column, no_wrap=True)
        for row in cells:
            boxed.add_row(*row)
        return boxed
    label = max(h.cell_len for h in heads)
    for n, row in enumerate(cells):
        if n:
            parts.append(Text(""))
        for head, cell in zip(heads, row, strict=True):
            parts.append(Text.assemble(head, " " * (label - head.cell_len + 2), cell))
    return Group(*parts)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    console.print(grid(columns, rows, title=title))


def key_values(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        line = Text(key.ljust(width), style="bold")
        line.append("  " + printable(value))
        console.print(line)
