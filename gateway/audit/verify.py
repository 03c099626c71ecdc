"""Verifying a session's audit trail: the reading side of the keyed hash chain.

Role: :class:`SessionVerifier` checks one session's stored records, fed in
``seq`` order, against :class:`~gateway.audit.chain.AuditChain` and then checks
the session's end against its seal; :meth:`gateway.store.Store.verify_audit`
feeds it and returns the :class:`ChainProblem` reports. How the chain and the
seal are built, and what verification cannot see, is in
:mod:`gateway.audit.chain`. Pure: no I/O, no database.

Invariants: memory is bounded whatever the session's length (the previous
record's facts and at most :data:`_MAX_SUSPECTS` failing records held back);
every comparison of a hash or a seal uses
:func:`~gateway.audit.chain.is_same_digest` (``hmac.compare_digest``); a
report's text is built only when something is wrong, since verification runs
over every record.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from gateway.audit.batch import (
    BATCH_CHAIN_VERSION,
    BatchFormatError,
    batch_index,
    decode_record,
    encoded_records,
    record_fields,
)
from gateway.audit.chain import (
    CHAIN_VERSION,
    GENESIS_HASH,
    RECORD_DIGEST_BYTES,
    AuditChain,
    is_same_digest,
)

__all__ = ["ChainProblem", "ChainProblemKind", "SessionVerifier", "StoredBatch", "describe"]

_EXCERPT_CHARS: Final = 40
#: Failing records held back to judge whether they were moved (see _settle);
#: beyond this many in a row (a wrong key, say) they are reported as they stand.
_MAX_SUSPECTS: Final = 1000
_WHITESPACE: Final = re.compile(r"\s+")

#: What :meth:`gateway.store.Store.verify_audit` can find wrong.
ChainProblemKind = Literal["changed", "removed", "reordered", "truncated", "seal"]
#: A problem found before its session is known to the report: (seq, kind, detail).
_Report = tuple[int | None, ChainProblemKind, str]


class StoredBatch(Protocol):
    """A sealed batch as stored (a row of ``audit_batches``; see gateway.audit.batch)."""

    first_seq: int
    last_seq: int
    min_at: int
    max_at: int
    kinds: int
    statement_count: int
    records: bytes
    digests: bytes
    prev_hash: str
    hash: str
    chain_version: int


class ChainProblem(BaseModel):
    """One thing wrong with a session's audit trail. ``detail`` names the record."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    #: The record concerned (for ``removed``/``truncated``: the first missing seq);
    #: ``None`` when the problem is the session's seal as a whole.
    seq: int | None
    problem: ChainProblemKind
    detail: str


def describe(seq: int, fields: Mapping[str, Any]) -> str:
    """``seq 7 (statement 'UPDATE t SET ...')``: enough for a reviewer to find it."""
    kind = fields.get("kind")
    sql = fields.get("sql")
    if isinstance(sql, str) and sql:
        excerpt = _WHITESPACE.sub(" ", sql).strip()
        if len(excerpt) > _EXCERPT_CHARS:
            excerpt = excerpt[:_EXCERPT_CHARS] + "..."
        return f"seq {seq} ({kind} {excerpt!r})"
    return f"seq {seq} ({kind})"


class _Name:
    """Formats as :func:`describe` would, but only when a report needs it."""

    __slots__ = ("_fields", "_seq")

    def __init__(self, seq: int, fields: Mapping[str, Any]) -> None:
        self._seq = seq
        self._fields = fields

    def __format__(self, spec: str) -> str:
        return describe(self._seq, self._fields)


def _span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seqs {first}-{last}"


def _index_matches(batch: StoredBatch, records: list[tuple[str, int]], last_seq: int) -> bool:
    """Whether *batch*'s index columns cover its intact *records* (``(kind,
    occurred_at)``, as :func:`~gateway.audit.batch.batch_index` takes them).

    The time range may be wider than the records' (records cut off), never
    narrower; the kinds must include theirs, the statement count and last seq
    must reach theirs.
    """
    if not records:
        return False
    derived = batch_index(records)
    return (
        batch.min_at <= derived.min_at
        and batch.max_at >= derived.max_at
        and (batch.kinds & derived.kinds) == derived.kinds
        and batch.statement_count >= derived.statement_count
        and batch.last_seq >= last_seq
    )


@dataclass(slots=True)
class _Suspect:
    """A record that failed its hash, held until the next intact record is seen."""

    row_id: int
    seq: int
    name: _Name
    reports: list[_Report]


def _matching(recomputed: bytes, known: set[bytes]) -> int:
    """How many record digests of *recomputed* are among *known* (a batch's)."""
    size = RECORD_DIGEST_BYTES
    return sum(recomputed[at : at + size] in known for at in range(0, len(recomputed), size))


class SessionVerifier:
    """Checks one session's records, fed in ``seq`` order, then its seal.

    Streaming: it keeps the previous record's facts and the run of failing
    records since the last intact one (at most :data:`_MAX_SUSPECTS`), so a
    session of any length verifies in bounded memory. Each record is checked for

    * ``changed``: its content no longer matches its own hash (``seq`` is covered,
      so a record moved to another seq is changed too);
    * ``removed``: a gap in ``seq`` before it, or (when both records verify) a
      ``prev_hash`` that is not the previous record's hash;
    * ``reordered``: a seq that repeats or goes back; an intact record stored
      (row id) before the intact record that precedes it; or a changed record
      whose row id does not lie between those of the intact records around it,
      i.e. one that was moved here from another position.

    :meth:`finish` then checks the end against the seal: ``truncated`` when
    records are missing at the end, ``seal`` when the seal itself does not
    verify or does not fit the session.
    """

    __slots__ = (
        "_batch_suspect",
        "_chain",
        "_last_changed",
        "_last_hash",
        "_last_seq",
        "_problems",
        "_records",
        "_suspects",
        "_valid_id",
        "_valid_seq",
        "session_id",
        "started_connections",
    )

    def __init__(self, chain: AuditChain, session_id: str) -> None:
        self._chain = chain
        self.session_id = session_id
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self._last_changed = False
        # Row id and seq of the last record whose hash verified.
        self._valid_id: int | None = None
        self._valid_seq = 0
        self._suspects: list[_Suspect] = []
        self._records = 0
        self._problems: list[ChainProblem] = []
        #: connection id -> seq of its connection_start record (so the store
        #: can tell a connection row deleted from under the trail)
        self.started_connections: dict[str, int] = {}
        # A batch whose MAC failed with every record intact and in order: what
        # comes next may explain it (records cut off its end), or not.
        # (the seq after it, its report)
        self._batch_suspect: tuple[int, _Report] | None = None

    def _emit(self, reports: list[_Report]) -> None:
        suspect, self._batch_suspect = self._batch_suspect, None
        if suspect is not None:
            after, report = suspect
            if not any(
                problem in ("removed", "truncated") and seq == after for seq, problem, _ in reports
            ):
                reports = [report, *reports]
        self._problems.extend(
            ChainProblem(session_id=self.session_id, seq=seq, problem=problem, detail=detail)
            for seq, problem, detail in reports
        )

    def _report(self, seq: int | None, problem: ChainProblemKind, detail: str) -> None:
        self._emit([(seq, problem, detail)])

    def _settle(self, next_valid_id: int | None) -> None:
        """Report the held failing records, now that the intact one after them is known."""
        # A record edited in place keeps its row id, which lies between those of
        # its neighbours; one moved here from elsewhere does not.
        previous_id = self._valid_id
        for suspect in self._suspects:
            if (previous_id is not None and suspect.row_id <= previous_id) or (
                next_valid_id is not None and suspect.row_id >= next_valid_id
            ):
                suspect.reports.append(
                    (
                        suspect.seq,
                        "reordered",
                        f"{suspect.name} was stored out of seq order: it was moved here "
                        "from another position",
                    )
                )
            else:
                previous_id = suspect.row_id
            self._emit(suspect.reports)
        self._suspects.clear()

    def feed(
        self,
        row_id: int,
        seq: int,
        prev_hash: str,
        stored_hash: str,
        fields: Mapping[str, Any],
        *,
        version: int = 1,
        values: Sequence[Any] = (),
    ) -> None:
        """Check the next record (by seq). *fields* is as :func:`event_fields`
        returns; a *version* 2 record is hashed over *values*, its stored columns
        (:meth:`AuditChain.row_hash`). Any other version does not verify."""
        # Only spelled out when something is wrong: verify runs over every record,
        # and so do the checks below; the reports are built in helpers called only
        # when one fails.
        name = _Name(seq, fields)
        if fields.get("kind") == "connection_start" and fields.get("connection_id"):
            self.started_connections.setdefault(fields["connection_id"], seq)
        reports: list[_Report] = []
        expected = self._last_seq + 1
        explained = seq != expected
        if explained:
            reports.append(self._out_of_seq(seq, expected, name))
        if version == CHAIN_VERSION:
            changed = not self._chain.verifies(
                lambda chain: chain.row_hash(prev_hash, seq, values), stored_hash
            )
        elif version == 1:
            changed = not self._chain.verifies(
                lambda chain: chain.record_hash(prev_hash, seq, fields), stored_hash
            )
        else:
            changed = True
        if changed:
            self._hold(row_id, seq, name, reports)
        else:
            if self._valid_id is not None and row_id <= self._valid_id:
                stored = f"{name} was stored before seq {self._valid_seq}: row order was changed"
                reports.append((seq, "reordered", stored))
                explained = True
            if not (explained or self._last_changed or is_same_digest(prev_hash, self._last_hash)):
                # Both records verify, yet they were not written one after the other.
                reports.append(self._unchained(seq, name))
            self._settle(row_id)
            self._emit(reports)
            self._valid_id = row_id if self._valid_id is None else max(self._valid_id, row_id)
            self._valid_seq = seq
        self._last_seq = max(self._last_seq, seq)
        self._last_hash = stored_hash
        self._last_changed = changed
        self._records += 1

    def feed_batch(self, batch: StoredBatch) -> None:
        """Check the next sealed batch (chain version 3, gateway.audit.batch).

        Each record is checked against its own digest (``changed``) and its seq
        against the one before (``removed``, ``reordered``); the batch's MAC
        covers the digests, their order, the first seq and the link to what came
        before, and its index columns must match its records.
        """
        self._settle(None)  # records of chain version 1 or 2 before it
        first = batch.first_seq
        reports: list[_Report] = []
        try:
            parts = encoded_records(batch.records)
        except BatchFormatError:
            parts = []
            span = _span(first, batch.last_seq)
            reports.append((first, "changed", f"{span}: the batch's records are unreadable"))
        if batch.chain_version != BATCH_CHAIN_VERSION:
            parts = []
            span = _span(first, batch.last_seq)
            reports.append((first, "changed", f"{span}: the batch's chain version was edited"))
        size, stored = RECORD_DIGEST_BYTES, batch.digests
        known = {stored[at : at + size] for at in range(0, len(stored), size)}
        # The key the batch's MAC verifies under (after a master key rotation, an
        # older one) is the key its record digests were made with.
        chain = self._chain.verifying(
            lambda chain: chain.batch_hash(self.session_id, first, batch.prev_hash, stored),
            batch.hash,
        )
        sealed = chain is not None
        if chain is None:
            # An edited batch: the key its digests were made with is the one
            # under which most of them still match, so only the edited records
            # are named.
            chain = max(
                self._chain.candidates,
                key=lambda c: _matching(c.record_digests(self.session_id, parts), known),
            )
        recomputed = chain.record_digests(self.session_id, parts)
        # (kind, occurred_at) of each readable record, for the index columns
        indexed: list[tuple[str, int]] = []
        linked = self._last_changed or is_same_digest(batch.prev_hash, self._last_hash)
        decoded = []
        for position, part in enumerate(parts):
            fields = record_fields(decode_record(part) or ())
            seq = fields["seq"] if fields is not None and type(fields["seq"]) is int else None
            decoded.append((seq, position, fields))
        # Checked in seq order; a record stored elsewhere than its rank is reported.
        ordered = sorted(decoded, key=lambda item: (item[0] is None, item[0] or 0, item[1]))
        for rank, (own_seq, position, fields) in enumerate(ordered):
            expected = self._last_seq + 1
            seq = expected if own_seq is None else own_seq
            name = _Name(seq, fields or {})
            if seq != expected:
                reports.append(self._out_of_seq(seq, expected, name))
            if rank != position:
                moved = (
                    f"{name} was stored out of seq order: it was moved here from another position"
                )
                reports.append((seq, "reordered", moved))
            # A keyed digest over the record's bytes (its seq and session included)
            # can only come from that record: where it sits among the digests is
            # for the batch's MAC and the seq checks to judge.
            mine = recomputed[position * size : (position + 1) * size]
            if fields is None or mine not in known:
                reports.append((seq, "changed", f"{name} does not match its digest: it was edited"))
            elif rank == 0 and not linked and not reports:
                reports.append(self._unchained(seq, name))
            if fields is not None and type(fields["occurred_at"]) is int:
                indexed.append((fields["kind"], fields["occurred_at"]))
            if fields is not None and fields["kind"] == "connection_start":
                self.started_connections.setdefault(fields["connection_id"], seq)
            self._last_seq = max(self._last_seq, seq)
        if not parts:  # unreadable: its seqs are taken as the columns say
            self._last_seq = max(self._last_seq, batch.last_seq)
        elif not reports and not _index_matches(batch, indexed, self._last_seq):
            reports.append(
                (
                    first,
                    "changed",
                    f"the batch of {_span(first, batch.last_seq)} has index columns that do not"
                    " match its records (a search could pass them over): they were edited",
                )
            )
        self._emit(reports)
        if not sealed and not reports:
            self._batch_suspect = (
                self._last_seq + 1,
                (
                    first,
                    "changed",
                    f"the batch of {_span(first, batch.last_seq)} does not match its MAC:"
                    " its digests, first seq or link to the record before were edited",
                ),
            )
        self._last_hash = batch.hash
        self._last_changed = not sealed
        self._records += len(parts)

    def _out_of_seq(self, seq: int, expected: int, name: _Name) -> _Report:
        """The report for a record whose seq does not follow the previous one."""
        if seq > expected:
            return (expected, "removed", f"{_span(expected, seq - 1)} missing before {name}")
        return (seq, "reordered", f"{name} repeats or goes back after seq {self._last_seq}")

    def _hold(self, row_id: int, seq: int, name: _Name, reports: list[_Report]) -> None:
        """Keep a record that failed its hash until the next intact one settles it."""
        reports.append((seq, "changed", f"{name} does not match its hash: it was edited"))
        self._suspects.append(_Suspect(row_id, seq, name, reports))
        if len(self._suspects) >= _MAX_SUSPECTS:
            self._settle(None)

    def _unchained(self, seq: int, name: _Name) -> _Report:
        return (
            seq,
            "removed",
            f"{name} is not chained to seq {self._last_seq}: a record between "
            "them was removed or replaced",
        )

    def finish(
        self,
        *,
        ended: bool,
        count: int | None,
        head: str | None,
        seal: str | None,
    ) -> list[ChainProblem]:
        """Check the session's end against its seal; return every problem found."""
        self._settle(None)
        if seal is None:
            # A session that ended before the audit trail existed has neither
            # records nor a seal; one with records must have been sealed.
            if ended and self._records:
                self._report(
                    None, "seal", "the session has ended but its audit trail is not sealed"
                )
            elif count is not None or head is not None:
                self._report(None, "seal", "the session has a record count and head but no seal")
            self._emit([])
            return self._problems
        if (
            count is None
            or head is None
            or not self._chain.is_valid_seal(self.session_id, count, head, seal)
        ):
            self._report(None, "seal", "the seal does not match the recorded count and head")
            self._emit([])
            return self._problems
        if not ended:
            self._report(None, "seal", "the session is sealed but marked active: it was reopened")
        if self._last_seq < count:
            self._report(
                self._last_seq + 1,
                "truncated",
                f"{_span(self._last_seq + 1, count)} missing at the end "
                f"(the session was sealed with {count} records)",
            )
        elif self._last_seq > count:
            self._report(
                count + 1,
                "seal",
                f"{_span(count + 1, self._last_seq)} added after the session was sealed "
                f"with {count} records",
            )
        elif not is_same_digest(self._last_hash, head):
            self._report(
                count,
                "truncated",
                f"the last record, seq {count}, is not the one the session was sealed with",
            )
        self._emit([])
        return self._problems
