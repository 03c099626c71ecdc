"""What the journal's reader tells the metrics about each batch it wrote."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from gateway.audit.records import AuditEvent, event_rows
from gateway.audit.stats import WriteStats

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _event(kind: str, sqlstate: str | None = None) -> AuditEvent:
    return AuditEvent(
        session_id="s",
        connection_id="c",
        kind=kind,  # type: ignore[arg-type]
        occurred_at=T0,
        status=None if kind != "statement" else ("error" if sqlstate else "ok"),
        sqlstate=sqlstate,
    )


def test_a_batch_counts_statements_and_their_errors_not_connection_events() -> None:
    stats = WriteStats()
    assert not stats
    rows = event_rows(
        [
            _event("connection_start"),
            _event("statement"),
            _event("statement", "42P01"),
            _event("statement", "42P01"),
            _event("statement", "<script>"),
            _event("connection_end"),
        ]
    )
    stats.add_batch(rows, 0.01)
    assert stats
    assert stats.statements == 4
    assert stats.errors == {"42P01": 2, "other": 1}
    assert stats.batch_seconds == [0.01]


def test_stats_cross_the_control_pipe_as_json_unchanged() -> None:
    stats = WriteStats()
    stats.add_batch(event_rows([_event("statement", "22012")]), 0.5)
    again = WriteStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert (again.statements, again.errors, again.batch_seconds) == (1, {"22012": 1}, [0.5])
