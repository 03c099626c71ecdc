"""What the journal's reader wrote to the trail since it last said: for the metrics.

The reader (the audit writer process, or the store thread in the in-process
mode) adds to a :class:`WriteStats` as it commits batches, and hands it over
with its progress report (:meth:`~gateway.audit.writer.AuditWriter.progressed`),
where the daemon's metrics take it. Counted per batch, off the event loop: the
relay does no work for it.

Invariant: nothing here holds SQL, a parameter or an error message; only
counts, SQLSTATE codes (PostgreSQL's own five-character codes, a bounded set)
and durations, so a stats frame can cross the control pipe as it is.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.audit.records import AuditEvent, EventRow

__all__ = ["WriteStats"]

_FIELDS: Final = tuple(AuditEvent.__dataclass_fields__)
_KIND: Final = _FIELDS.index("kind")
_SQLSTATE: Final = _FIELDS.index("sqlstate")
#: A SQLSTATE is five digits or upper-case letters (PostgreSQL docs, Appendix A).
_SQLSTATE_CODE: Final = re.compile(r"^[0-9A-Z]{5}$")
#: Anything else a row carries (a bug, a forged journal) is counted under this.
OTHER_SQLSTATE: Final = "other"


@dataclass(eq=False)
class WriteStats:
    #: statements written to the trail
    statements: int = 0
    #: statements that ended in an error, by the server's SQLSTATE
    errors: Counter[str] = field(default_factory=Counter)
    #: how long each committed batch took to write, in seconds
    batch_seconds: list[float] = field(default_factory=list)

    def add_batch(self, rows: Sequence[EventRow], seconds: float) -> None:
        """Count a committed batch of *rows* that took *seconds* to write."""
        self.batch_seconds.append(seconds)
        for row in rows:
            if row[_KIND] == "statement":
                self.statements += 1
                sqlstate = row[_SQLSTATE]
                if sqlstate is not None:
                    code = sqlstate if _SQLSTATE_CODE.match(sqlstate) else OTHER_SQLSTATE
                    self.errors[code] += 1

    def __bool__(self) -> bool:
        return bool(self.batch_seconds)

    def to_json(self) -> dict[str, Any]:
        return {
            "statements": self.statements,
            "errors": dict(self.errors),
            "batch_seconds": self.batch_seconds,
        }

    @classmethod
    def from_json(cls, data: Any) -> WriteStats:
        """The stats of a frame (raises ``TypeError``/``ValueError`` when malformed)."""
        if not isinstance(data, dict):
            raise TypeError("stats must be an object")
        errors = Counter({str(code): int(n) for code, n in dict(data.get("errors", {})).items()})
        return cls(
            statements=int(data.get("statements", 0)),
            errors=errors,
            batch_seconds=[float(s) for s in data.get("batch_seconds", [])],
        )
