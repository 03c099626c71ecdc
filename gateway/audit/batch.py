"""Chain version 3: a session's audit records sealed in batches.

Role: the format the store writes the trail in since issue 12, and reads back.
Pure: no I/O; :mod:`gateway.store.audit` stores a :class:`SealedBatch` as one row
and :class:`~gateway.audit.verify.SessionVerifier` checks one with
:meth:`~gateway.audit.verify.SessionVerifier.feed_batch`.

The format:

* A **record** is a MessagePack array ``[seq, kind, occurred_at, connection_id,
  *body]``: ``occurred_at`` in microseconds since the epoch (UTC), ``body`` the
  fields of its kind in the order :data:`BODY_FIELDS` lists them. Every kind is
  chained the same way; a new kind of record (a refusal, an approval, a
  rotation) is a new entry in :data:`BODY_FIELDS` and :data:`KIND_BITS`, not a
  new chain version.
* A **batch** is consecutive records of one session (seq ``first_seq`` ..
  ``first_seq + count - 1``), stored as one MessagePack array of the encoded
  records, plus one keyed digest per record
  (:meth:`~gateway.audit.chain.AuditChain.record_digests`) and one HMAC over the
  session, the first seq, the previous hash and those digests
  (:meth:`~gateway.audit.chain.AuditChain.batch_hash`). The next batch chains to
  that hash; the session's seal covers the last one. So one MAC per batch seals
  it, and verify still names the exact record that was changed (its digest
  fails), removed or reordered (its seq is out of place among intact records).
* What the store indexes a batch by (seq range, time range, which kinds it
  holds, how many statements) is derived from the records; verify checks it
  against them, since a reader trusts it to skip batches.

Invariants: encoding is deterministic (msgspec writes the same bytes for the
same values), and the digests are over the bytes as stored, so verifying never
depends on re-encoding. Decoding untrusted bytes never raises anything but
:class:`BatchFormatError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import msgspec

from gateway.audit.chain import EVENT_FIELDS, AuditChain

__all__ = [
    "BATCH_CHAIN_VERSION",
    "BODY_FIELDS",
    "KIND_BITS",
    "PARAMETER_FIELDS",
    "BatchFormatError",
    "BatchIndex",
    "SealedBatch",
    "batch_index",
    "decode_record",
    "decode_records",
    "encoded_records",
    "field_position",
    "is_encodable",
    "record_fields",
    "seal_batch",
]

BATCH_CHAIN_VERSION: Final = 3

#: The fields after ``[seq, kind, occurred_at, connection_id]``, by kind: a
#: statement's are the event fields from ``protocol`` on, ``detail`` last.
_STATEMENT_BODY: Final = EVENT_FIELDS[EVENT_FIELDS.index("protocol") :]
BODY_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "connection_start": ("detail",),
    "statement": _STATEMENT_BODY,
    "connection_end": ("detail",),
}
#: One bit per kind, for the batch's ``kinds`` column (a reader that wants only
#: connection events skips the batches without any).
KIND_BITS: Final[Mapping[str, int]] = {"connection_start": 1, "statement": 2, "connection_end": 4}
#: A parameter inside a statement's body: ``[index, type_oid, format, value, truncated]``.
PARAMETER_FIELDS: Final = ("index", "type_oid", "format", "value", "truncated")

_HEAD: Final = 4
_ENCODE: Final = msgspec.msgpack.Encoder().encode
_DECODE_RECORDS: Final = msgspec.msgpack.Decoder(list[list[Any]]).decode
_DECODE_ANY: Final = msgspec.msgpack.Decoder().decode
_DECODE_RAW: Final = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode


class BatchFormatError(ValueError):
    """Stored bytes that are not a batch of records (tampering, or a bug)."""


class SealedBatch(NamedTuple):
    """One batch as the store keeps it (a row of ``audit_batches``)."""

    session_id: str
    first_seq: int
    last_seq: int
    #: Earliest and latest ``occurred_at`` among the records (microseconds).
    min_at: int
    max_at: int
    #: OR of :data:`KIND_BITS` of the records.
    kinds: int
    statement_count: int
    records: bytes
    digests: bytes
    prev_hash: str
    hash: str


class BatchIndex(NamedTuple):
    """What a batch's index columns say, derived from its records."""

    min_at: int
    max_at: int
    #: OR of :data:`KIND_BITS`
    kinds: int
    statement_count: int


def batch_index(records: Iterable[tuple[str, int]]) -> BatchIndex:
    """The index columns of a batch of records given as ``(kind, occurred_at)``
    (at least one; every kind known): the store writes them, verify checks them."""
    min_at = max_at = None
    kinds = statements = 0
    for kind, at in records:
        min_at = at if min_at is None or at < min_at else min_at
        max_at = at if max_at is None or at > max_at else max_at
        kinds |= KIND_BITS[kind]
        statements += kind == "statement"
    if min_at is None or max_at is None:
        raise ValueError("a batch holds at least one record")
    return BatchIndex(min_at, max_at, kinds, statements)


def seal_batch(
    chain: AuditChain,
    session_id: str,
    first_seq: int,
    prev_hash: str,
    bodies: Sequence[Sequence[Any]],
) -> SealedBatch:
    """Number, encode and seal *bodies* (each ``[kind, occurred_at,
    connection_id, *body]``, already validated) as seqs ``first_seq`` onwards.

    Raises ``ValueError`` for text that UTF-8 cannot carry (a lone surrogate) and
    ``KeyError`` for a kind without a layout: the store checks both first.
    """
    encode = _ENCODE
    parts = [encode((seq, *body)) for seq, body in enumerate(bodies, first_seq)]
    digests = chain.record_digests(session_id, parts)
    index = batch_index((body[0], body[1]) for body in bodies)
    return SealedBatch(
        session_id=session_id,
        first_seq=first_seq,
        last_seq=first_seq + len(parts) - 1,
        min_at=index.min_at,
        max_at=index.max_at,
        kinds=index.kinds,
        statement_count=index.statement_count,
        records=encode([msgspec.Raw(part) for part in parts]),
        digests=digests,
        prev_hash=prev_hash,
        hash=chain.batch_hash(session_id, first_seq, prev_hash, digests),
    )


def is_encodable(body: Sequence[Any]) -> bool:
    """Whether a record body can be encoded (its text is valid UTF-8)."""
    try:
        _ENCODE(body)
    except ValueError:
        return False
    return True


def encoded_records(blob: bytes) -> list[bytes]:
    """The encoded records of a stored batch, as the digests cover them."""
    try:
        return [bytes(raw) for raw in _DECODE_RAW(blob)]
    except msgspec.DecodeError:
        raise BatchFormatError("the batch's records are not a MessagePack array") from None


def decode_record(part: bytes) -> list[Any] | None:
    """One encoded record as a list, or None when it is not an array."""
    try:
        record = _DECODE_ANY(part)
    except msgspec.DecodeError:
        return None
    return record if type(record) is list else None


def decode_records(blob: bytes) -> list[list[Any]]:
    """The records of a stored batch as lists (``[seq, kind, occurred_at, ...]``)."""
    try:
        return _DECODE_RECORDS(blob)
    except msgspec.DecodeError:
        raise BatchFormatError("the batch's records are not arrays") from None


def field_position(kind: str, name: str) -> int:
    """Where a record of *kind* holds the body field *name* (for readers that
    look at one field of many records without building a mapping each)."""
    return _HEAD + BODY_FIELDS[kind].index(name)


def record_fields(record: Sequence[Any]) -> dict[str, Any] | None:
    """A decoded record as the event fields it holds (``seq`` included,
    ``occurred_at`` still in microseconds); None for one of no known shape."""
    if len(record) < _HEAD:
        return None
    kind = record[1]
    layout = BODY_FIELDS.get(kind) if isinstance(kind, str) else None
    if layout is None or len(record) != _HEAD + len(layout):
        return None
    fields = {
        "seq": record[0],
        "kind": kind,
        "occurred_at": record[2],
        "connection_id": record[3],
    }
    fields.update(zip(layout, record[_HEAD:], strict=True))
    return fields
