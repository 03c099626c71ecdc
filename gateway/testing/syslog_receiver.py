"""A real syslog collector for tests: RFC 5424 messages, octet-counted (RFC 6587), over TCP or TLS.

:class:`SyslogReceiver` runs an asyncio server on 127.0.0.1 in a thread of its
own (so a synchronous test, or one whose daemon is another process, can use
it), splits each connection's bytes into frames (``MSG-LEN SP SYSLOG-MSG``,
RFC 6587 3.4.1), parses each as RFC 5424 (:func:`parse_message`) and records it.
It can be stopped (the port refuses connections: a collector that is down) and
started again on the same port.

Invariants: a frame that is not octet-counted RFC 5424 is a test failure, not
something to skip: it is recorded in :attr:`SyslogReceiver.errors` and the
connection closed.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

from gateway.testing.net import LOOPBACK_HOST

__all__ = ["SyslogMessage", "SyslogReceiver", "parse_message", "split_frames"]

_BOM: Final = b"\xef\xbb\xbf"
_MAX_FRAME: Final = 16 * 1024 * 1024
#: RFC 5424 6: PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP
_HEADER: Final = re.compile(
    rb"^<(\d{1,3})>(\d{1,2}) (\S+) (\S+) (\S+) (\S+) (\S+) ",
)
_SD_PARAM: Final = re.compile(rb'\s*([^= \]"]+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class SyslogMessage:
    facility: int
    severity: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    #: SD-ID -> {name: value} (values unescaped)
    structured_data: dict[str, dict[str, str]]
    msg: bytes

    def json(self) -> Any:
        """The MSG as JSON (after its BOM)."""
        body = self.msg[len(_BOM) :] if self.msg.startswith(_BOM) else self.msg
        return json.loads(body)


def split_frames(buffer: bytearray) -> list[bytes]:
    """Take every whole octet-counted frame off the front of *buffer*."""
    frames: list[bytes] = []
    while True:
        space = buffer.find(b" ")
        if space < 0:
            if len(buffer) > 10:
                raise ValueError(f"no MSG-LEN in {bytes(buffer[:20])!r}")
            return frames
        length_text = bytes(buffer[:space])
        if not length_text.isdigit() or length_text.startswith(b"0"):
            raise ValueError(f"bad MSG-LEN {length_text!r}")
        length = int(length_text)
        if length > _MAX_FRAME:
            raise ValueError(f"MSG-LEN {length} too large")
        if len(buffer) < space + 1 + length:
            return frames
        frames.append(bytes(buffer[space + 1 : space + 1 + length]))
        del buffer[: space + 1 + length]


def _unescape(value: bytes) -> str:
    return re.sub(rb"\\([\"\\\]])", rb"\1", value).decode("utf-8")


def parse_message(frame: bytes) -> SyslogMessage:
    """One RFC 5424 SYSLOG-MSG (raises ``ValueError`` when it is not one)."""
    header = _HEADER.match(frame)
    if header is None:
        raise ValueError(f"not an RFC 5424 header: {frame[:80]!r}")
    pri = int(header.group(1))
    rest = frame[header.end() :]
    sd: dict[str, dict[str, str]] = {}
    if rest.startswith(b"-"):
        rest = rest[1:]
    else:
        while rest.startswith(b"["):
            end = rest.find(b" ")
            sd_id = rest[1:end].decode("ascii")
            params: dict[str, str] = {}
            position = end
            while True:
                found = _SD_PARAM.match(rest, position)
                if found is None:
                    break
                params[found.group(1).decode("ascii")] = _unescape(found.group(2))
                position = found.end()
            if rest[position : position + 1] != b"]":
                raise ValueError(f"unterminated SD-ELEMENT in {frame[:120]!r}")
            sd[sd_id] = params
            rest = rest[position + 1 :]
    if rest and not rest.startswith(b" "):
        raise ValueError(f"no SP before MSG in {frame[:120]!r}")
    fields = [g.decode("ascii") for g in header.groups()[2:]]
    return SyslogMessage(
        facility=pri // 8,
        severity=pri % 8,
        version=int(header.group(2)),
        timestamp=fields[0],
        hostname=fields[1],
        app_name=fields[2],
        procid=fields[3],
        msgid=fields[4],
        structured_data=sd,
        msg=rest[1:],
    )


class SyslogReceiver:
    def __init__(self, *, tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.port = port
        self._tls = tls
        self._lock = threading.Lock()
        self._messages: list[SyslogMessage] = []
        self.errors: list[str] = []
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def messages(self) -> list[SyslogMessage]:
        with self._lock:
            return list(self._messages)

    def start(self) -> SyslogReceiver:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        loop = self._loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, LOOPBACK_HOST, self.port, ssl=self._tls)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="syslog-receiver", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the syslog receiver did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every connection (the port then refuses)."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shut() -> None:
            server.close()
            for writer in list(self._writers):
                writer.close()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._server = self._thread = None

    def __enter__(self) -> SyslogReceiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[SyslogMessage]:
        """The messages once there are at least *count* (``AssertionError`` if not in time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.messages
            if len(messages) >= count or self.errors:
                break
            time.sleep(0.05)
        assert not self.errors, self.errors
        messages = self.messages
        assert len(messages) >= count, f"{len(messages)} of {count} syslog messages arrived"
        return messages

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                buffer += data
                parsed = [parse_message(frame) for frame in split_frames(buffer)]
                with self._lock:
                    self._messages += parsed
        except ValueError as exc:
            with self._lock:
                self.errors.append(str(exc))
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            if task is not None:
                self._tasks.discard(task)
