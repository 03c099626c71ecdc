"""`pam sessions export`'s output: the daemon's export stream written as it arrives.

Role: copy the bytes of a streamed export (:meth:`cli.client.ApiClient.export_session`,
:meth:`~cli.client.ApiClient.export_window`) to a file or stdout, and count its
records for the summary line. The export itself (which sessions, the order, the
formats and CSV columns) is the daemon's (:mod:`gateway.audit.review`).

Invariants:

* The output is the daemon's bytes unchanged (UTF-8), chunk by chunk: memory
  is bounded by a chunk, and ``| head`` sees the first records at once.
* The record count comes from the bytes themselves, so it is exact however the
  chunks split the records.
"""

from __future__ import annotations

from typing import BinaryIO

from cli.client import ExportStream


class ExportCounter:
    """Counts the records of an export as its bytes stream past.

    A record ends at a newline outside CSV quotes. A JSON line never holds a
    raw newline; the CSV writer quotes any field holding one and doubles the
    quotes inside, so toggling on every quote tells inside from outside. Bytes
    are enough: neither ``\\n`` nor ``"`` occurs inside a UTF-8 sequence.
    """

    def __init__(self, fmt: str) -> None:
        self._csv = fmt == "csv"
        self._quoted = False
        self._lines = 0

    def feed(self, chunk: bytes) -> None:
        if not self._csv:
            self._lines += chunk.count(b"\n")
            return
        for n, part in enumerate(chunk.split(b'"')):
            if n:
                self._quoted = not self._quoted
            if not self._quoted:
                self._lines += part.count(b"\n")

    @property
    def records(self) -> int:
        """Whole records seen (the CSV header is not one)."""
        return max(0, self._lines - 1) if self._csv else self._lines


def write_export(stream: ExportStream, fmt: str, out: BinaryIO) -> int:
    """Copy *stream* to *out* as it arrives; returns the number of records written."""
    counter = ExportCounter(fmt)
    for chunk in stream.chunks():
        out.write(chunk)
        # Each chunk reaches a pipe at once rather than when a buffer fills.
        out.flush()
        counter.feed(chunk)
    return counter.records
