"""What a running `pam db access` shows, and the keys it reads.

A :class:`View` is told what happens to the grant (granted, extended, about to
expire, ended) and shows it: :class:`TextView` for people (the grant's URL and
connection strings; on a terminal a status line with the time left, updated
every second; plain lines otherwise), :class:`JsonEvents` for scripts (one JSON
object per line, flushed, nothing else on stdout). :class:`ExpiryWatch` says
when the "expiring" events are due; :class:`KeyReader` reads single keys (``e``:
extend) from a terminal.

Invariants:
* The terminal is put back as it was on every way out of :class:`KeyReader`
  (its ``with`` block), Ctrl+C and SIGTERM included; Ctrl+C still interrupts
  (cbreak mode keeps ISIG). Keys are read only when stdin is a terminal and
  this process is in its foreground.
* Text from the gateway (an end detail) reaches the terminal escaped
  (:func:`cli.render.printable`), never as markup.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import sys
import termios
import threading
import tty
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Protocol

from rich.live import Live
from rich.text import Text

from cli.client import SessionJson
from cli.render import console, human_duration, local_time, parse_time, printable
from gateway.durations import format_duration, in_words

__all__ = [
    "ExpiryWatch",
    "JsonEvents",
    "KeyReader",
    "TextView",
    "View",
    "expires_at",
]

#: how long the key thread waits for a key before checking whether to stop
_KEY_POLL_SECONDS = 0.2


def expires_at(session: SessionJson) -> datetime:
    moment = parse_time(session["expires_at"])
    assert moment is not None
    return moment


class ExpiryWatch:
    """Which "expiring" events are due: one per lead time (seconds before the
    expiry), longest first; a lead already past when the expiry was set (the
    grant opened or was extended within it) is not owed, as at the gateway."""

    def __init__(self, leads: Sequence[int], expiry: datetime, now: datetime) -> None:
        self._leads = sorted(set(leads), reverse=True)
        self._pending: list[int] = []
        self._expiry = expiry
        self.reset(expiry, now)

    def reset(self, expiry: datetime, now: datetime) -> None:
        """The expiry moved (an extension): the leads before it are owed again."""
        self._expiry = expiry
        self._pending = [lead for lead in self._leads if expiry - timedelta(seconds=lead) > now]

    def due(self, now: datetime) -> list[int]:
        """The leads whose time has come since the last call, longest first."""
        due = [lead for lead in self._pending if now >= self._expiry - timedelta(seconds=lead)]
        self._pending = [lead for lead in self._pending if lead not in due]
        return due


class View(Protocol):
    """What `pam db access` tells whoever watches it."""

    def granted(self, session: SessionJson, info: Any) -> None: ...

    def extended(self, session: SessionJson, previous: str) -> None: ...

    def expiring(self, session: SessionJson, lead: int) -> None: ...

    def warn(self, message: str, hint: str | None = None) -> None: ...

    def tick(self, session: SessionJson) -> None:
        """Once a second: refresh whatever shows the time left."""
        ...

    def stop(self) -> None:
        """The watch is over: remove the status line (if any)."""
        ...

    def ended_by_gateway(self, state: SessionJson) -> None: ...

    def ended_by_client(self, state: SessionJson, elapsed: str) -> None: ...


class TextView:
    """For people: the grant's details, a status line on a terminal, plain lines
    for events otherwise."""

    def __init__(self, *, extend_by: int | None) -> None:
        #: the ``e`` key's extension (None: no keys are read)
        self.extend_by = extend_by
        self._live: Live | None = None

    def granted(self, session: SessionJson, info: Any) -> None:
        console.print(
            f"[bold green]Access granted[/]: session {session['id'][:8]} for"
            f" {session['resource_name']}/{session['account_name']},"
            f" expires {local_time(session['expires_at'])}"
        )
        console.print(f"  URL   {info.url}")
        console.print(f"  psql  {info.psql}")
        console.print(f"  JDBC  {info.jdbc}")
        if session["listen_host"].startswith("/"):
            console.print("  (JDBC over a Unix socket needs junixsocket on the classpath)")
        console.print(
            "No password is needed: the gateway signs in to the database for you."
            " Press Ctrl+C to end the session."
        )
        console.file.flush()  # the URL must reach a pipe or file at once, not at exit
        if console.is_terminal:
            self._live = Live(console=console, auto_refresh=False, transient=True)
            self._live.start()
            self.tick(session)

    def extended(self, session: SessionJson, previous: str) -> None:
        console.print(
            f"[bold green]Access extended[/]: session {session['id'][:8]} now expires"
            f" {local_time(session['expires_at'])} (was {local_time(previous)})."
        )
        console.file.flush()

    def expiring(self, session: SessionJson, lead: int) -> None:
        how = (
            f"press e or run `pam grant extend {session['id'][:8]} --by 30m` to extend it"
            if self.extend_by
            else f"run `pam grant extend {session['id'][:8]} --by 30m` to extend it"
        )
        console.print(
            f"[bold yellow]Access expires in {in_words(lead)}[/]"
            f" ({local_time(session['expires_at'])}); live connections will be closed then:"
            f" {how}."
        )
        console.file.flush()

    def warn(self, message: str, hint: str | None = None) -> None:
        line = Text("warning: ", style="bold yellow")
        line.append(printable(message) + (f" (hint: {printable(hint)})" if hint else ""))
        console.print(line)
        console.file.flush()

    def tick(self, session: SessionJson) -> None:
        if self._live is None:
            return
        left = (expires_at(session) - datetime.now(UTC)).total_seconds()
        status = Text(f"session {session['id'][:8]}: ", style="dim")
        status.append(f"{human_duration(max(left, 0.0))} left", style="bold")
        status.append(f" (until {local_time(session['expires_at'])})", style="dim")
        if self.extend_by:
            status.append(f"  e: extend by {format_duration(self.extend_by)}", style="dim")
        status.append("  Ctrl+C: end", style="dim")
        self._live.update(status, refresh=True)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def ended_by_gateway(self, state: SessionJson) -> None:
        reason = state.get("end_reason")
        if reason == "expired":
            console.print(
                f"[bold yellow]Access expired[/] at {local_time(state['expires_at'])};"
                " live connections were closed."
            )
        else:
            detail = f": {state['end_detail']}" if state.get("end_detail") else ""
            line = Text.from_markup("[bold yellow]Session ended by the gateway[/] ")
            line.append(printable(f"({reason}{detail})."))
            console.print(line)

    def ended_by_client(self, state: SessionJson, elapsed: str) -> None:
        console.print(
            f"Session {state['id'][:8]} ended ({state.get('end_reason') or 'client_ended'})"
            f" after {elapsed}."
        )


class JsonEvents:
    """For scripts: the grant's details as one JSON line, then one line per
    event (``extended``, ``expiring``, ``ended``), each flushed; warnings go to
    stderr, so stdout holds nothing else."""

    def _emit(self, event: str, session: SessionJson, **fields: Any) -> None:
        line = {
            "event": event,
            "at": datetime.now(UTC).isoformat(),
            "session_id": session["id"],
            **fields,
        }
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def granted(self, session: SessionJson, info: Any) -> None:
        self._emit(
            "granted",
            session,
            resource=session["resource_name"],
            account=session["account_name"],
            expires_at=session["expires_at"],
            listen_host=session["listen_host"],
            listen_port=session["listen_port"],
            url=info.url,
            psql=info.psql,
            jdbc=info.jdbc,
        )

    def extended(self, session: SessionJson, previous: str) -> None:
        self._emit(
            "extended", session, expires_at=session["expires_at"], previous_expires_at=previous
        )

    def expiring(self, session: SessionJson, lead: int) -> None:
        self._emit("expiring", session, expires_at=session["expires_at"], in_seconds=lead)

    def warn(self, message: str, hint: str | None = None) -> None:
        line = f"warning: {printable(message)}" + (f" (hint: {printable(hint)})" if hint else "")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def tick(self, session: SessionJson) -> None:
        pass

    def stop(self) -> None:
        pass

    def _ended(self, state: SessionJson) -> None:
        self._emit(
            "ended",
            state,
            reason=state.get("end_reason"),
            detail=state.get("end_detail"),
            ended_at=state.get("ended_at"),
            expires_at=state["expires_at"],
        )

    def ended_by_gateway(self, state: SessionJson) -> None:
        self._ended(state)

    def ended_by_client(self, state: SessionJson, elapsed: str) -> None:
        self._ended(state)


class KeyReader:
    """Single key presses from the terminal on stdin, read by a background
    thread in cbreak mode; :meth:`next_key` waits for one (or a timeout).

    Use it as a context manager: the terminal's settings are restored on
    leaving it, however that happens. :meth:`for_stdin` is None where keys
    cannot be read (stdin not a terminal, or this process in the background,
    where changing the terminal would stop it with SIGTTOU).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._saved: list[Any] | None = None
        self._keys: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="pam-keys", daemon=True)

    @classmethod
    def for_stdin(cls) -> KeyReader | None:
        try:
            fd = sys.stdin.fileno()
            if not os.isatty(fd) or os.tcgetpgrp(fd) != os.getpgrp():
                return None
        except (OSError, ValueError, AttributeError):
            return None
        return cls(fd)

    def __enter__(self) -> KeyReader:
        self._saved = termios.tcgetattr(self._fd)
        tty.setcbreak(self._fd, termios.TCSANOW)
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None
        self._thread.join(timeout=1.0)

    def next_key(self, timeout: float) -> str | None:
        """The next key pressed within *timeout* seconds, or None."""
        try:
            return self._keys.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._fd], [], [], _KEY_POLL_SECONDS)
                if not ready:
                    continue
                data = os.read(self._fd, 32)
            except (OSError, ValueError):
                return
            if not data:
                return  # the terminal went away
            for char in data.decode(errors="ignore"):
                self._keys.put(char)
