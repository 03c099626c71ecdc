"""Reading the trail: how long review takes on a large one (issue 12's figures).

``python -m bench.review`` builds a SQLite store holding one session of N
recorded pgbench select-only statements (1,000,000 by default, written through
the store's own append path, as the audit writer process writes them) and times,
in this process, what the daemon does for:

* ``pam audit search TEXT --since 30d``: ``Store.search_audit`` with the text and
  the window, first 100 matches (the API's default limit);
* ``pam sessions show ID``: the first page of statements
  (``gateway.audit.review.statement_page``, 200 a page) and, apart, the statement
  count the page header shows;
* ``pam sessions show ID --page N`` for the last page.

Each figure is the best of a few runs, in milliseconds. It measures the store
and review code the daemon runs, without HTTP and process start-up; it is a
measuring aid for docs/performance.md, not a test: nothing passes or fails.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.audit_path import BATCH, bench_store, statement_events
from gateway.audit.review import statement_page

PAGE_SIZE = 200
SEARCH_LIMIT = 100


def _best_ms(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.review", description=__doc__)
    parser.add_argument("--statements", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    _tap, template = statement_events("simple", 1000)
    with tempfile.TemporaryDirectory(prefix="pam-bench-review-") as tmp:
        store, session_id = bench_store(Path(tmp))
        try:
            started = time.perf_counter()
            written = 0
            while written < args.statements:
                rows = [(session_id, *e[1:]) for e in template[: args.statements - written]]
                for i in range(0, len(rows), BATCH):
                    store.append_audit_rows(rows[i : i + BATCH])
                written += len(rows)
            build = time.perf_counter() - started
            count = store.count_audit(session_id, "statement")
            print(f"built a trail of {count:,} statements in {build:.1f} s")

            since = datetime.now(UTC) - timedelta(days=30)
            pages = -(-count // PAGE_SIZE)
            figures = {
                "audit search TEXT --since 30d (first 100)": lambda: store.search_audit(
                    "pgbench_accounts", since=since, limit=SEARCH_LIMIT
                ),
                "audit search, no match (scans the window)": lambda: store.search_audit(
                    "no such text anywhere", since=since, limit=SEARCH_LIMIT
                ),
                "sessions show ID: page 1": lambda: statement_page(store, session_id, 1, PAGE_SIZE),
                "sessions show ID: the statement count": lambda: store.count_audit(
                    session_id, "statement"
                ),
                f"sessions show ID --page {pages} (last)": lambda: statement_page(
                    store, session_id, pages, PAGE_SIZE
                ),
            }
            for name, fn in figures.items():
                print(f"{name:<48} {_best_ms(fn, args.repeat):>10.1f} ms")
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
