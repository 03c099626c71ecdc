"""The audit sink: a child process of the daemon that writes the trail to the store.

Why a process and not the store thread: writing a statement record (validation,
canonical JSON, the HMAC chain, the INSERT) is Python work that holds the GIL, in
bursts of a whole batch. In a thread of the daemon that work stalls the event
loop, which relays every session, for the length of a switch interval at a time;
in a process of its own it runs beside the relay instead of in turns with it. The
relay's side of an append is one ``marshal`` of the batch's tuples and one pipe
write (:func:`encode_rows`).

The child (:mod:`gateway.app.audit_process`) opens the store itself, from the
state directory, exactly as the daemon does: no secret crosses the pipe. It exits
when its stdin closes, which also happens if the daemon dies.

The pipe protocol (private to this module): frames of a 4-byte big-endian length
and a payload. The child sends ``{"ready": true}`` (JSON) once the store is
open. Then, for each batch the daemon sends (``marshal`` of a list of event
tuples), it answers ``{"written": N}`` or ``{"error": CLASS, "message": TEXT}``,
where CLASS names a :class:`~gateway.errors.GatewayError` subclass. ``marshal``
is only safe for data from a trusted writer; here that is the parent, over a pipe
nobody else holds.

One limit: if the child dies after committing a batch but before answering, the
daemon sends the batch again to the next child, and those records appear twice
(each chained, so verification still passes). Nothing is lost either way.
"""

from __future__ import annotations

import asyncio
import json
import marshal
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final

import structlog

from gateway.audit.records import EventRow
from gateway.errors import ConfigError, GatewayError, InvalidRequest, NotFound, StoreError
from gateway.protocol.sqlstate import SqlState

log = structlog.get_logger(__name__)

_LENGTH: Final = struct.Struct("!I")
#: A batch of 500 statements with 64 KiB of SQL each is 32 MiB; refuse beyond.
MAX_FRAME_BYTES: Final = 256 * 1024 * 1024
START_TIMEOUT_SECONDS: Final = 60.0
CLOSE_TIMEOUT_SECONDS: Final = 10.0
#: The child's entry point (a composition root: it opens the store).
ENTRY_MODULE: Final = "gateway.app.audit_process"


class SinkError(GatewayError):
    """The audit writer process failed or went away."""

    sqlstate = SqlState.SYSTEM_ERROR


# --- the events, as plain tuples ---------------------------------------------------


def encode_rows(rows: Sequence[EventRow]) -> bytes:
    """A batch of rows as the pipe carries it (``marshal`` of a list of tuples).

    Raises :class:`InvalidRequest` for a row that holds something ``marshal``
    cannot carry (only a bug can put one there).
    """
    try:
        return marshal.dumps(rows if type(rows) is list else list(rows))
    except ValueError:
        raise InvalidRequest("an audit event holds a value that is not a plain value") from None


def decode_rows(payload: bytes) -> list[EventRow]:
    """The rows of an :func:`encode_rows` payload, as the store appends them."""
    rows: list[EventRow] = marshal.loads(payload)  # noqa: S302 (our own parent, over a private pipe)
    return rows


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
    """Runs and talks to the audit writer process; :meth:`append` is the
    :class:`~gateway.audit.writer.AuditWriter`'s append function.

    A process that has exited is started again by the next append, so a crash of
    the writer process costs a retry, not the trail.
    """

    def __init__(self, home: Path, *, log_format: str = "json", log_level: str = "info") -> None:
        self._home = home
        self._log_args = ["--log-format", log_format, "--log-level", log_level]
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self) -> None:
        async with self._lock:
            await self._spawn()

    async def append(self, rows: list[EventRow]) -> int:
        payload = encode_rows(rows)
        async with self._lock:
            proc = self._proc
            if proc is not None and proc.returncode is not None:
                log.warning("audit_sink_exited", pid=proc.pid, status=proc.returncode)
            if proc is None or proc.returncode is not None:
                proc = await self._spawn()
            assert proc.stdin is not None
            try:
                proc.stdin.write(_LENGTH.pack(len(payload)) + payload)
                await proc.stdin.drain()
                reply = await self._read_reply(proc)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                code = await self._reap(proc)
                log.warning("audit_sink_exited", pid=proc.pid, status=code)
                raise SinkError(
                    f"the audit writer process (pid {proc.pid}) exited"
                    f" (status {code}) before answering: {type(exc).__name__}"
                ) from None
        return _raise_reply(reply)

    async def close(self) -> None:
        async with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or proc.returncode is not None:
                return
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await proc.wait()
            except TimeoutError:
                log.error("audit_sink_kill", pid=proc.pid)
                proc.kill()
                await proc.wait()

    async def _spawn(self) -> asyncio.subprocess.Process:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            ENTRY_MODULE,
            "--home",
            str(self._home),
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
        self._proc = proc
        self.starts += 1
        log.info("audit_sink_started", pid=proc.pid, starts=self.starts)
        return proc

    @staticmethod
    async def _read_reply(proc: asyncio.subprocess.Process) -> dict[str, Any]:
        assert proc.stdout is not None
        (length,) = _LENGTH.unpack(await proc.stdout.readexactly(_LENGTH.size))
        reply: dict[str, Any] = json.loads(await proc.stdout.readexactly(length))
        return reply

    async def _reap(self, proc: asyncio.subprocess.Process) -> int | None:
        if self._proc is proc:
            self._proc = None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                return await proc.wait()
        except TimeoutError:
            proc.kill()
            return await proc.wait()


# --- the child ---------------------------------------------------------------------


def read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None  # the daemon closed our stdin: time to go
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME_BYTES:
        raise SinkError(f"a frame of {length} bytes is over the limit of {MAX_FRAME_BYTES}")
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return payload


def write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    payload = json.dumps(message).encode()
    stream.write(_LENGTH.pack(len(payload)) + payload)
    stream.flush()
