"""Acting as the server's OS user: its files, its commands, and stopping its postmaster.

:class:`ServerAccount` writes files owned by the server user and runs commands
as that user (or as ourselves, for psql); :class:`ServerControl` runs
``initdb`` and ``pg_ctl`` for one data directory and stops the server however
it must.

Invariants:

* Every command runs with a clean environment (no ``PG*`` variable, C locale),
  a deadline, umask 077, and no secret on its command line; a timeout or a
  failure to exec is a :class:`ClusterError`.
* A file written here is created with its final mode (``O_EXCL``), so a private
  key is never readable by others, not even for a moment, and, as root, is
  owned by the server user.
* :meth:`ServerControl.stop` returns only when the postmaster is gone (fast
  shutdown, then SIGQUIT, then SIGKILL) or raises; it never signals a process
  that is not this data directory's postmaster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.testing.pgconf import SUPERUSER
from gateway.testing.pgerrors import ClusterError
from gateway.testing.pginstall import OsUser

__all__ = [
    "PG_CTL_SLACK_S",
    "PG_CTL_WAIT_S",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "PUBLIC_FILE_MODE",
    "ServerAccount",
    "ServerControl",
    "is_alive",
    "tail",
]

# Seconds. initdb without fsync takes about a second; the rest are generous
# upper bounds so that a wedged server fails the run instead of hanging it.
_INITDB_TIMEOUT_S = 120.0
PG_CTL_WAIT_S = 60
PG_CTL_SLACK_S = 30.0
_KILL_WAIT_S = 10.0
_KILL_POLL_S = 0.05

_LOG_TAIL_LINES = 60

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644


def tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``: enough of a log to see why."""
    return "\n".join(text.splitlines()[-lines:])


def clean_env() -> dict[str, str]:
    # PG* variables (PGPORT, PGDATA, PGSSLMODE, PGOPTIONS...) would silently
    # redirect or reconfigure our commands; C locale keeps messages parseable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


@dataclass(frozen=True, slots=True)
class ServerAccount:
    """The OS user the server runs as; None means the current user."""

    user: OsUser | None = None

    def run(
        self,
        argv: Sequence[str | Path],
        *,
        as_server_user: bool,
        cwd: Path,
        timeout: float,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion and return what it printed (never raises on exit status)."""
        user = self.user if as_server_user else None
        try:
            return subprocess.run(
                [str(arg) for arg in argv],
                input=stdin if stdin is not None else "",
                capture_output=True,
                text=True,
                timeout=timeout,
                env=clean_env(),
                # The server user must be able to stat its working directory.
                cwd=cwd,
                user=user.uid if user else None,
                group=user.gid if user else None,
                extra_groups=sorted(user.groups) if user else None,
                umask=0o077,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{Path(argv[0]).name} timed out after {timeout:.0f}s") from exc
        except OSError as exc:
            raise ClusterError(f"could not run {Path(argv[0]).name}: {exc}") from exc

    def own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.uid, self.user.gid)

    def write(self, path: Path, data: bytes, mode: int) -> None:
        # O_EXCL + mode at creation: a private key is never readable by others,
        # not even for the moment between write and chmod.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        self.own(path)

    def mkdir(self, path: Path) -> None:
        path.mkdir(mode=PRIVATE_DIR_MODE)
        self.own(path)


@dataclass(frozen=True, slots=True)
class ServerControl:
    """``initdb`` and ``pg_ctl`` for one data directory, run as the server user."""

    account: ServerAccount
    bin_dir: Path
    data_dir: Path
    #: The working directory of every command (the cluster's base directory).
    cwd: Path

    def initdb(self, superuser_password: str, pwfile: Path) -> None:
        """Create the data directory with the superuser's password from ``pwfile``."""
        self.account.write(pwfile, superuser_password.encode(), PRIVATE_FILE_MODE)
        try:
            result = self._run(
                [
                    self.bin_dir / "initdb",
                    f"--pgdata={self.data_dir}",
                    f"--username={SUPERUSER}",
                    # The password file keeps the secret off the command line and
                    # out of SQL (and so out of the server log).
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    # Throwaway data: skipping fsync saves seconds per cluster.
                    "--no-sync",
                ],
                timeout=_INITDB_TIMEOUT_S,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ClusterError(
                f"initdb failed (exit {result.returncode}): {tail(result.stderr.strip())}"
            )

    def pg_ctl(
        self, action: str, *extra: str, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``pg_ctl ACTION --wait``; with ``check``, a non-zero exit raises."""
        result = self._run(
            [
                self.bin_dir / "pg_ctl",
                action,
                f"--pgdata={self.data_dir}",
                "--wait",
                f"--timeout={PG_CTL_WAIT_S}",
                "--silent",
                *extra,
            ],
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"pg_ctl {action} failed (exit {result.returncode}): {result.stderr.strip()}"
            )
        return result

    def stop(self, pid: int | None) -> None:
        """Fast shutdown; if that fails, kill postmaster ``pid`` so nothing outlives us."""
        with contextlib.suppress(ClusterError):
            result = self.pg_ctl(
                "stop", "--mode=fast", timeout=PG_CTL_WAIT_S + PG_CTL_SLACK_S, check=False
            )
            if result.returncode == 0:
                return
        if pid is None or not self.is_our_postmaster(pid):
            return
        # SIGQUIT is PostgreSQL's "immediate shutdown"; SIGKILL is the last resort
        # (it can leave orphaned backends, so it is not the first choice).
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if _wait_for_exit(pid, _KILL_WAIT_S):
                return
        raise ClusterError(f"postmaster {pid} survived SIGKILL")

    def is_our_postmaster(self, pid: int) -> bool:
        """Guard against signalling an unrelated process that reused a stale pid."""
        proc = Path("/proc")
        if not proc.is_dir():
            # No procfs (macOS): the pid file is all we have.
            return is_alive(pid)
        try:
            cmdline = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            return False
        return os.fsencode(self.data_dir) in cmdline

    def _run(
        self, argv: Sequence[str | Path], *, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        return self.account.run(argv, as_server_user=True, cwd=self.cwd, timeout=timeout)


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        # No procfs, or it exited just now: trust the signal probe.
        return not Path("/proc").is_dir()
    # The state letter follows the parenthesised command name, which may itself
    # contain ") ", hence rpartition (proc(5), /proc/pid/stat).
    return not stat.rpartition(") ")[2].startswith("Z")


def _wait_for_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(_KILL_POLL_S)
    return not is_alive(pid)
