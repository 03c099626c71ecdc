"""The audit writer process's entry point: ``python -m gateway.app.audit_process``.

A composition root: it opens the store from the state directory exactly as the
daemon does (settings, master key, store URL), and reads the stored passwords
the trail masks from it, so no secret crosses the pipe or the journal. Then it
replays what earlier runs of the daemon left in the journal (a crash), and
tails the current run's journal (``--run``) into the store (see
:mod:`gateway.audit.sink` for the control pipe, :mod:`gateway.audit.replay` for
the reading).

One reader per journal at a time: it holds an exclusive lock on a file beside
the journal directory (``audit-journal.reader-lock``) while it runs, so a reader
left by a parent that died (it finishes the journal once its stdin closes) is
done before the next one replays the same journal.

It ignores SIGINT and SIGTERM, which a terminal or systemd sends to the whole
process group, so that the daemon can drain the journal into it during an
ordered shutdown; it exits when its stdin closes (after processing the journal
to its end), which also happens if the daemon dies.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final

import structlog

from gateway.app.logging import configure_logging
from gateway.audit.export import TrailExporter, build_exporter
from gateway.audit.journal import JOURNAL_DIR
from gateway.audit.replay import JournalProcessor, TrackerSettings
from gateway.audit.sink import FrameReader, error_reply, write_frame
from gateway.config import load_settings, store_url
from gateway.credentials import keyring
from gateway.errors import GatewayError
from gateway.store import Store

log = structlog.get_logger(__name__)

#: How long the loop waits for the daemon when the journal has nothing new.
IDLE_SECONDS: Final = 0.05
RETRY_SECONDS: Final = 1.0
#: How often the writer follows the store's active master key version (the
#: daemon's presence renewal does as often, by default).
KEY_SYNC_SECONDS: Final = 5.0
#: beside the journal directory (the directory holds only the journal itself)
READER_LOCK_SUFFIX: Final = ".reader-lock"


def stored_passwords(store: Store) -> tuple[str, ...]:
    """Every account's stored password, for the trail to mask."""
    found: list[str] = []
    for account in store.list_accounts():
        try:
            found.append(store.reveal_password(account.resource_name, account.name))
        except GatewayError:
            continue  # an undecryptable row is reported when it is used
    return tuple(found)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.app.audit_process")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--journal", type=Path, default=None, help="default: HOME/audit-journal")
    parser.add_argument("--log-format", choices=["console", "json"], default="json")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    # The daemon decides when we stop (it closes our stdin after draining).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Frames go to the real stdout; anything else that prints goes to stderr.
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    configure_logging("json" if args.log_format == "json" else "console", args.log_level)
    journal = args.journal or args.home / JOURNAL_DIR
    _lock_journal(journal)  # held until this process exits
    exporter: TrailExporter | None = None
    try:
        settings = load_settings(args.home)
        box = keyring.open_box(args.home)
        store = Store.open(
            store_url(args.home, settings),
            box,
            sqlite_synchronous=settings.store_sqlite_synchronous,
        )
        exporter = build_exporter(settings)
        processor = JournalProcessor(
            journal,
            args.run,
            store,
            TrackerSettings(
                tuple(settings.audit_redact_patterns),
                settings.audit_parameters,
                settings.audit_max_value_bytes,
            ),
            lambda: stored_passwords(store),
            exporter=exporter,
        )
    except GatewayError as exc:
        write_frame(frames_out, error_reply(exc))
        return 1
    write_frame(frames_out, {"ready": True})
    try:
        return _serve(
            processor,
            FrameReader(sys.stdin.fileno()),
            frames_out,
            functools.partial(keyring.follow, args.home, box, store),
        )
    finally:
        if exporter is not None:
            exporter.close()
        store.close()


def _lock_journal(journal: Path) -> None:
    """Wait for any other reader of *journal* to finish, then keep it out."""
    lock = journal.with_name(journal.name + READER_LOCK_SUFFIX)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when this process ends


def _serve(
    processor: JournalProcessor,
    control: FrameReader,
    out: BinaryIO,
    follow_master_key: Callable[[], object],
) -> int:
    """Recover, then tail the journal until stdin closes; then finish it.
    Every :data:`KEY_SYNC_SECONDS`, *follow_master_key* (the audit key of the
    store's active master key version, after a rotation)."""
    recovered = False
    reported = None
    busy = True
    synced = time.monotonic()
    while not control.eof:
        if time.monotonic() - synced >= KEY_SYNC_SECONDS:
            synced = time.monotonic()
            try:
                follow_master_key()
            except Exception as exc:  # the daemon's presence reports the same
                log.warning("audit_master_key_sync_failed", error=repr(exc))
        readable, _, _ = select.select([control], [], [], 0 if busy else IDLE_SECONDS)
        flush = bool(readable) and any(f.get("op") == "flush" for f in control.read())
        before = processor.position
        try:
            if not recovered:
                processor.recover()
                recovered = True
            committed = processor.poll(flush=flush or control.eof)
        except Exception as exc:  # every failure is the daemon's to hear about
            write_frame(out, error_reply(exc))
            time.sleep(RETRY_SECONDS)
            continue
        busy = processor.position != before
        if committed != reported:
            write_frame(out, _progress(committed, processor))
            reported = committed
    try:
        if not recovered:
            processor.recover()
        committed = processor.finish()
    except Exception as exc:
        write_frame(out, error_reply(exc))
        return 1
    write_frame(out, _progress(committed, processor))
    return 0


def _progress(committed: tuple[int, int], processor: JournalProcessor) -> dict[str, Any]:
    """A progress frame, with what was written since the last one (if anything)."""
    frame: dict[str, Any] = {"progress": list(committed)}
    stats = processor.take_stats()
    if stats is not None:
        frame["stats"] = stats.to_json()
    return frame


if __name__ == "__main__":
    sys.exit(main())
