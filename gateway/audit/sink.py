"""The audit sink: a child process of the daemon that turns the journal into the trail.

Why a process and not the store thread: pairing statements, redacting and
writing the trail (validation, the HMAC chain, the INSERT) is Python work that
holds the GIL. In a thread of the daemon that work stalls the event loop, which
relays every session; in a process of its own it runs beside the relay. The
relay's side is one journal write per chunk (:mod:`gateway.audit.journal`).

The child (:mod:`gateway.app.audit_process`) opens the store itself, from the
state directory, exactly as the daemon does, and reads the stored passwords it
masks from there: no secret crosses the pipe or the journal. It reads the
journal's segments itself (:class:`~gateway.audit.replay.JournalProcessor`). It
exits when its stdin closes, which also happens if the daemon dies.

The control pipe (private to this module): frames of a 4-byte big-endian length
and a JSON payload. The child sends ``{"ready": true}`` once the store is open
(or ``{"error": CLASS, "message": TEXT}`` and exits). The daemon sends
``{"op": "flush"}`` to have what is journaled committed now rather than at the
next full batch or interval (a drain). The child sends ``{"progress": [SEGMENT,
OFFSET]}`` whenever the store holds the journal up to there (with ``"stats"``:
what it wrote since its last report, :class:`~gateway.audit.stats.WriteStats`),
and ``{"error": CLASS, "message": TEXT}`` when a write fails (it retries), where CLASS names a
:class:`~gateway.errors.GatewayError` subclass. When its stdin closes it
processes the journal to its end, reports, and exits.

If the child dies, the daemon starts another, which goes on from the checkpoint
the last one left (see :mod:`gateway.audit.replay`): what was committed after
the last checkpoint appears twice (each copy chained, so verification passes);
nothing is lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import structlog

from gateway.audit.stats import WriteStats
from gateway.errors import ConfigError, GatewayError, InvalidRequest, NotFound, StoreError
from gateway.protocol.sqlstate import SqlState

if TYPE_CHECKING:
    from gateway.audit.writer import AuditWriter

log = structlog.get_logger(__name__)

_LENGTH: Final = struct.Struct("!I")
#: The control frames are a few bytes of JSON; anything this long is no frame.
MAX_FRAME_BYTES: Final = 1024 * 1024
START_TIMEOUT_SECONDS: Final = 60.0
#: How long an ordered shutdown waits for the child to finish the journal; what
#: it has not processed by then is recovered at the next start.
CLOSE_TIMEOUT_SECONDS: Final = 30.0
RESTART_INTERVAL_SECONDS: Final = 1.0
#: The child's entry point (a composition root: it opens the store).
ENTRY_MODULE: Final = "gateway.app.audit_process"


class SinkError(GatewayError):
    """The audit writer process failed or went away."""

    sqlstate = SqlState.SYSTEM_ERROR


# --- errors across the pipe ----------------------------------------------------------


#: Errors the child reports by class name, raised again as such in the daemon.
_ERRORS: Final[dict[str, type[GatewayError]]] = {
    cls.__name__: cls for cls in (InvalidRequest, NotFound, ConfigError, SinkError)
}


def error_reply(exc: BaseException) -> dict[str, Any]:
    # Our own errors are written never to hold a value; anything else's text might
    # quote the SQL or a parameter it choked on, so only its type crosses.
    message = (
        exc.message
        if isinstance(exc, GatewayError)
        else f"unexpected {type(exc).__name__} in the audit writer process"
    )
    name = type(exc).__name__
    return {"error": name if name in _ERRORS else "StoreError", "message": message}


def _raise_reply(reply: dict[str, Any]) -> int:
    if "written" in reply:
        return int(reply["written"])
    name, message = str(reply.get("error")), str(reply.get("message"))
    if name == "StoreError":
        raise StoreError(message)
    raise _ERRORS.get(name, SinkError)(message)


# --- the daemon's side -------------------------------------------------------------


class AuditSink:
    """Runs and talks to the audit writer process: the
    :class:`~gateway.audit.writer.AuditWriter`'s journal consumer.

    A process that exits unexpectedly is started again at once (retrying every
    ``RESTART_INTERVAL_SECONDS`` while it cannot start), so a crash of the writer
    process costs a replay from its checkpoint, not the trail.
    """

    def __init__(
        self,
        home: Path,
        *,
        log_format: str = "json",
        log_level: str = "info",
        journal_dir: Path | None = None,
    ) -> None:
        self._home = home
        self._log_args = ["--log-format", log_format, "--log-level", log_level]
        if journal_dir is not None:  # a relay worker's own journal
            self._log_args += ["--journal", str(journal_dir)]
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: AuditWriter | None = None
        self._run: str = ""
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_running(self) -> bool:
        """Whether the writer process is up (between a crash and its restart: not)."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self, writer: AuditWriter) -> None:
        self._writer = writer
        self._run = writer.journal.run
        self._proc = await self._spawn()
        self._monitor = asyncio.create_task(self._watch(), name="audit-sink-monitor")

    def flush(self) -> None:
        self._send({"op": "flush"})

    async def close(self) -> None:
        self._closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await proc.wait()
            except TimeoutError:
                # What it did not get to stays in the journal for the next start.
                log.error("audit_sink_kill", pid=proc.pid)
                proc.kill()
                await proc.wait()
        if self._monitor is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await asyncio.gather(self._monitor, return_exceptions=True)
            except TimeoutError:
                self._monitor.cancel()
        self._proc = None

    def _send(self, message: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return
        if proc.stdin.is_closing():
            return
        payload = json.dumps(message).encode()
        proc.stdin.write(_LENGTH.pack(len(payload)) + payload)

    async def _watch(self) -> None:
        """Hand the child's reports to the writer; start a new child when it dies."""
        writer = self._writer
        assert writer is not None
        while True:
            proc = self._proc
            assert proc is not None
            try:
                reply = await self._read_reply(proc)
            except (ConnectionError, asyncio.IncompleteReadError, ValueError):
                code = await proc.wait()
                if self._closing:
                    return
                log.warning("audit_sink_exited", pid=proc.pid, status=code)
                await writer.failure(
                    SinkError(f"the audit writer process (pid {proc.pid}) exited (status {code})")
                )
                self._proc = await self._respawn()
                continue
            if "progress" in reply:
                segment, offset = reply["progress"]
                await writer.progressed(int(segment), int(offset), _stats(reply))
            elif "error" in reply:
                try:
                    _raise_reply(reply)
                except GatewayError as exc:
                    await writer.failure(exc)

    async def _respawn(self) -> asyncio.subprocess.Process:
        while True:
            try:
                return await self._spawn()
            except GatewayError as exc:
                assert self._writer is not None
                await self._writer.failure(exc)
                await asyncio.sleep(RESTART_INTERVAL_SECONDS)

    async def _spawn(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            ENTRY_MODULE,
            "--home",
            str(self._home),
            "--run",
            self._run,
            *self._log_args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # Its log lines go where the daemon's go.
            stderr=None,
        )
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                reply = await self._read_reply(proc)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            if proc.returncode is None:
                proc.kill()
            code = await proc.wait()
            raise SinkError(
                f"the audit writer process did not start (status {code}, {type(exc).__name__})"
            ) from None
        if not reply.get("ready"):
            await proc.wait()
            _raise_reply(reply)
        self.starts += 1
        log.info("audit_sink_started", pid=proc.pid, starts=self.starts)
        return proc

    @staticmethod
    async def _read_reply(proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        (length,) = _LENGTH.unpack(await proc.stdout.readexactly(_LENGTH.size))
        if length > MAX_FRAME_BYTES:
            raise ValueError("an oversized frame from the audit writer process")
        reply: dict[str, Any] = json.loads(await proc.stdout.readexactly(length))
        return reply


def _stats(reply: dict[str, Any]) -> WriteStats | None:
    if "stats" not in reply:
        return None
    try:
        return WriteStats.from_json(reply["stats"])
    except (TypeError, ValueError, AttributeError):
        log.warning("audit_sink_stats_malformed")
        return None


# --- the child ---------------------------------------------------------------------


class FrameReader:
    """The daemon's control frames from a raw file descriptor (the child's stdin),
    for a ``select`` loop: a buffered reader could hold a frame ``select`` does not see."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        self.eof = False

    def fileno(self) -> int:
        return self._fd

    def read(self) -> list[dict[str, Any]]:
        """The whole frames that arrived (call when the descriptor is readable)."""
        data = os.read(self._fd, 65536)
        if not data:
            self.eof = True  # the daemon closed our stdin: time to go
            return []
        self._buf += data
        frames = []
        while len(self._buf) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buf)
            if length > MAX_FRAME_BYTES:
                raise SinkError(f"a frame of {length} bytes is over the limit of {MAX_FRAME_BYTES}")
            if len(self._buf) < _LENGTH.size + length:
                break
            frames.append(json.loads(self._buf[_LENGTH.size : _LENGTH.size + length]))
            del self._buf[: _LENGTH.size + length]
        return frames


def write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    payload = json.dumps(message).encode()
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()
