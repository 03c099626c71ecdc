"""``python -m bench``: set up, run the rounds, print the table, write the JSON.

Round ``r`` runs every workload against every target before round ``r + 1``
starts; within a round the order of the targets rotates from one workload to the
next and from one round to the next, so slow drift of the machine (another job,
thermal limits, a growing audit table) falls on all targets alike. A short
warm-up through each target precedes round 1 and is not recorded. Before each
measurement the benchmark waits until the gateway and pgbouncer are idle, so work
left over from the previous run (connection records, audit batches) is neither
billed to the next one nor slows it. After each idle-connection measurement the
process that held the connections is replaced by a fresh one, because memory
once allocated is rarely returned and would hide the next round's figure.

Exit status: 0 when every measurement succeeded, 1 when some failed (the table
and the JSON still hold the rest), 2 for bad arguments, 130 on Ctrl+C. Whatever
happens, the processes and directories the run started are removed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from bench import host, profile, report, workloads
from bench.report import Figure
from bench.stack import PGBENCH_SCALE, BenchError, Stack, Target

console = Console(highlight=False)
if not console.is_terminal:
    # A log file or a pipe: wide enough that the table keeps one line per row.
    console = Console(highlight=False, width=160)

CLIENTS = 8
JOBS = 2
LATENCY_QUERIES = 2000
LATENCY_WARMUP = 200
IDLE_CONNECTIONS = 1000
WARMUP_S = 2
NOFILE_WANTED = 65536


@dataclass(frozen=True)
class Workload:
    name: str
    group: str
    description: str
    kind: str
    pgbench_args: tuple[str, ...] = field(default=())


WORKLOADS: tuple[Workload, ...] = (
    Workload("select-simple", "select", "pgbench -S -M simple", "pgbench", ("-S", "-M", "simple")),
    Workload(
        "select-extended", "select", "pgbench -S -M extended", "pgbench", ("-S", "-M", "extended")
    ),
    Workload(
        "select-prepared", "select", "pgbench -S -M prepared", "pgbench", ("-S", "-M", "prepared")
    ),
    Workload("tpcb", "tpcb", "pgbench TPC-B (default script)", "pgbench", ("-M", "simple")),
    Workload("connect", "connect", "pgbench -C -S (a connection per tx)", "pgbench", ("-C", "-S")),
    Workload("latency", "latency", "1 client, select 1, one at a time", "latency"),
    Workload("copy-out", "copy", "COPY ... TO STDOUT, 630 MB", "copy-out"),
    Workload("copy-in", "copy", "COPY ... FROM STDIN, 630 MB, unlogged", "copy-in"),
    Workload("idle", "idle", f"{IDLE_CONNECTIONS} idle connections", "idle"),
    Workload(
        "workers",
        "workers",
        f"pgbench -S -M simple, {CLIENTS} clients; the gateway with 1, then 2 relay workers",
        "workers",
        ("-S", "-M", "simple"),
    ),
)

CPU = "CPU of the middle process, s per 10,000 transactions (lower is better)"
THROUGHPUT = "throughput (higher is better)"
LATENCY = "one round trip at a time, µs (lower is better)"
MEMORY = "memory of the middle process"

FIGURES: tuple[Figure, ...] = (
    Figure(
        CPU,
        "CPU s/10k tx, select-only simple",
        "select-simple",
        "cpu_s_per_10k_tx",
        ".3f",
        ratios=False,
    ),
    Figure(
        CPU,
        "CPU s/10k tx, select-only extended",
        "select-extended",
        "cpu_s_per_10k_tx",
        ".3f",
        ratios=False,
    ),
    Figure(
        CPU,
        "CPU s/10k tx, select-only prepared",
        "select-prepared",
        "cpu_s_per_10k_tx",
        ".3f",
        ratios=False,
    ),
    *(
        Figure(
            CPU,
            f"  of which: the daemon behind remote's forwarder, {name}",
            f"select-{name}",
            "second_cpu_s_per_10k_tx",
            ".3f",
            ratios=False,
        )
        for name in ("simple", "extended", "prepared")
    ),
    Figure(CPU, "CPU s/10k tx, TPC-B", "tpcb", "cpu_s_per_10k_tx", ".3f", ratios=False),
    Figure(
        CPU,
        "CPU s/10k tx, new connection per tx",
        "connect",
        "cpu_s_per_10k_tx",
        ".3f",
        ratios=False,
    ),
    Figure(CPU, "CPU s per 630 MB COPY TO STDOUT", "copy-out", "cpu_s", ".2f", ratios=False),
    Figure(CPU, "CPU s per 630 MB COPY FROM STDIN", "copy-in", "cpu_s", ".2f", ratios=False),
    Figure(THROUGHPUT, "select-only simple, tps", "select-simple", "tps", ",.0f"),
    Figure(THROUGHPUT, "select-only extended, tps", "select-extended", "tps", ",.0f"),
    Figure(THROUGHPUT, "select-only prepared, tps", "select-prepared", "tps", ",.0f"),
    Figure(THROUGHPUT, "TPC-B, tps", "tpcb", "tps", ",.0f"),
    Figure(THROUGHPUT, "new connection per tx (-C -S), tps", "connect", "tps", ",.0f"),
    Figure(THROUGHPUT, "select-only, gateway with 1 relay process, tps", "workers", "tps", ",.0f"),
    Figure(
        THROUGHPUT,
        "select-only, gateway with --workers 2, tps",
        "workers",
        "tps_2_workers",
        ",.0f",
        ratios=False,
    ),
    Figure(
        CPU,
        "CPU s/10k tx, select-only, 1 relay process",
        "workers",
        "cpu_s_per_10k_tx",
        ".3f",
        ratios=False,
    ),
    Figure(
        CPU,
        "CPU s/10k tx, select-only, --workers 2 (workers included)",
        "workers",
        "cpu_2_workers_s_per_10k_tx",
        ".3f",
        ratios=False,
    ),
    Figure(
        THROUGHPUT,
        "  --workers 2 / 1 relay process",
        "workers",
        "workers_speedup",
        ".2f",
        ratios=False,
    ),
    Figure(THROUGHPUT, "COPY TO STDOUT, MB/s", "copy-out", "mb_per_s", ",.0f"),
    Figure(THROUGHPUT, "COPY FROM STDIN, MB/s", "copy-in", "mb_per_s", ",.0f"),
    Figure(LATENCY, "select 1 p50", "latency", "p50_us", ",.0f"),
    Figure(LATENCY, "select 1 p99", "latency", "p99_us", ",.0f"),
    Figure(LATENCY, "added p50 vs direct", "latency", "p50_us", "+,.0f", added=True),
    Figure(LATENCY, "added p99 vs direct", "latency", "p99_us", "+,.0f", added=True),
    Figure(
        MEMORY,
        f"KB per idle connection ({IDLE_CONNECTIONS} open)",
        "idle",
        "kb_per_conn",
        ",.1f",
        ratios=False,
    ),
    Figure(
        MEMORY,
        f"RSS with {IDLE_CONNECTIONS} idle, MB",
        "idle",
        "rss_with_idle_mb",
        ",.1f",
        ratios=False,
    ),
)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [w.name for w in WORKLOADS]
    groups = sorted({w.group for w in WORKLOADS})
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the pam gateway against direct PostgreSQL and pgbouncer.",
        epilog=f"workloads: {', '.join(names)}; groups: {', '.join(groups)}",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--quick", action="store_true", help="3 s pgbench runs instead of 10 s (a smoke run)"
    )
    parser.add_argument("--duration", type=int, default=None, help="pgbench -T in seconds")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="load generators on CPU 0; PostgreSQL, gateway and pgbouncer on CPU 1",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench-results/latest.json"), help="JSON output"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="WORKLOAD",
        help="workloads or groups to run (comma or space separated)",
    )
    parser.add_argument(
        "--no-pgbouncer", action="store_true", help="do not measure pgbouncer even if installed"
    )
    parser.add_argument(
        "--source",
        default="worktree",
        help="gateway code to measure: 'worktree' (a snapshot taken at start, the default)"
        " or a git revision such as HEAD",
    )
    parser.add_argument(
        "--gateway-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="change a gateway.json setting after `gateway init`, e.g. audit_enabled=false"
        " (repeatable; default: settings as shipped)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="SPEEDSCOPE",
        help="after the rounds, py-spy the daemon during one extra pgbench run"
        " (not counted) and write a speedscope file here",
    )
    parser.add_argument(
        "--profile-workload",
        default="select-simple",
        choices=[w.name for w in WORKLOADS if w.kind == "pgbench"],
        help="the pgbench workload that --profile runs (default select-simple)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    wanted = {w for item in (args.only or []) for w in item.split(",") if w}
    unknown = wanted - set(names) - set(groups)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    args.workloads = [w for w in WORKLOADS if not wanted or w.name in wanted or w.group in wanted]
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    args.gateway_settings = {}
    for item in args.gateway_set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--gateway-set wants KEY=JSON, not {item!r}")
        try:
            args.gateway_settings[key] = json.loads(value)
        except ValueError:
            args.gateway_settings[key] = value
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs at least 2 CPUs")
    return args


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _raise_nofile() -> int:
    """1,000 idle connections need 2,000+ descriptors in the daemon, which inherits ours."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted_hard in (max(hard, NOFILE_WANTED), hard):
        try:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (min(NOFILE_WANTED, wanted_hard), wanted_hard)
            )
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _placement(pin: bool) -> str:
    if pin:
        return (
            "pinned: pgbench, psql and the benchmark's own clients on CPU 0;"
            " PostgreSQL, the gateway daemon and pgbouncer on CPU 1"
        )
    return f"unpinned: the scheduler places every process on any of {os.cpu_count()} CPUs"


def _summary_line(workload: Workload, metrics: dict[str, Any]) -> str:
    if workload.kind == "pgbench":
        text = f"{metrics['tps']:>10,.0f} tps"
        if "cpu_s_per_10k_tx" in metrics:
            text += f"  cpu {metrics['cpu_s_per_10k_tx']:.3f} s/10k tx"
        return text
    if workload.kind == "workers":
        text = f"{metrics['tps']:>10,.0f} tps"
        if "tps_2_workers" in metrics:
            text += f"  --workers 2: {metrics['tps_2_workers']:,.0f} tps"
        return text
    if workload.kind == "latency":
        return f"p50 {metrics['p50_us']:,.0f} µs  p99 {metrics['p99_us']:,.0f} µs"
    if workload.kind in ("copy-out", "copy-in"):
        return f"{metrics['mb_per_s']:>10,.0f} MB/s ({metrics['seconds']:.2f} s)"
    return (
        f"{metrics['kb_per_conn']:,.1f} KB/conn"
        f" ({metrics['rss_before_kib'] / 1024:,.0f} -> {metrics['rss_with_idle_kib'] / 1024:,.0f}"
        f" MB, {metrics['connections']} conns in {metrics['open_s']:.1f} s)"
    )


def _measure(
    stack: Stack, workload: Workload, target: Target, args: argparse.Namespace
) -> dict[str, Any]:
    if workload.kind == "pgbench":
        if workload.name == "tpcb":
            stack.prepare_tpcb()
        return _pgbench(stack, workload, target, args)
    if workload.kind == "workers":
        return _measure_workers(stack, workload, target, args)
    if workload.kind == "latency":
        return workloads.latency(target, queries=LATENCY_QUERIES, warmup=LATENCY_WARMUP)
    if workload.kind == "copy-out":
        return workloads.copy_out(stack, target, pinned=args.pin)
    if workload.kind == "copy-in":
        return workloads.copy_in(stack, target, pinned=args.pin)
    metrics = workloads.idle_connections(target, count=IDLE_CONNECTIONS)
    metrics["rss_with_idle_mb"] = metrics["rss_with_idle_kib"] / 1024
    return metrics


def _pgbench(
    stack: Stack, workload: Workload, target: Target, args: argparse.Namespace
) -> dict[str, Any]:
    return workloads.pgbench(
        stack,
        target,
        list(workload.pgbench_args),
        duration=args.duration,
        clients=CLIENTS,
        jobs=JOBS,
        pinned=args.pin,
    )


def _measure_workers(
    stack: Stack, workload: Workload, target: Target, args: argparse.Namespace
) -> dict[str, Any]:
    """pgbench through *target*; through the gateway (local, or the remote
    path's tunnel), once as it relays by itself and once with ``--workers 2``
    (the daemon, and the access sessions, restarted in between)."""
    name = target.name
    if name not in ("gateway", "remote"):
        return _pgbench(stack, workload, target, args)
    try:
        stack.set_workers(1)
        metrics = _pgbench(stack, workload, stack.targets[name], args)
        stack.set_workers(2)
        _warm_up(stack, [name], args)
        two = _pgbench(stack, workload, stack.targets[name], args)
    finally:
        stack.set_workers(1)
    if name == "remote":
        # The gateway's CPU (daemon and workers), not the laptop's forwarder.
        for run in (metrics, two):
            run["cpu_s_per_10k_tx"] = run.get("second_cpu_s_per_10k_tx")
    metrics["tps_2_workers"] = two["tps"]
    metrics["workers_speedup"] = two["tps"] / metrics["tps"] if metrics["tps"] else None
    # The daemon and every process under it (workers, audit writers), per transaction.
    metrics["cpu_2_workers_s_per_10k_tx"] = two.get("cpu_s_per_10k_tx")
    return metrics


def _applies(workload: Workload, target: Target) -> bool:
    # Memory of a middle process: there is none on the direct path.
    return not (workload.kind == "idle" and target.pid is None)


def _check_alive(stack: Stack) -> None:
    for name, proc in (
        ("gateway daemon", stack.daemon),
        ("pam db access", stack.access),
        ("pam db access --tunnel", stack.remote_access),
        ("pgbouncer", stack.pgbouncer),
    ):
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"the {name} exited ({proc.returncode})")


def _run_rounds(
    stack: Stack,
    targets: list[str],
    args: argparse.Namespace,
    say: Callable[[str], None],
    results: list[dict[str, Any]],
) -> None:
    """Append one record per measurement to ``results`` (kept if a later one aborts)."""
    for round_index in range(args.rounds):
        for workload_index, workload in enumerate(args.workloads):
            shift = (round_index + workload_index) % len(targets)
            order = targets[shift:] + targets[:shift]
            for position, name in enumerate(order):
                target = stack.targets[name]
                if not _applies(workload, target):
                    continue
                record: dict[str, Any] = {
                    "round": round_index + 1,
                    "workload": workload.name,
                    "target": name,
                    "position": position,
                    "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    # Other jobs on the machine show up here: a high value flags a
                    # measurement that shared the CPUs.
                    "loadavg_1m": os.getloadavg()[0],
                }
                middle = [t.pid for t in stack.targets.values() if t.pid is not None]
                record["quiet_wait_s"] = round(host.wait_until_quiet(middle), 1)
                try:
                    record["metrics"] = _measure(stack, workload, target, args)
                    say(
                        f"round {round_index + 1}/{args.rounds}  {workload.name:<16}"
                        f" {name:<10} {_summary_line(workload, record['metrics'])}"
                    )
                except BenchError as exc:
                    record["error"] = str(exc)
                    say(f"[red]round {round_index + 1} {workload.name} {name} failed: {exc}[/]")
                    _check_alive(stack)
                results.append(record)
                if workload.kind == "idle" and round_index + 1 < args.rounds:
                    # The next round's figure needs a process that never held them.
                    stack.restart(name)
                    _warm_up(stack, [name], args)
                time.sleep(0.5)


def _warm_up(stack: Stack, targets: list[str], args: argparse.Namespace) -> None:
    for name in targets:
        workloads.pgbench(
            stack,
            stack.targets[name],
            ["-S", "-M", "simple"],
            duration=WARMUP_S,
            clients=CLIENTS,
            jobs=JOBS,
            pinned=args.pin,
        )


def _profile(stack: Stack, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    gateway = stack.targets["gateway"]
    assert gateway.pid is not None
    args.profile.parent.mkdir(parents=True, exist_ok=True)
    workload = next(w for w in WORKLOADS if w.name == args.profile_workload)
    say(f"profiling the daemon with py-spy during one {workload.name} run ({args.duration} s)")
    host.wait_until_quiet([t.pid for t in stack.targets.values() if t.pid is not None])
    threads_before = host.thread_cpu_seconds(gateway.pid)
    recorder = profile.start(gateway.pid, args.duration, args.profile)
    time.sleep(1.0)  # let py-spy attach before the load starts
    run = _pgbench(stack, workload, gateway, args)
    threads_after = host.thread_cpu_seconds(gateway.pid)
    output, _ = recorder.communicate(timeout=args.duration + 60)
    if recorder.returncode != 0 or not args.profile.exists():
        raise BenchError(f"py-spy failed: {output.decode(errors='replace')[-1000:]}")
    summary = profile.summarize(args.profile)
    summary["run"] = run
    summary["workload"] = workload.name
    # py-spy's "active" includes a thread blocked in a system call such as
    # fsync; the kernel's per-thread accounting says which thread used the CPU.
    # py-spy names its profiles 'Thread TID "python name"', or with --subprocesses
    # 'Process PID Thread TID "python name"'.
    names = {
        match.group(1): key
        for key in summary["threads"]
        if (match := re.search(r"Thread (\d+)", key)) is not None
    }
    summary["thread_cpu_s"] = {
        names.get(key.split()[-1], key): round(used - threads_before.get(key, 0.0), 3)
        for key, used in threads_after.items()
        if used - threads_before.get(key, 0.0) > 0
    }
    summary["file"] = str(args.profile)
    return summary


def _print_profile(summary: dict[str, Any]) -> None:
    console.print(
        f"\n[bold]py-spy, daemon during {summary['workload']}[/]"
        f" ({summary['sampled_seconds']:.1f} thread-seconds on CPU sampled,"
        f" {summary['run']['tps']:,.0f} tps while sampled; file {summary['file']})"
    )
    threads = ", ".join(f"{name} {used:.2f} s" for name, used in summary["thread_cpu_s"].items())
    console.print(f"  CPU per thread during the run (kernel accounting): {threads}")
    for kind in ("self", "total"):
        console.print(
            "  by self time (the function on top of the stack):"
            if kind == "self"
            else "  by total time, gateway functions (including what they call):"
        )
        for entry in summary[kind][:12]:
            console.print(f"    {entry['share'] * 100:5.1f}%  {entry['function']}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    # A shell starts background jobs with SIGINT ignored; the benchmark should
    # still stop (and clean up) on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    nofile = _raise_nofile()
    if args.pin:
        # In-process clients (latency, idle connections) and every child start on
        # CPU 0; the servers are moved to CPU 1 once they run.
        os.sched_setaffinity(0, {0})

    def say(text: str) -> None:
        console.print(text)

    placement = _placement(args.pin)
    started = time.monotonic()
    stack = Stack(
        source=args.source,
        use_pgbouncer=not args.no_pgbouncer,
        pin=args.pin,
        say=say,
        gateway_overrides=args.gateway_settings,
    )
    results: list[dict[str, Any]] = []
    profile_summary: dict[str, Any] | None = None
    targets: list[str] = []
    machine: dict[str, Any] = {}
    tls: dict[str, str] = {}
    error: str | None = None
    try:
        with stack:
            targets = [t for t in report.TARGETS if t in stack.targets]
            assert stack.cluster is not None
            machine = host.machine_info(
                stack.cluster.server_version, stack.pg_bin / "pgbench", stack.pgbouncer_bin
            )
            say(f"targets: {', '.join(targets)}; {placement}; open files limit {nofile}")
            tls = {name: workloads.upstream_tls(stack.targets[name]) for name in targets}
            say(
                "TLS on the server's side of each path: "
                + "; ".join(f"{name} {value}" for name, value in tls.items())
            )
            try:
                _warm_up(stack, targets, args)
                _run_rounds(stack, targets, args, say, results)
                if args.profile:
                    profile_summary = _profile(stack, args, say)
            except (BenchError, OSError) as exc:
                error = str(exc)
                console.print(f"[red]error: {exc}[/]")
                console.print(stack.server_log_tails(), markup=False)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: everything the benchmark started has been stopped[/]")
        return 130
    except BenchError as exc:
        console.print(f"[red]error: {exc}[/]")
        console.print(stack.failure_logs, markup=False)
        return 1
    if not results:
        return 1

    table_rows = report.rows(FIGURES, results, targets)
    source = stack.source_info
    code = f"{source.get('head')}" + (
        f" + uncommitted changes in {len(source['changed_files'])} files"
        if source.get("changed_files")
        else ""
    )
    audit = {k: v for k, v in stack.gateway_settings.items() if k.startswith("audit")}
    title = f"pam bench results ({placement})"
    console.print()
    console.print(
        f"gateway code: {code} ({source.get('source')}); audit settings: "
        + (", ".join(f"{k}={v}" for k, v in audit.items()) or "none in this version")
    )
    console.print(
        f"{args.rounds} rounds, medians; pgbench {CLIENTS} clients, -j {JOBS}, -T {args.duration},"
        f" scale {PGBENCH_SCALE}; load average at start {machine.get('loadavg_at_start')},"
        f" at end {list(os.getloadavg())}"
    )
    console.print()
    report.render(table_rows, targets, title, console)
    if profile_summary:
        _print_profile(profile_summary)

    document = {
        "schema": 1,
        "command": ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": {**machine, "placement": placement, "pinned": args.pin},
        "upstream_tls": tls,
        "gateway": {**source, "settings": stack.gateway_settings},
        "config": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "clients": CLIENTS,
            "jobs": JOBS,
            "pgbench_scale": PGBENCH_SCALE,
            "latency_queries": LATENCY_QUERIES,
            "copy_bytes": workloads.COPY_BYTES,
            "idle_connections": IDLE_CONNECTIONS,
            "targets": targets,
            "workloads": {w.name: w.description for w in args.workloads},
            "pgbouncer": "session mode, pool 20, server TLS verify-full, scram (verifier)"
            if "pgbouncer" in targets
            else "not installed or disabled",
        },
        "medians": report.medians(results),
        "table": [{k: v for k, v in row.items() if k != "fmt"} for row in table_rows],
        "table_markdown": report.markdown(table_rows, targets),
        "results": results,
        "profile": profile_summary,
        "error": error,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"\nraw numbers, medians and machine details: {args.out}")
    failures = [r for r in results if "error" in r]
    if error is not None:
        console.print(f"[red]the run stopped early: {error}[/]")
        return 1
    if failures:
        console.print(f"[red]{len(failures)} measurement(s) failed; see 'error' in the JSON[/]")
        return 1
    return 0
