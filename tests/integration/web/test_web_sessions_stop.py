"""The daemon stops while a live timeline's event stream is open: the stream
ends and the daemon does not wait on it."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import httpx
from conftest import Console
from harness import wait_for
from sessions_support import connect, held_grant


def test_the_daemon_stops_with_a_live_stream_open(console: Console) -> None:
    with held_grant(console, "mia") as grant:
        _stop_while_streaming(console, grant)


def _stop_while_streaming(console: Console, grant: dict[str, Any]) -> None:
    conn = connect(grant)
    conn.execute("select 'open'")
    opened = threading.Event()
    lines: list[str] = []

    def listen() -> None:
        # The daemon goes away while this reads: what the test does.
        with (
            contextlib.suppress(httpx.HTTPError),
            console.web_client("mia") as mia,
            mia.stream("GET", f"/ui/sessions/{grant['id']}/stream") as stream,
        ):
            opened.set()
            for line in stream.iter_lines():
                lines.append(line)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert opened.wait(30)
    wait_for(lambda: any("open" in line for line in lines))
    # Bounded: a daemon held open by the stream would not exit within it.
    assert console.gw.stop(timeout=20) == 0
    conn.close()
    listener.join(30)
    assert not listener.is_alive()
    # The stream was ended by the daemon stopping, not by the session ending
    # (which a stopping daemon does only after its HTTP server is done).
    assert "event: ended" not in lines
