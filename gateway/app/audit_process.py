"""The audit writer process's entry point: ``python -m gateway.app.audit_process``.

A composition root: it opens the store from the state directory exactly as the
daemon does (settings, master key, store URL), so no secret crosses the pipe,
then appends each batch the daemon sends (see :mod:`gateway.audit.sink` for the
pipe protocol and why the trail is written in a process of its own).

It ignores SIGINT and SIGTERM, which a terminal or systemd sends to the whole
process group, so that the daemon can drain its queue into it during an ordered
shutdown; it exits when its stdin closes, which also happens if the daemon dies.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.app.logging import configure_logging
from gateway.audit.sink import decode_rows, error_reply, read_frame, write_frame
from gateway.config import MASTER_KEY_FILE, load_settings, store_url
from gateway.credentials.secretbox import SecretBox, load_master_key
from gateway.errors import GatewayError
from gateway.store import Store


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.app.audit_process")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--log-format", choices=["console", "json"], default="json")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # The daemon decides when we stop (it closes our stdin after draining).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Frames go to the real stdout; anything else that prints goes to stderr.
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    frames_in = sys.stdin.buffer

    configure_logging("json" if args.log_format == "json" else "console", args.log_level)
    try:
        settings = load_settings(args.home)
        box = SecretBox(load_master_key(args.home / MASTER_KEY_FILE))
        store = Store.open(
            store_url(args.home, settings),
            box,
            sqlite_synchronous=settings.store_sqlite_synchronous,
        )
    except GatewayError as exc:
        write_frame(frames_out, error_reply(exc))
        return 1
    write_frame(frames_out, {"ready": True})
    try:
        while (payload := read_frame(frames_in)) is not None:
            try:
                written = store.append_audit_rows(decode_rows(payload), substitute_invalid=True)
            except Exception as exc:  # every failure is the daemon's to handle
                write_frame(frames_out, error_reply(exc))
                continue
            write_frame(frames_out, {"written": written})
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
