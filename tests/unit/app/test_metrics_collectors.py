"""The daemon's metrics, each fed through the hook its layer calls, read back
with Prometheus's own text parser."""

from __future__ import annotations

from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from gateway.app.metrics import GatewayMetrics, GatewayState
from gateway.audit.stats import WriteStats
from gateway.refusal import Refusal, RefusalPlace, RefusalReason


def _metrics(
    live: tuple[int, int] = (0, 0), backlog: int | None = 0, lease_age: float | None = 1.5
) -> GatewayMetrics:
    return GatewayMetrics(
        GatewayState(
            gateway_id="gw-1",
            live=lambda: live,
            audit_backlog=lambda: backlog,
            lease_age=lambda: lease_age,
        )
    )


def samples(metrics: GatewayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_state_gauges_are_read_at_each_scrape() -> None:
    live = [2, 5]
    metrics = GatewayMetrics(
        GatewayState(
            gateway_id="gw-1",
            live=lambda: (live[0], live[1]),
            audit_backlog=lambda: 123,
            lease_age=lambda: 0.25,
        )
    )
    assert value(metrics, "pam_grants_live") == 2
    assert value(metrics, "pam_connections_live") == 5
    live[:] = [1, 0]
    assert value(metrics, "pam_grants_live") == 1
    assert value(metrics, "pam_connections_live") == 0
    assert value(metrics, "pam_audit_backlog_bytes") == 123
    assert value(metrics, "pam_presence_lease_age_seconds") == 0.25
    assert value(metrics, "pam_gateway_info", gateway_id="gw-1", version=_version()) == 1


def test_an_audit_that_is_off_and_a_lease_not_yet_taken_have_no_sample() -> None:
    metrics = _metrics(backlog=None, lease_age=None)
    names = {name for name, _ in samples(metrics)}
    assert "pam_audit_backlog_bytes" not in names
    assert "pam_presence_lease_age_seconds" not in names
    assert "pam_grants_live" in names


def test_a_connection_end_counts_its_reason_and_its_bytes_each_way() -> None:
    metrics = _metrics()
    assert value(metrics, "pam_relayed_bytes_total", direction="client_to_server") == 0
    metrics.connection_ended("client_closed", 100, 2000)
    metrics.connection_ended("client_closed", 1, 2)
    metrics.connection_ended("error", 0, 0)
    assert value(metrics, "pam_connections_total", end_reason="client_closed") == 2
    assert value(metrics, "pam_connections_total", end_reason="error") == 1
    assert value(metrics, "pam_relayed_bytes_total", direction="client_to_server") == 101
    assert value(metrics, "pam_relayed_bytes_total", direction="server_to_client") == 2002


def test_upstream_sign_ins_are_a_histogram_by_outcome() -> None:
    metrics = _metrics()
    metrics.upstream_connected(0.03, ok=True)
    metrics.upstream_connected(0.2, ok=True)
    metrics.upstream_connected(12.0, ok=False)
    assert value(metrics, "pam_upstream_connect_seconds_count", outcome="ok") == 2
    assert value(metrics, "pam_upstream_connect_seconds_bucket", outcome="ok", le="0.05") == 1
    assert value(metrics, "pam_upstream_connect_seconds_sum", outcome="failed") == 12.0


def test_errors_refusals_and_rotations_are_counted_by_their_codes() -> None:
    metrics = _metrics()
    metrics.error_sent("3D000")
    metrics.error_sent("3D000")
    metrics.error_sent("57P01")
    metrics.refused(Refusal(RefusalPlace.LISTENER, RefusalReason.WRONG_DATABASE, "no", "::1"))
    metrics.rotation_ended(ok=True)
    assert value(metrics, "pam_errors_sent_total", sqlstate="3D000") == 2
    assert value(metrics, "pam_errors_sent_total", sqlstate="57P01") == 1
    assert value(metrics, "pam_refusals_total", place="listener", reason="wrong_database") == 1
    assert value(metrics, "pam_rotations_total", outcome="succeeded") == 1
    assert value(metrics, "pam_rotations_total", outcome="failed") == 0


def test_what_the_audit_wrote_moves_statements_errors_and_the_batch_histogram() -> None:
    metrics = _metrics()
    metrics.audit_written(
        WriteStats(statements=7, errors=Counter({"42P01": 2}), batch_seconds=[0.002, 0.004])
    )
    assert value(metrics, "pam_statements_relayed_total") == 7
    assert value(metrics, "pam_statement_errors_total", sqlstate="42P01") == 2
    assert value(metrics, "pam_audit_batch_write_seconds_count") == 2


def test_two_daemons_in_one_process_keep_their_own_counts() -> None:
    first, second = _metrics(), _metrics()
    first.error_sent("08006")
    assert value(first, "pam_errors_sent_total", sqlstate="08006") == 1
    assert value(second, "pam_errors_sent_total", sqlstate="08006") is None


def _version() -> str:
    from gateway import __version__

    return __version__
