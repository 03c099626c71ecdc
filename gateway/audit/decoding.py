"""Decoding the bodies of tapped messages: strings, command tags, Bind parameters.

Role: the field-level reading that :class:`~gateway.audit.pairing.StatementTracker`
does on every tapped message, as plain functions (PostgreSQL 15 docs, 55.7
"Message Formats"). Pure and stateless: whatever a connection remembers
(prepared statements, portals, the Parse cache) stays in the tracker.

Invariants: the relay has already forwarded every message decoded here and
copies at most ``TAP_LIMIT`` bytes of each, so a body may be cut off anywhere.
Nothing here raises on a short body: a string runs to the end of what was kept,
and a parameter the tap did not keep is logged without a value, marked
truncated. These functions run on the event loop per statement: they take what
they need as arguments (no objects built to carry it) and allocate only what
they return.
"""

from __future__ import annotations

import struct

from gateway.audit.records import MAX_BIGINT, ParameterFormat
from gateway.audit.redaction import Redactor

__all__ = [
    "INT16",
    "UINT32",
    "ParameterRow",
    "body_text",
    "decode_parameters",
    "read_cstring",
    "rows_from_tag",
]

INT16 = struct.Struct("!h")
UINT32 = struct.Struct("!I")
_INT32 = struct.Struct("!i")

#: A logged parameter: (index, type_oid, format, value, truncated), the shape of
#: :data:`~gateway.audit.records.EventRow`'s parameters.
ParameterRow = tuple[int, int | None, ParameterFormat, str | None, bool]


def rows_from_tag(tag: str) -> int | None:
    """The row count of a CommandComplete tag ("INSERT 0 5" -> 5, "SELECT 3" -> 3);
    None for a tag without one, or with one no BIGINT column holds."""
    last = tag.rsplit(" ", 1)[-1]
    if not (last.isascii() and last.isdigit() and " " in tag):
        return None
    rows = int(last)
    return rows if rows <= MAX_BIGINT else None


def body_text(body: bytes) -> str:
    """A body that is one NUL-terminated string (Query, CommandComplete), as
    :func:`read_cstring` reads it from the start, without the position."""
    end = body.find(b"\x00")
    return (body if end < 0 else body[:end]).decode("utf-8", "replace")


def read_cstring(body: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated string of a tapped body and the position after it. A long
    Query or Bind arrives cut off: the string then runs to the end of what was
    kept (the caller marks it truncated)."""
    end = body.find(b"\x00", pos)
    if end < 0:
        return body[pos:].decode("utf-8", "replace"), len(body)
    return body[pos:end].decode("utf-8", "replace"), end + 1


def decode_parameters(
    body: bytes,
    pos: int,
    types: tuple[int, ...],
    values_wanted: bool,
    limit: int,
    redactor: Redactor,
) -> tuple[ParameterRow, ...] | None:
    """The parameters of a Bind (or a FunctionCall: the same layout of formats
    and values) from *pos*, its format-code count. *types* are the prepared
    statement's parameter type OIDs; a value is kept only when *values_wanted*,
    at most *limit* bytes of it, redacted by *redactor*. None when the tap kept
    too little to know the parameters."""
    size = len(body)
    if pos + 2 > size:
        return None
    (nformats,) = INT16.unpack_from(body, pos)
    counts_at = pos + 2 + 2 * max(nformats, 0)
    if counts_at + 2 > size:
        return None
    formats = struct.unpack_from(f"!{nformats}h", body, pos + 2) if nformats > 0 else ()
    (count,) = INT16.unpack_from(body, counts_at)
    pos = counts_at + 2
    out: list[ParameterRow] = []
    ntypes = len(types)
    for i in range(count):
        binary = (formats[0] if nformats == 1 else formats[i] if i < nformats else 0) == 1
        type_oid = (types[i] or None) if i < ntypes else None
        if pos + 4 > size:  # the tap kept only the start of a huge Bind
            out.append((i + 1, type_oid, "binary" if binary else "text", None, True))
            continue
        (length,) = _INT32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            out.append((i + 1, type_oid, "null", None, False))
            continue
        raw = body[pos : pos + min(length, limit)]
        cut = length > limit or pos + length > size
        pos += length
        value: str | None
        if not values_wanted:
            value = None
        elif binary:
            value = redactor.binary(raw)
        else:
            text = raw.decode("utf-8", "replace")
            if "\x00" in text:
                # Text can't hold NUL (the server refuses it too); shown as
                # undecodable bytes are, instead of a record the store refuses.
                text = text.replace("\x00", "\ufffd")
            value = redactor.value(text)
        out.append((i + 1, type_oid, "binary" if binary else "text", value, cut))
    return tuple(out)
