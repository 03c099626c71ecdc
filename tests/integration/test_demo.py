"""`pam demo` as a user runs it: a throwaway PostgreSQL, a daemon, a psql prompt,
and nothing left behind after Ctrl+C.

The demo runs as its own process group and gets SIGINT on the whole group, as
Ctrl+C in a terminal delivers it. Processes are found by scanning /proc.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import URL_PATTERN, wait_for

pytestmark = pytest.mark.integration

DAEMON_LINE = re.compile(r"Gateway daemon running \(pid (?P<pid>\d+), log (?P<log>\S+)\)")
SERVER_LINE = re.compile(r"PostgreSQL [\d.]+ on 127\.0\.0\.1:(?P<port>\d+)")


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PAM_"))}
    env.update(
        {
            # The demo keeps its own client config; this one must stay untouched.
            "PAM_CONFIG": str(tmp_path / "user-config.json"),
            "PAM_HOME": str(tmp_path / "user-home"),
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "250",
        }
    )
    env.update(extra)
    return env


@dataclass(frozen=True)
class Process:
    pid: int
    argv: list[str]


def running_processes() -> list[Process]:
    """Every live process (zombies excluded: they run nothing and hold nothing)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if state != "Z" and argv != [b""]:
            found.append(Process(int(entry.name), [a.decode(errors="replace") for a in argv if a]))
    return found


def postmaster_on_port(port: int) -> tuple[Process, Path]:
    """The postmaster listening on ``port`` and its data directory."""
    for process in running_processes():
        argv = process.argv
        if Path(argv[0]).name != "postgres" or "-D" not in argv:
            continue
        data_dir = Path(argv[argv.index("-D") + 1])
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            continue
        if len(lines) > 3 and lines[3] == str(port):
            return process, data_dir
    raise AssertionError(f"no postmaster on port {port}")


def mentioning(path: Path) -> list[Process]:
    return [p for p in running_processes() if any(str(path) in arg for arg in p.argv)]


def read_until(proc: subprocess.Popen[str], pattern: re.Pattern[str], seen: list[str]) -> str:
    """Read stdout lines (into ``seen``) until one matches; the test timeout bounds it."""
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if pattern.search(line):
            return line
    raise AssertionError(f"the demo ended before printing {pattern.pattern!r}: {''.join(seen)}")


@pytest.mark.timeout(240)
def test_the_demo_serves_psql_and_ctrl_c_leaves_nothing_running(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "demo", "--duration", "1h"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_env(tmp_path),
        start_new_session=True,
    )
    seen: list[str] = []
    try:
        daemon_match = DAEMON_LINE.search(read_until(proc, DAEMON_LINE, seen))
        server_match = SERVER_LINE.search(read_until(proc, SERVER_LINE, seen))
        url_match = URL_PATTERN.search(read_until(proc, URL_PATTERN, seen))
        assert daemon_match and server_match and url_match
        daemon_pid = int(daemon_match["pid"])
        work_dir = Path(daemon_match["log"]).parent
        postmaster, data_dir = postmaster_on_port(int(server_match["port"]))
        cluster_dir = data_dir.parent
        assert work_dir.name.startswith("pam-demo-")
        assert cluster_dir.name.startswith("pam-pg-")
        assert daemon_pid in {p.pid for p in mentioning(work_dir)}

        result = subprocess.run(
            ["psql", url_match.group(0), "-XAt", "-c", "select text from greetings"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "hello from pam\n", "")

        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    seen.append(stdout)
    assert proc.returncode == 0, stderr
    assert stderr == ""
    assert "Demo torn down" in stdout
    assert wait_for(lambda: not mentioning(work_dir) and not mentioning(cluster_dir))
    live = {p.pid for p in running_processes()}
    assert daemon_pid not in live
    assert postmaster.pid not in live
    assert not work_dir.exists()
    assert not cluster_dir.exists()
    assert not (tmp_path / "user-config.json").exists()
    assert not (tmp_path / "user-home").exists()


def test_the_demo_without_postgresql_says_how_to_install_it(tmp_path: Path) -> None:
    empty = tmp_path / "no-postgres-here"
    empty.mkdir()

    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo"],
        capture_output=True,
        text=True,
        env=demo_env(tmp_path, PAM_PG_BIN=str(empty)),
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: PAM_PG_BIN={empty} does not contain initdb, pg_ctl, postgres;"
        " install the server with `apt-get install postgresql-15` (Debian/Ubuntu),"
        " or set PAM_PG_BIN to the directory that holds initdb, pg_ctl and postgres"
    ]
