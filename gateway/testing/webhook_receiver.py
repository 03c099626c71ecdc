"""A real HTTP receiver for webhook tests: ``http.server`` on 127.0.0.1 in a thread.

:class:`WebhookReceiver` records every request it gets (method, path, headers,
the raw body) and answers as a test tells it: 200 by default, a chosen status
for the next N requests (:meth:`WebhookReceiver.fail_next`), or no answer at
all until released (:meth:`WebhookReceiver.hold_next`). It can be stopped (the
port refuses connections: a receiver that is down) and started again on the
same port.

Invariants: a request is recorded before it is answered (or held), so a test
that saw it knows the gateway sent it; :meth:`WebhookReceiver.stop` releases
every held request and closes the listening socket before it returns.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.testing.net import LOOPBACK_HOST

__all__ = ["ReceivedRequest", "WebhookReceiver"]

#: the longest a held request waits for its release
_HOLD_LIMIT_SECONDS = 300.0


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    path: str
    #: header names in lower case
    headers: dict[str, str]
    body: bytes
    #: what the receiver answered (None: held, or never answered)
    status: int | None

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []
        self._failures: list[int] = []
        self._holds = 0
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK_HOST}:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver._answer(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test reads the recorded requests

        self._release.clear()
        server = ThreadingHTTPServer((LOOPBACK_HOST, self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (connections to the port are refused) and release held requests."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # --- what to answer ----------------------------------------------------------------

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next *count* requests with *status*."""
        with self._lock:
            self._failures += [status] * count

    def hold_next(self, count: int = 1) -> None:
        """Give the next *count* requests no answer until :meth:`release` (or stop)."""
        with self._lock:
            self._holds += count
        self._release.clear()

    def release(self) -> None:
        """Answer every held request (200)."""
        self._release.set()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        with self._lock:
            hold = self._holds > 0
            self._holds -= hold
            status = None if hold else (self._failures.pop(0) if self._failures else 200)
            self._requests.append(
                ReceivedRequest(
                    handler.command,
                    handler.path,
                    {k.lower(): v for k, v in handler.headers.items()},
                    body,
                    status,
                )
            )
        if hold:
            self._release.wait(_HOLD_LIMIT_SECONDS)
            status = 200
        handler.send_response(status or 200)
        handler.send_header("Content-Length", "2")
        handler.end_headers()
        handler.wfile.write(b"ok")

    # --- what came ---------------------------------------------------------------------

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def events(self, event: str | None = None) -> list[ReceivedRequest]:
        """The requests whose ``X-Pam-Event`` is *event* (every request when None)."""
        return [r for r in self.requests if event is None or r.headers.get("x-pam-event") == event]

    def wait_for(self, event: str, count: int = 1, timeout: float = 30.0) -> list[ReceivedRequest]:
        """At least *count* requests of *event*; AssertionError after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(event)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                seen = [r.headers.get("x-pam-event") for r in self.requests]
                raise AssertionError(f"no {count} x {event} within {timeout}s; got {seen}")
            time.sleep(0.05)
