"""The audit trail at run time: the journal, its reader, fail-closed mode and each connection's tap.

:class:`AuditRuntime` opens the run's :class:`~gateway.audit.journal.Journal`,
starts its reader (the :class:`~gateway.audit.sink.AuditSink` process, or a
:class:`~gateway.audit.replay.JournalProcessor` on the store thread), keeps the
fail-closed state and builds the per-connection
:class:`~gateway.audit.tap.ConnectionAudit`.

Invariants:
* With ``audit_fail_closed``, from the first failed write until one succeeds
  again, :meth:`AuditRuntime.refusal` refuses every new connection and every live
  one is cut (``cut_live``) with the end reason ``audit_unavailable``.
* Every stored password is masked in each connection's trail, not only the
  connection's own: the reader loads them itself (the writer process from the
  store; the in-process mode through ``stored_secrets``), and reloads them at
  the journal's SECRETS record (:meth:`AuditRuntime.secrets_changed`).
* :meth:`AuditRuntime.close` flushes what the relays have journaled before the
  sessions are sealed.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.audit.export import TrailExporter, build_exporter
from gateway.audit.journal import Journal
from gateway.audit.ports import AuditStore, StoreThread
from gateway.audit.replay import JournalProcessor, TrackerSettings
from gateway.audit.sink import AuditSink
from gateway.audit.tap import ConnectionAudit
from gateway.audit.writer import AuditWriter, JournalConsumer
from gateway.config import GatewaySettings
from gateway.net.relay import Termination
from gateway.protocol.sqlstate import SqlState
from gateway.reasons import ConnectionEndReason

#: How new connections are refused while the trail cannot be written.
REFUSAL = Termination(
    ConnectionEndReason.AUDIT_UNAVAILABLE,
    SqlState.CANNOT_CONNECT_NOW,
    "pam refuses new connections: the audit trail cannot be written (fail-closed mode)",
    hint="an administrator must restore the gateway's store; check the gateway log",
)
#: How live connections are cut when the trail cannot be written.
CUT = Termination(
    ConnectionEndReason.AUDIT_UNAVAILABLE,
    SqlState.ADMIN_SHUTDOWN,
    "terminating connection: the audit trail cannot be written and pam is in fail-closed mode",
    hint="reconnect once the gateway's store is back",
)


def _cut_nothing(_termination: Termination) -> None:
    pass


def _no_secrets() -> tuple[str, ...]:
    return ()


def tracker_settings(settings: GatewaySettings) -> TrackerSettings:
    return TrackerSettings(
        tuple(settings.audit_redact_patterns),
        settings.audit_parameters,
        settings.audit_max_value_bytes,
    )


@dataclass(eq=False)
class AuditRuntime:
    store: AuditStore
    db: StoreThread
    settings: GatewaySettings
    #: the audit writer process (None: the journal is read on the store thread)
    sink: AuditSink | None = None
    #: ends every live connection (fail-closed mode); set by the composition root
    cut_live: Callable[[Termination], None] = _cut_nothing
    #: where the journal lives (None: a private temporary directory, gone at close)
    journal_dir: Path | None = None
    #: every stored password (in-process mode; the writer process reads its own)
    stored_secrets: Callable[[], tuple[str, ...]] = _no_secrets
    writer: AuditWriter | None = None
    #: set while the audit trail cannot be written and fail-closed is on
    _down: BaseException | None = None
    _temporary: Path | None = None
    _exporter: TrailExporter | None = None

    async def start(self) -> None:
        """Open the journal and start its reader, if the audit is enabled."""
        if not self.settings.audit_enabled:
            return
        directory = self.journal_dir
        if directory is None:
            directory = self._temporary = Path(tempfile.mkdtemp(prefix="pam-audit-journal-"))
        journal = Journal(directory)
        consumer: JournalConsumer
        if self.sink is not None:
            consumer = self.sink
        else:
            # The writer process exports by itself; here the store thread's reader does.
            self._exporter = build_exporter(self.settings)
            processor = JournalProcessor(
                directory,
                journal.run,
                self.store,
                tracker_settings(self.settings),
                self.stored_secrets,
                exporter=self._exporter,
            )
            consumer = StoreThreadConsumer(processor, self.db)
        self.writer = AuditWriter(
            journal, consumer, on_failure=self._on_failure, on_recovery=self._on_recovery
        )
        await self.writer.start()

    def refusal(self) -> Termination | None:
        """Why new connections are refused for the audit's sake right now, if they are."""
        return None if self._down is None else REFUSAL

    def connection_audit(
        self, session_id: str, connection_id: str, secrets: tuple[str, ...]
    ) -> ConnectionAudit | None:
        """The statement tap of a new connection (None: audit off). *secrets* are
        stored passwords, which the journal's reader masks by itself."""
        if not self.settings.audit_enabled or self.writer is None:
            return None
        return ConnectionAudit(self.writer, session_id, connection_id)

    def secrets_changed(self) -> None:
        """The stored passwords changed: the reader reloads them from here on."""
        if self.writer is not None:
            self.writer.secrets_changed()

    async def drain(self) -> None:
        """Wait (bounded) until what the relays journaled is in the store."""
        if self.writer is not None:
            await self.writer.drain()

    async def close(self) -> None:
        """Flush the trail, then stop the reader (and its process)."""
        if self.writer is not None:
            await self.writer.close()
        if self._exporter is not None:
            await asyncio.to_thread(self._exporter.close)
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)

    async def _on_failure(self, exc: BaseException | None) -> None:
        if not self.settings.audit_fail_closed:
            return
        self._down = exc or RuntimeError("audit failure")
        self.cut_live(CUT)

    async def _on_recovery(self, _exc: BaseException | None) -> None:
        self._down = None


class StoreThreadConsumer:
    """Reads the journal into the store on the store thread (the in-process mode):
    the same :class:`JournalProcessor` as the writer process, polled every
    ``interval`` seconds or at once when flushed."""

    def __init__(
        self,
        processor: JournalProcessor,
        db: StoreThread,
        *,
        interval: float = 0.05,
        retry_interval: float = 1.0,
    ) -> None:
        self._processor = processor
        self._db = db
        self._interval = interval
        self._retry_interval = retry_interval
        self._wakeup = asyncio.Event()
        self._flush = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def start(self, writer: AuditWriter) -> None:
        self._task = asyncio.create_task(self._run(writer), name="audit-journal-reader")

    def flush(self) -> None:
        self._flush = True
        self._wakeup.set()

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, writer: AuditWriter) -> None:
        processor, recovered = self._processor, False
        while True:
            closing, flush, self._flush = self._closing, self._flush, False
            try:
                if not recovered:
                    await self._db(processor.recover)
                    recovered = True
                if closing:
                    position = await self._db(processor.finish)
                else:
                    position = await self._db(functools.partial(processor.poll, flush=flush))
                stats = processor.take_stats()
            except Exception as exc:  # the store's failure: the writer decides
                await writer.failure(exc)
                if closing:
                    return  # left in the journal for the next start
                await self._pause(self._retry_interval)
                continue
            await writer.progressed(*position, stats)
            if closing:
                return
            await self._pause(self._interval)

    async def _pause(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        except TimeoutError:
            pass
        self._wakeup.clear()
