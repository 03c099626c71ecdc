"""What the benchmark reads from the host: process CPU and memory, placement, machine.

Everything comes from procfs (proc(5)) or a short command; nothing here starts a
long-lived process.

* CPU is ``utime + stime`` of ``/proc/PID/stat`` (fields 14 and 15), which the
  kernel sums over all threads of the process, so the store worker thread and the
  event loop are both counted, plus the same of its child processes (the
  gateway's audit writer process; pgbouncer has none). The unit is clock ticks
  (``SC_CLK_TCK``, 100 Hz on Linux): a 10 ms resolution, fine for runs of seconds.
* Memory is ``VmRSS`` (now) and ``VmHWM`` (peak) of ``/proc/PID/status``, in KiB.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from gateway.testing.net import child_pids

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# /proc/PID/stat after the ") " that closes the command name: field 3 is index 0.
_UTIME_INDEX = 14 - 3
_STIME_INDEX = 15 - 3
_CUTIME_INDEX = 16 - 3
_CSTIME_INDEX = 17 - 3


def _stat_fields(pid: int) -> list[str]:
    # The command name may itself contain ") ", hence rpartition.
    return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2].split()


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds the process has used so far: all its threads,
    its children that have exited (``cutime``, ``cstime``) and, recursively, the
    ones still running (the gateway's audit writer process)."""
    fields = _stat_fields(pid)
    user = int(fields[_UTIME_INDEX]) + int(fields[_CUTIME_INDEX])
    system = int(fields[_STIME_INDEX]) + int(fields[_CSTIME_INDEX])
    for child in child_pids(pid):
        try:
            child_user, child_system = cpu_times(child)
        except (OSError, IndexError, ValueError):
            continue  # it exited while we looked (and its time moves to cutime)
        user += round(child_user * _CLOCK_TICKS)
        system += round(child_system * _CLOCK_TICKS)
    return user / _CLOCK_TICKS, system / _CLOCK_TICKS


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds of the process's running descendants (the gateway's audit
    writer process; with ``--workers``, the relay workers and their audit
    writers), user plus system: the part of :func:`cpu_times` that is not the
    process's own."""
    total = 0.0
    for child in child_pids(pid):
        try:
            total += sum(cpu_times(child))
        except (OSError, IndexError, ValueError):
            continue
        total += children_cpu_seconds(child)
    return total


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds the process (all its threads) has used so far."""
    return sum(cpu_times(pid))


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread (``/proc/PID/task/TID/stat``), keyed "name tid", of
    the process and its running children."""
    out = {}
    for child in child_pids(pid):
        try:
            out.update(thread_cpu_seconds(child))
        except OSError:
            continue
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rpartition(") ")[2].split()
        except OSError:
            continue  # the thread ended while we looked
        ticks = int(fields[_UTIME_INDEX]) + int(fields[_STIME_INDEX])
        out[f"{name} {task.name}"] = ticks / _CLOCK_TICKS
    return out


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def wait_until_quiet(
    pids: list[int], *, share: float = 0.1, interval: float = 0.5, timeout: float = 60.0
) -> float:
    """Wait until no process in ``pids`` uses more than ``share`` of a CPU; seconds waited.

    A middle process may still be working off the previous run (the gateway
    writes connection ends and audit records after the clients are gone); that
    work must not be billed to, or slow down, the next measurement.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(interval)
        if all(cpu_seconds(pid) - used <= share * interval for pid, used in before.items()):
            break
    return time.monotonic() - started


def pin(pids: list[int], cpu: int) -> None:
    """Move every thread of each process to one CPU (``taskset -a -p -c``).

    Threads and children created later inherit the mask of their creator, so
    pinning the postmaster covers the backends it forks afterwards.
    """
    for pid in pids:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
            check=True,
            capture_output=True,
            timeout=10,
        )


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    lines = (out.stdout or out.stderr).splitlines()
    return lines[0].strip() if lines else ""


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor()


def git_state(repo: Path) -> dict[str, Any]:
    """HEAD, and which gateway/cli files differ from it (others may be editing)."""

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    changed = [
        line[3:] for line in git("status", "--porcelain", "--", "gateway", "cli").splitlines()
    ]
    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "head_subject": git("log", "-1", "--format=%s"),
        "changed_files": changed,
    }


def machine_info(pg_version: str, pgbench_bin: Path, pgbouncer_bin: str | None) -> dict[str, Any]:
    with open("/proc/loadavg") as loadavg:
        load = loadavg.read().split()[:3]
    meminfo = Path("/proc/meminfo").read_text()
    mem_match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(int(mem_match.group(1)) / 1024 / 1024, 1) if mem_match else None,
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "pgbench": _first_line([str(pgbench_bin), "--version"]),
        "pgbouncer": _first_line([pgbouncer_bin, "--version"]) if pgbouncer_bin else None,
        "loadavg_at_start": [float(x) for x in load],
    }


def find_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
