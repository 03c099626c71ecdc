"""One measurement of one workload against one target, returning plain numbers.

Each function runs its load once and returns a flat ``dict`` of metrics; the
caller decides the order, the rounds and the medians. Load generators are C
clients where the client's own cost would otherwise blur the figure (pgbench,
psql for COPY); the round-trip latency uses libpq through psycopg's thin ``pq``
layer (one ``PQexec`` per query, simple protocol) and the idle connections use
asyncpg, whose connections cost little on the client side.

When ``pinned`` is true every load generator runs under ``taskset -c 0`` (the
benchmark process itself is already on CPU 0, so its in-process clients are too).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import host
from bench.stack import COPY_TABLE, BenchError, Stack, Target

Metrics = dict[str, Any]

COPY_ROWS = 630_000
COPY_ROW_WIDTH = 1000
#: each COPY text row is the value plus a newline
COPY_BYTES = COPY_ROWS * (COPY_ROW_WIDTH + 1)
COPY_OUT_SQL = (
    f"COPY (SELECT repeat('x', {COPY_ROW_WIDTH}) FROM generate_series(1, {COPY_ROWS})) TO STDOUT"
)
COPY_IN_SQL = f"COPY {COPY_TABLE} FROM STDIN"
LATENCY_SQL = b"select 1"

_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)
_LATENCY_AVG = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_PSQL_TIME = re.compile(r"^Time: ([0-9.]+) ms", re.MULTILINE)
_SLACK_S = 120


def _taskset(pinned: bool) -> list[str]:
    return ["taskset", "-c", "0"] if pinned else []


def pgbench(
    stack: Stack,
    target: Target,
    args: list[str],
    *,
    duration: int,
    clients: int,
    jobs: int,
    pinned: bool,
) -> Metrics:
    """One timed pgbench run; CPU of the target's middle process over exactly that run."""
    argv = [
        *_taskset(pinned),
        str(stack.pg_bin / "pgbench"),
        # No vacuum through the target: the caller vacuums directly when it matters.
        "-n",
        *args,
        "-c",
        str(clients),
        "-j",
        str(jobs),
        "-T",
        str(duration),
    ]
    cpu_before = host.cpu_times(target.pid) if target.pid else None
    second_before = host.cpu_seconds(target.second_pid) if target.second_pid else None
    children_before = host.children_cpu_seconds(target.pid) if target.pid else 0.0
    started = time.monotonic()
    result = subprocess.run(
        argv,
        env=target.libpq_env(),
        capture_output=True,
        text=True,
        timeout=duration + _SLACK_S,
        check=False,
    )
    wall = time.monotonic() - started
    cpu_after = host.cpu_times(target.pid) if target.pid else None
    second_after = host.cpu_seconds(target.second_pid) if target.second_pid else None
    children = host.children_cpu_seconds(target.pid) - children_before if target.pid else 0.0
    tps = _TPS.search(result.stdout)
    processed = _PROCESSED.search(result.stdout)
    if result.returncode != 0 or tps is None or processed is None:
        raise BenchError(
            f"pgbench {' '.join(args)} against {target.name} failed (exit {result.returncode}):"
            f" {result.stderr.strip()[-2000:]}"
        )
    transactions = int(processed.group(1))
    failed = _FAILED.search(result.stdout)
    latency = _LATENCY_AVG.search(result.stdout)
    metrics: Metrics = {
        "tps": float(tps.group(1)),
        "transactions": transactions,
        "failed": int(failed.group(1)) if failed else 0,
        "latency_avg_ms": float(latency.group(1)) if latency else None,
        "wall_s": round(wall, 3),
    }
    if cpu_before is not None and cpu_after is not None:
        user = cpu_after[0] - cpu_before[0]
        system = cpu_after[1] - cpu_before[1]
        cpu = user + system
        metrics["cpu_s"] = round(cpu, 3)
        # System time is mostly the loopback TCP stack, run in the sender's context.
        metrics["cpu_user_s"] = round(user, 3)
        metrics["cpu_system_s"] = round(system, 3)
        metrics["cpu_s_per_10k_tx"] = cpu / transactions * 10_000 if transactions else None
        # Of which the gateway's audit writer process (a child): where the CPU goes.
        metrics["cpu_children_s"] = round(children, 3)
    if second_before is not None and second_after is not None and transactions:
        # The daemon behind the remote path's forwarder (audit writer included).
        metrics["second_cpu_s_per_10k_tx"] = (second_after - second_before) / transactions * 10_000
    return metrics


def latency(target: Target, *, queries: int, warmup: int) -> Metrics:
    """``select 1`` one at a time on one connection; per-query wall time in µs."""
    from psycopg import pq

    conn = pq.PGconn.connect(target.conninfo().encode())
    try:
        if conn.status != pq.ConnStatus.OK:
            raise BenchError(
                f"cannot connect to {target.name}: {conn.error_message.decode(errors='replace')}"
            )
        samples: list[int] = []
        for i in range(warmup + queries):
            started = time.perf_counter_ns()
            res = conn.exec_(LATENCY_SQL)
            elapsed = time.perf_counter_ns() - started
            if res.status != pq.ExecStatus.TUPLES_OK:
                raise BenchError(
                    f"select 1 through {target.name} failed:"
                    f" {res.error_message.decode(errors='replace')}"
                )
            res.clear()
            if i >= warmup:
                samples.append(elapsed)
    finally:
        conn.finish()
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {
        "p50_us": cuts[49] / 1000,
        "p99_us": cuts[98] / 1000,
        "mean_us": statistics.fmean(samples) / 1000,
        "queries": queries,
    }


def upstream_tls(target: Target) -> str:
    """How the server sees this target's connection: "TLSv1.3 TLS_AES_256_GCM_SHA384" or "none"."""
    from psycopg import pq

    conn = pq.PGconn.connect(target.conninfo().encode())
    try:
        if conn.status != pq.ConnStatus.OK:
            raise BenchError(
                f"cannot connect to {target.name}: {conn.error_message.decode(errors='replace')}"
            )
        res = conn.exec_(
            b"SELECT ssl, version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        if res.status != pq.ExecStatus.TUPLES_OK or res.ntuples != 1:
            raise BenchError(f"pg_stat_ssl through {target.name} failed")
        ssl, version, cipher = (res.get_value(0, i) or b"" for i in range(3))
        return f"{version.decode()} {cipher.decode()}" if ssl == b"t" else "none"
    finally:
        conn.finish()


def _psql(stack: Stack, pinned: bool, sql: str, *, null_output: bool) -> list[str]:
    argv = [
        *_taskset(pinned),
        str(stack.pg_bin / "psql"),
        "--no-psqlrc",
        "--quiet",
        "--set=ON_ERROR_STOP=1",
    ]
    if null_output:
        # Query output (the COPY data) to /dev/null; \timing still prints to stdout.
        argv.append("--output=/dev/null")
    return [*argv, "--command=\\timing on", f"--command={sql}"]


def _timed_psql(argv: list[str], target: Target, stdin: Path | None) -> float:
    with open(stdin, "rb") if stdin else open("/dev/null", "rb") as source:
        result = subprocess.run(
            argv,
            env=target.libpq_env(),
            stdin=source,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    timing = _PSQL_TIME.search(result.stdout)
    if result.returncode != 0 or timing is None:
        raise BenchError(
            f"psql against {target.name} failed (exit {result.returncode}):"
            f" {result.stderr.strip()[-2000:]}"
        )
    return float(timing.group(1)) / 1000


def copy_out(stack: Stack, target: Target, *, pinned: bool) -> Metrics:
    """``COPY ... TO STDOUT`` of COPY_BYTES, read by psql and thrown away."""
    cpu_before = host.cpu_seconds(target.pid) if target.pid else None
    seconds = _timed_psql(_psql(stack, pinned, COPY_OUT_SQL, null_output=True), target, None)
    return _copy_metrics(seconds, target, cpu_before)


def write_copy_data(path: Path) -> None:
    if path.exists():
        return
    row = b"x" * COPY_ROW_WIDTH + b"\n"
    block = row * 1000
    with path.open("wb") as out:
        for _ in range(COPY_ROWS // 1000):
            out.write(block)
        out.write(row * (COPY_ROWS % 1000))


def copy_in(stack: Stack, target: Target, *, pinned: bool) -> Metrics:
    """``COPY ... FROM STDIN`` of the same COPY_BYTES into an UNLOGGED table."""
    write_copy_data(stack.copy_data)
    stack.truncate_copy_table()
    cpu_before = host.cpu_seconds(target.pid) if target.pid else None
    seconds = _timed_psql(
        _psql(stack, pinned, COPY_IN_SQL, null_output=False), target, stack.copy_data
    )
    metrics = _copy_metrics(seconds, target, cpu_before)
    rows = stack.copy_table_rows()
    if rows != COPY_ROWS:
        raise BenchError(f"COPY FROM through {target.name} stored {rows} rows, not {COPY_ROWS}")
    return metrics


def _copy_metrics(seconds: float, target: Target, cpu_before: float | None) -> Metrics:
    metrics: Metrics = {
        "mb_per_s": COPY_BYTES / 1e6 / seconds,
        "seconds": round(seconds, 3),
        "bytes": COPY_BYTES,
    }
    if cpu_before is not None and target.pid:
        # psql's \timing covers the COPY only; this also covers its connection set-up.
        metrics["cpu_s"] = round(host.cpu_seconds(target.pid) - cpu_before, 3)
    return metrics


async def _hold_idle(target: Target, count: int, concurrency: int, settle_s: float) -> Metrics:
    import asyncpg  # type: ignore[import-untyped]

    assert target.pid is not None
    gate = asyncio.Semaphore(concurrency)

    async def connect() -> asyncpg.Connection:
        async with gate:
            return await asyncpg.connect(
                host=target.host,
                port=target.port,
                user=target.user,
                database=target.database,
                password=target.password,
                ssl=False,
                timeout=60,
            )

    before = host.rss_kib(target.pid)
    started = time.monotonic()
    results = await asyncio.gather(*(connect() for _ in range(count)), return_exceptions=True)
    open_s = time.monotonic() - started
    conns = [r for r in results if isinstance(r, asyncpg.Connection)]
    errors = [r for r in results if isinstance(r, BaseException)]
    try:
        await asyncio.sleep(settle_s)
        with_idle = host.rss_kib(target.pid)
        peak = host.peak_rss_kib(target.pid)
    finally:
        await asyncio.gather(*(c.close(timeout=30) for c in conns), return_exceptions=True)
    if errors:
        raise BenchError(
            f"{len(errors)} of {count} idle connections to {target.name} failed;"
            f" first: {errors[0]!r}"
        )
    return {
        "kb_per_conn": (with_idle - before) / len(conns),
        "rss_before_kib": before,
        "rss_with_idle_kib": with_idle,
        "peak_rss_kib": peak,
        "connections": len(conns),
        "open_s": round(open_s, 3),
    }


def idle_connections(target: Target, *, count: int, concurrency: int = 50) -> Metrics:
    """RSS of the middle process with ``count`` idle client connections open at once."""
    return asyncio.run(_hold_idle(target, count, concurrency, settle_s=1.0))
