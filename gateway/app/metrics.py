"""The daemon's Prometheus metrics: what it counts, and its own registry.

A composition-root piece: the app layer owns every prometheus object. The
layers below hand it counts through their ports and hooks, never per message
or per chunk: a connection's byte counts once, at its end
(:class:`~gateway.net.ports.ConnectionMetrics`); the statements and the
audit's batch times with the journal reader's progress reports
(:class:`~gateway.audit.stats.WriteStats`); refusals from the refusal recorder;
rotation results from :meth:`~gateway.app.gateway.Gateway.rotate`'s hook.

What is state, not an event (live grants and connections, the audit backlog,
the presence lease's age), is read when Prometheus scrapes, by
:class:`StateCollector`, from callables the composition root gives it: nothing
keeps a gauge up to date.

Invariants:
* One :class:`~prometheus_client.CollectorRegistry` per :class:`GatewayMetrics`
  (never the process-wide default), so two daemons in one test process, or a
  test's own, never collide.
* Labels take values from closed sets (end reasons, refusal reasons, outcomes)
  or SQLSTATE codes; never a name, an address, SQL or an error message.
* :meth:`GatewayMetrics.exposition` runs on the event loop (the state it reads
  belongs to the loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.audit.stats import WriteStats
from gateway.refusal import Refusal

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "GatewayState", "StateCollector"]

#: The text exposition format, version 0.0.4 (what Prometheus scrapes).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Upstream sign-in: TCP, TLS and SCRAM (a PBKDF2 of thousands of rounds on a
#: cache miss) take milliseconds to seconds; the default timeout is 10 s.
UPSTREAM_CONNECT_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: One audit batch (up to 500 rows, one transaction): about a millisecond on
#: SQLite, more on a remote PostgreSQL; seconds mean trouble.
AUDIT_BATCH_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
DIRECTIONS: Final = ("client_to_server", "server_to_client")


@dataclass(frozen=True)
class GatewayState:
    """Where the scrape-time gauges come from (each a cheap read on the loop)."""

    gateway_id: str
    #: (live grants, live connections)
    live: Callable[[], tuple[int, int]]
    #: journaled bytes the store does not hold yet (None: the audit is off)
    audit_backlog: Callable[[], int | None]
    #: seconds since this gateway's last presence renewal that worked (None: none yet)
    lease_age: Callable[[], float | None]


class StateCollector(Collector):
    """The gauges that are state, read at each scrape."""

    def __init__(self, state: GatewayState) -> None:
        self._state = state

    def describe(self) -> list[Metric]:
        # Names and types only (no reads): what registering checks for clashes.
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        state = self._state
        grants, connections = state.live()
        backlog = state.audit_backlog()
        lease_age = state.lease_age()
        yield from self._families(
            grants=grants, connections=connections, backlog=backlog, lease_age=lease_age
        )

    def _families(
        self,
        *,
        grants: int = 0,
        connections: int = 0,
        backlog: int | None = None,
        lease_age: float | None = None,
    ) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "pam_gateway_info",
            "This gateway: its id and pam version (always 1).",
            labels=["gateway_id", "version"],
        )
        info.add_metric([self._state.gateway_id, __version__], 1)
        yield info
        yield GaugeMetricFamily("pam_grants_live", "Access grants open on this gateway.", grants)
        yield GaugeMetricFamily(
            "pam_connections_live",
            "Client connections to this gateway's grants (relaying or starting).",
            connections,
        )
        audit = GaugeMetricFamily(
            "pam_audit_backlog_bytes",
            "Audit journal bytes not yet written to the trail in the store"
            " (absent when the audit is off).",
        )
        if backlog is not None:
            audit.add_metric([], backlog)
        yield audit
        lease = GaugeMetricFamily(
            "pam_presence_lease_age_seconds",
            "Seconds since this gateway last renewed its presence lease in the store.",
        )
        if lease_age is not None:
            lease.add_metric([], lease_age)
        yield lease


class GatewayMetrics:
    """The daemon's metrics, in a registry of their own; implements
    :class:`~gateway.net.ports.ConnectionMetrics`."""

    def __init__(self, state: GatewayState) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.connections = Counter(
            "pam_connections",
            "Client connections recorded as ended, by end reason (failed set-ups: error).",
            ["end_reason"],
            registry=registry,
        )
        self.relayed_bytes = Counter(
            "pam_relayed_bytes",
            "Bytes relayed, by direction; counted when each connection ends.",
            ["direction"],
            registry=registry,
        )
        for direction in DIRECTIONS:
            self.relayed_bytes.labels(direction)
        self.statements = Counter(
            "pam_statements_relayed",
            "Statements relayed, as written to the audit trail (0 with the audit off).",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "pam_statement_errors",
            "Relayed statements that the server answered with an error, by SQLSTATE"
            " (from the audit trail).",
            ["sqlstate"],
            registry=registry,
        )
        self.errors_sent = Counter(
            "pam_errors_sent",
            "ErrorResponses the gateway itself sent to clients, by SQLSTATE.",
            ["sqlstate"],
            registry=registry,
        )
        self.refusals = Counter(
            "pam_refusals",
            "Callers turned away, by place (api, listener, tunnel) and reason.",
            ["place", "reason"],
            registry=registry,
        )
        self.rotations = Counter(
            "pam_rotations",
            "Credential rotations finished, by outcome (succeeded, failed).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("succeeded", "failed"):
            self.rotations.labels(outcome)
        self.upstream_connect = Histogram(
            "pam_upstream_connect_seconds",
            "Time to sign in to a database server (TCP, TLS, authentication), by outcome.",
            ["outcome"],
            buckets=UPSTREAM_CONNECT_BUCKETS,
            registry=registry,
        )
        self.audit_batch = Histogram(
            "pam_audit_batch_write_seconds",
            "Time to write one batch of audit records to the store.",
            buckets=AUDIT_BATCH_BUCKETS,
            registry=registry,
        )
        registry.register(StateCollector(state))

    # --- gateway.net.ports.ConnectionMetrics ------------------------------------------

    def upstream_connected(self, seconds: float, *, ok: bool) -> None:
        self.upstream_connect.labels("ok" if ok else "failed").observe(seconds)

    def error_sent(self, sqlstate: str) -> None:
        self.errors_sent.labels(sqlstate).inc()

    def connection_ended(self, reason: str, bytes_from_client: int, bytes_from_server: int) -> None:
        self.connections.labels(reason).inc()
        if bytes_from_client:
            self.relayed_bytes.labels("client_to_server").inc(bytes_from_client)
        if bytes_from_server:
            self.relayed_bytes.labels("server_to_client").inc(bytes_from_server)

    # --- the other hooks ----------------------------------------------------------------

    def refused(self, refusal: Refusal) -> None:
        self.refusals.labels(str(refusal.place), str(refusal.reason)).inc()

    def rotation_ended(self, *, ok: bool) -> None:
        self.rotations.labels("succeeded" if ok else "failed").inc()

    def audit_written(self, stats: WriteStats) -> None:
        if stats.statements:
            self.statements.inc(stats.statements)
        for sqlstate, count in stats.errors.items():
            self.upstream_errors.labels(sqlstate).inc(count)
        for seconds in stats.batch_seconds:
            self.audit_batch.observe(seconds)

    def exposition(self) -> bytes:
        """Everything, in the Prometheus text format."""
        return generate_latest(self.registry)
