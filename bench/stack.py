"""The processes the benchmark measures, started in order and stopped in reverse.

:class:`Stack` owns, in start order:

1. a snapshot of the gateway's source (``gateway/`` and ``cli/`` of the working
   tree, or of a git revision) in a private directory, so that a run measures one
   fixed version even while people edit the repository;
2. a :class:`gateway.testing.pgcluster.TempCluster` (TLS, scram-sha-256) with
   ``max_connections`` raised for the idle-connection figure, a ``bench`` role with
   a password, and a ``pgbench`` database initialised with ``pgbench -i``;
3. a gateway daemon (``python -m cli gateway run --log-format json``, as the
   systemd unit runs it) on a fresh state directory, with settings as
   ``gateway init`` writes them (audit included), the cluster registered as a
   resource (verify-full against the cluster's CA) and an account;
4. an access session, ``python -m cli db access ... --duration 2h``, kept alive
   (the local path: the daemon serves its port);
5. a second one with ``--tunnel`` (the remote path: that CLI process serves
   127.0.0.1:PORT itself and carries each connection over the TLS 1.3 tunnel to
   the daemon, as a laptop's CLI does; here on loopback);
6. pgbouncer in session mode, when it is installed.

The daemon relays in its own process; :meth:`Stack.set_workers` restarts it with
``--workers N`` (relay worker processes) and back, for the ``workers`` workload.

Invariants: :meth:`Stack.close` is idempotent, runs every step even when one
fails, and leaves no process or directory behind; it ignores SIGINT while it
runs so a second Ctrl+C cannot cut the clean-up short. Every child is started in
its own session so a Ctrl+C at the terminal reaches only the benchmark, which then
stops the children in order. The password lives in memory, in the gateway's
encrypted store and in pgbouncer's auth file (as the SCRAM verifier), never on a
command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import host
from gateway.testing.net import child_pids, free_port
from gateway.testing.pgcluster import TempCluster

REPO = Path(__file__).resolve().parent.parent
ROLE = "bench"
DATABASE = "pgbench"
RESOURCE = "bench"
ACCOUNT = "bench"
COPY_TABLE = "copy_sink"
PGBENCH_SCALE = 10
#: enough backends for the idle-connection figure (1,000 through the gateway)
MAX_CONNECTIONS = 1100
ACCESS_DURATION = "2h"

_STARTUP_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0
_URL = re.compile(
    r"postgresql://(?P<user>[^@\s]+)@(?P<host>[^:/\s]+):(?P<port>\d+)/(?P<db>[^?\s]+)\?sslmode=disable"
)

Say = Callable[[str], None]


class BenchError(Exception):
    """The benchmark could not set something up; the message says what and why."""


@dataclass(frozen=True)
class Target:
    """One way into the database, and the process (if any) that sits in between."""

    name: str
    host: str
    port: int
    user: str
    database: str
    password: str | None = field(repr=False)
    sslmode: str
    sslrootcert: str | None = None
    #: the middle process whose CPU and memory are accounted; None for direct
    pid: int | None = None
    #: a second process on the path whose CPU is accounted apart (the daemon,
    #: behind the remote path's forwarder)
    second_pid: int | None = None

    def libpq_params(self) -> dict[str, str]:
        params = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": self.database,
            "sslmode": self.sslmode,
        }
        if self.sslrootcert:
            params["sslrootcert"] = self.sslrootcert
        if self.password is not None:
            params["password"] = self.password
        return params

    def conninfo(self) -> str:
        def quote(value: str) -> str:
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

        return " ".join(f"{k}={quote(v)}" for k, v in self.libpq_params().items())

    def libpq_env(self) -> dict[str, str]:
        """The environment for pgbench and psql: ours without PG*, plus this target."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        names = {
            "host": "PGHOST",
            "port": "PGPORT",
            "user": "PGUSER",
            "dbname": "PGDATABASE",
            "sslmode": "PGSSLMODE",
            "sslrootcert": "PGSSLROOTCERT",
            "password": "PGPASSWORD",
        }
        env.update({names[k]: v for k, v in self.libpq_params().items()})
        env["LC_ALL"] = "C"
        return env


def _wait_for(
    what: str,
    predicate: Callable[[], bool],
    proc: subprocess.Popen[bytes] | None,
    log: Path | None,
    timeout: float = _STARTUP_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not ready after {timeout:.0f}s: {_tail(log)}")
        time.sleep(0.1)


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Stack:
    """See the module docstring. Use as a context manager."""

    def __init__(
        self,
        *,
        source: str,
        use_pgbouncer: bool,
        pin: bool,
        say: Say,
        gateway_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.source = source
        self.gateway_overrides = dict(gateway_overrides or {})
        self.use_pgbouncer = use_pgbouncer
        self.pin = pin
        self.say = say
        self.root = Path(tempfile.mkdtemp(prefix="pam-bench-"))
        # Traversable (not listable) so pgbouncer, run as the server's OS user,
        # reaches its own directory inside.
        os.chmod(self.root, 0o711)  # noqa: S103 (no secrets sit directly in it)
        self.password = secrets.token_urlsafe(24)
        self.cluster: TempCluster | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.access: subprocess.Popen[bytes] | None = None
        self.remote_access: subprocess.Popen[bytes] | None = None
        self.pgbouncer: subprocess.Popen[bytes] | None = None
        self.pgbouncer_bin = host.find_pgbouncer() if use_pgbouncer else None
        self.targets: dict[str, Target] = {}
        self.source_info: dict[str, Any] = {}
        self.gateway_settings: dict[str, Any] = {}
        #: the servers' last words when start() failed (the files are gone by then)
        self.failure_logs = ""
        self._closed = False
        self._pgbouncer_port = 0
        #: the daemon's relay processes (``--workers``; 1: it relays itself)
        self.workers = 1

    # -- paths ------------------------------------------------------------------

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def client_config(self) -> Path:
        return self.root / "client.json"

    @property
    def daemon_log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    @property
    def remote_access_log(self) -> Path:
        return self.root / "remote-access.log"

    @property
    def pgbouncer_dir(self) -> Path:
        return self.root / "pgbouncer"

    @property
    def copy_data(self) -> Path:
        return self.root / "copy.data"

    @property
    def pg_bin(self) -> Path:
        assert self.cluster is not None and self.cluster.bin_dir is not None
        return self.cluster.bin_dir

    # -- lifecycle --------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.failure_logs = self.server_log_tails()
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._snapshot_source()
        self._start_cluster()
        self._start_gateway()
        self._open_access()
        self._open_remote_access_if_supported()
        if self.use_pgbouncer:
            if self.pgbouncer_bin is None:
                self.say("pgbouncer is not installed: measuring direct and gateway only")
            else:
                self._start_pgbouncer()
        if self.pin:
            self._pin_servers()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            steps: list[tuple[str, Callable[[], None]]] = [
                ("pgbouncer", lambda: _stop_process(self.pgbouncer, signal.SIGTERM, 10)),
                # SIGINT is Ctrl+C for `pam db access`: it ends the session cleanly.
                ("access session", lambda: _stop_process(self.access, signal.SIGINT, 20)),
                (
                    "tunnel access session",
                    lambda: _stop_process(self.remote_access, signal.SIGINT, 20),
                ),
                ("gateway", lambda: _stop_process(self.daemon, signal.SIGTERM, _STOP_TIMEOUT_S)),
                ("cluster", lambda: self.cluster.stop() if self.cluster else None),
                ("temp dir", lambda: shutil.rmtree(self.root, ignore_errors=True)),
            ]
            for name, step in steps:
                try:
                    step()
                except Exception as exc:  # keep cleaning up; report what failed
                    self.say(f"clean-up of {name} failed: {exc}")
        finally:
            signal.signal(signal.SIGINT, previous)

    # -- source -----------------------------------------------------------------

    def _snapshot_source(self) -> None:
        self.src.mkdir()
        git = host.git_state(REPO)
        if self.source == "worktree":
            for package in ("gateway", "cli"):
                shutil.copytree(
                    REPO / package,
                    self.src / package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
            self.source_info = {"source": "working tree", **git}
        else:
            rev = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", self.source],
                capture_output=True,
                text=True,
                check=False,
            )
            if rev.returncode != 0:
                raise BenchError(f"unknown git revision {self.source!r}: {rev.stderr.strip()}")
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", self.source, "gateway", "cli"],
                capture_output=True,
                check=True,
            )
            subprocess.run(["tar", "-x", "-C", str(self.src)], input=archive.stdout, check=True)
            self.source_info = {
                "source": f"git revision {self.source}",
                "head": rev.stdout.strip(),
                "head_subject": subprocess.run(
                    ["git", "-C", str(REPO), "log", "-1", "--format=%s", self.source],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout.strip(),
                "changed_files": [],
            }

    # -- PostgreSQL ---------------------------------------------------------------

    def _start_cluster(self) -> None:
        self.say("starting PostgreSQL (TLS, scram-sha-256)")
        self.cluster = TempCluster()
        self.cluster.start()
        # TempCluster fixes max_connections at 200; postgresql.auto.conf is read
        # last, so ALTER SYSTEM overrides it (needs a restart). log_connections
        # back to PostgreSQL's default: a log line per connection is not what
        # the connection-rate figure should measure.
        self.cluster.admin_sql(
            f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS};\n"
            "ALTER SYSTEM SET log_connections = off;"
        )
        self._restart_cluster()
        self.cluster.create_role(ROLE, self.password)
        self.cluster.create_database(DATABASE, owner=ROLE)
        self.cluster.admin_sql(
            f"CREATE UNLOGGED TABLE {COPY_TABLE} (line text);\n"
            f"ALTER TABLE {COPY_TABLE} OWNER TO {ROLE};",
            database=DATABASE,
        )
        direct = Target(
            name="direct",
            host=self.cluster.host,
            port=self.cluster.port,
            user=ROLE,
            database=DATABASE,
            password=self.password,
            sslmode="verify-full",
            sslrootcert=str(self.cluster.ca_cert_path),
        )
        self.targets["direct"] = direct
        self.say(f"pgbench -i -s {PGBENCH_SCALE} (direct, TLS)")
        result = subprocess.run(
            [str(self.pg_bin / "pgbench"), "-i", "-q", "-s", str(PGBENCH_SCALE)],
            env=direct.libpq_env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise BenchError(f"pgbench -i failed: {result.stderr.strip()}")

    def _server_user(self) -> tuple[int, int] | None:
        """uid and gid to run server-side commands as, or None to run as ourselves."""
        assert self.cluster is not None
        st = self.cluster.data_dir.stat()
        if os.geteuid() == 0 and st.st_uid != 0:
            return st.st_uid, st.st_gid
        return None

    def _run_as_server_user(
        self, argv: list[str], *, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        assert self.cluster is not None and self.cluster.base_dir is not None
        user = self._server_user()
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            cwd=self.cluster.base_dir,
            user=user[0] if user else None,
            group=user[1] if user else None,
            extra_groups=[] if user else None,
            check=False,
        )

    def _restart_cluster(self) -> None:
        assert self.cluster is not None
        result = self._run_as_server_user(
            [
                str(self.pg_bin / "pg_ctl"),
                "restart",
                f"--pgdata={self.cluster.data_dir}",
                "--wait",
                "--timeout=60",
                "--silent",
                "--mode=fast",
                f"--log={self.cluster.log_path}",
            ],
            timeout=120,
        )
        if result.returncode != 0:
            raise BenchError(
                f"pg_ctl restart failed: {result.stderr.strip()}\n{_tail(self.cluster.log_path)}"
            )
        shown = self.cluster.admin_sql("SHOW max_connections")
        if int(shown) < MAX_CONNECTIONS:
            raise BenchError(f"max_connections is {shown} after the restart")

    # -- gateway -----------------------------------------------------------------

    def _gateway_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PAM_"))}
        env.update(
            {
                "PAM_HOME": str(self.home),
                "PAM_CONFIG": str(self.client_config),
                "COLUMNS": "200",
                # The snapshot comes first on sys.path (cwd), before the editable
                # install's finder; never let the user's PYTHONPATH change that.
                "PYTHONPATH": "",
            }
        )
        return env

    def cli(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self._gateway_env(),
            cwd=self.src,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise BenchError(f"pam {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _start_gateway(self) -> None:
        assert self.cluster is not None
        self.say("starting the gateway daemon")
        self.cli("gateway", "init", "--api-port", str(free_port()))
        settings_path = self.home / "gateway.json"
        settings = json.loads(settings_path.read_text())
        unknown = set(self.gateway_overrides) - set(settings)
        if unknown:
            raise BenchError(f"gateway.json has no setting {', '.join(sorted(unknown))}")
        if self.gateway_overrides:
            settings.update(self.gateway_overrides)
            settings_path.write_text(json.dumps(settings, indent=2))
        self.gateway_settings = {k: v for k, v in settings.items() if k != "api_token_sha256"}
        self._launch_daemon()
        self.cli(
            "resource",
            "add",
            RESOURCE,
            "--host",
            self.cluster.host,
            "--port",
            str(self.cluster.port),
            "--database",
            DATABASE,
            "--ssl-mode",
            "verify-full",
            "--ca-cert",
            str(self.cluster.ca_cert_path),
        )
        self.cli(
            "account",
            "add",
            RESOURCE,
            ACCOUNT,
            "--username",
            ROLE,
            "--password-stdin",
            stdin=self.password + "\n",
        )

    def _launch_daemon(self) -> None:
        def ready_count() -> int:
            try:
                return self.daemon_log.read_text(errors="replace").count('"gateway_ready"')
            except FileNotFoundError:
                return 0

        seen = ready_count()
        with self.daemon_log.open("ab") as log:
            self.daemon = subprocess.Popen(
                # As the shipped systemd unit runs it (deploy/pam-gateway.service).
                [
                    sys.executable,
                    "-m",
                    "cli",
                    "gateway",
                    "run",
                    "--log-format",
                    "json",
                    *(["--workers", str(self.workers)] if self.workers > 1 else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._gateway_env(),
                cwd=self.src,
                start_new_session=True,
            )
        _wait_for("the gateway daemon", lambda: ready_count() > seen, self.daemon, self.daemon_log)

    def restart(self, name: str) -> None:
        """A fresh gateway daemon (and access session) or pgbouncer: same state, new process.

        A process that once held many connections keeps much of that memory
        (allocators rarely give it back), so the idle-connection figure needs a
        process that has not held them before.
        """
        self.say(f"restarting {name}: a fresh process for the next idle-connection figure")
        if name == "gateway":
            self._relaunch_daemon()
        elif name == "remote":
            _stop_process(self.remote_access, signal.SIGINT, 20)
            self._open_remote_access()
        elif name == "pgbouncer":
            _stop_process(self.pgbouncer, signal.SIGTERM, 10)
            self._launch_pgbouncer()
        else:
            raise ValueError(name)
        self._pin(name)

    def set_workers(self, count: int) -> None:
        """Run the daemon with *count* relay processes (restarting it, and its
        access sessions, when that changes)."""
        if count == self.workers:
            return
        self.workers = count
        self.say(f"restarting the gateway with {count} relay worker(s)")
        self._relaunch_daemon()
        self._pin("gateway")

    def _relaunch_daemon(self) -> None:
        """A new daemon process, and new access sessions through it."""
        _stop_process(self.access, signal.SIGINT, 20)
        _stop_process(self.remote_access, signal.SIGINT, 20)
        _stop_process(self.daemon, signal.SIGTERM, _STOP_TIMEOUT_S)
        self._launch_daemon()
        self._open_access()
        self._open_remote_access_if_supported()

    def _pin(self, name: str) -> None:
        pid = self.targets[name].pid
        if self.pin and pid is not None:
            host.pin([pid], 1)

    def _launch_access(
        self, log_path: Path, *extra: str
    ) -> tuple[subprocess.Popen[bytes], re.Match[str]]:
        """``pam db access`` kept running, its output in ``log_path``; and its URL."""
        offset = log_path.stat().st_size if log_path.exists() else 0

        def url() -> re.Match[str] | None:
            with log_path.open("rb") as log:
                log.seek(offset)
                return _URL.search(log.read().decode(errors="replace"))

        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli",
                    "db",
                    "access",
                    "--resource",
                    RESOURCE,
                    "--account",
                    ACCOUNT,
                    "--duration",
                    ACCESS_DURATION,
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self._gateway_env(), "PYTHONUNBUFFERED": "1"},
                cwd=self.src,
                start_new_session=True,
            )
        _wait_for("pam db access", lambda: url() is not None, proc, log_path)
        match = url()
        assert match is not None
        return proc, match

    def _open_access(self) -> None:
        self.say(f"opening an access session (pam db access --duration {ACCESS_DURATION})")
        self.access, match = self._launch_access(self.access_log)
        assert self.daemon is not None
        self.targets["gateway"] = Target(
            name="gateway",
            host=match["host"],
            port=int(match["port"]),
            user=match["user"],
            database=match["db"],
            password=None,
            sslmode="disable",
            pid=self.daemon.pid,
        )

    def _open_remote_access_if_supported(self) -> None:
        """The remote path, when the measured revision has a tunnel (revisions
        before issue 13 do not: they are measured without that target)."""
        if "--tunnel" not in self.cli("db", "access", "--help"):
            self.say("this revision has no tunnel: the remote path is not measured")
            return
        self._open_remote_access()

    def _open_remote_access(self) -> None:
        self.say("opening a tunnel access session (pam db access --tunnel)")
        self.remote_access, match = self._launch_access(self.remote_access_log, "--tunnel")
        assert self.daemon is not None
        self.targets["remote"] = Target(
            name="remote",
            host=match["host"],
            port=int(match["port"]),
            user=match["user"],
            database=match["db"],
            password=None,
            sslmode="disable",
            # The CLI's forwarder is the middle process measured; the daemon's
            # share of the same path is reported beside it.
            pid=self.remote_access.pid,
            second_pid=self.daemon.pid,
        )

    # -- pgbouncer ---------------------------------------------------------------

    def _start_pgbouncer(self) -> None:
        assert self.cluster is not None and self.pgbouncer_bin is not None
        self.say("starting pgbouncer (session mode)")
        directory = self.pgbouncer_dir
        directory.mkdir(mode=0o700)
        user = self._server_user()  # pgbouncer refuses to run as root
        # The SCRAM verifier, not the password: with it pgbouncer checks the
        # client's proof and reuses the client's key upstream (SCRAM
        # pass-through), as a production set-up would.
        verifier = self.cluster.admin_sql(
            f"SELECT rolpassword FROM pg_authid WHERE rolname = '{ROLE}'"
        )
        auth_file = directory / "userlist.txt"
        auth_file.write_text(f'"{ROLE}" "{verifier}"\n')
        auth_file.chmod(0o600)
        port = free_port()
        ini = directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{DATABASE} = host={self.cluster.host} port={self.cluster.port} dbname={DATABASE}\n"
            "\n[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {auth_file}\n"
            "pool_mode = session\n"
            "max_client_conn = 2000\n"
            "default_pool_size = 20\n"
            "server_tls_sslmode = verify-full\n"
            f"server_tls_ca_file = {self.cluster.ca_cert_path}\n"
            f"logfile = {directory / 'pgbouncer.log'}\n"
            "ignore_startup_parameters = extra_float_digits\n"
        )
        if user is not None:
            for path in (directory, auth_file, ini):
                os.chown(path, *user)
        self._pgbouncer_port = port
        self._launch_pgbouncer()

    def _launch_pgbouncer(self) -> None:
        assert self.pgbouncer_bin is not None
        directory = self.pgbouncer_dir
        port = self._pgbouncer_port
        user = self._server_user()
        log_path = directory / "stderr.log"
        with log_path.open("ab") as log:
            self.pgbouncer = subprocess.Popen(
                [self.pgbouncer_bin, str(directory / "pgbouncer.ini")],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
                user=user[0] if user else None,
                group=user[1] if user else None,
                extra_groups=[] if user else None,
                start_new_session=True,
            )

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        _wait_for("pgbouncer", listening, self.pgbouncer, log_path)
        self.targets["pgbouncer"] = Target(
            name="pgbouncer",
            host="127.0.0.1",
            port=port,
            user=ROLE,
            database=DATABASE,
            password=self.password,
            sslmode="disable",
            pid=self.pgbouncer.pid,
        )

    # -- placement ---------------------------------------------------------------

    def _pin_servers(self) -> None:
        """Server side on CPU 1: the postmaster and its children, the daemon, pgbouncer."""
        assert self.cluster is not None
        postmaster = self.cluster.postmaster_pid
        assert postmaster is not None
        pids = [postmaster, *child_pids(postmaster)]
        pids += [t.pid for t in self.targets.values() if t.pid is not None]
        host.pin(pids, 1)

    def server_log_tails(self) -> str:
        """What the servers said last, for a failure report."""
        parts = [
            f"--- gateway daemon ---\n{_tail(self.daemon_log)}",
            f"--- pam db access ---\n{_tail(self.access_log)}",
            f"--- pam db access --tunnel ---\n{_tail(self.remote_access_log)}",
        ]
        if self.pgbouncer is not None:
            parts.append(f"--- pgbouncer ---\n{_tail(self.pgbouncer_dir / 'pgbouncer.log')}")
        if self.cluster is not None:
            parts.append(f"--- postgresql ---\n{_tail(self.cluster.log_path)}")
        return "\n".join(parts)

    def truncate_copy_table(self) -> None:
        assert self.cluster is not None
        self.cluster.admin_sql(f"TRUNCATE {COPY_TABLE};", database=DATABASE)

    def copy_table_rows(self) -> int:
        assert self.cluster is not None
        return int(self.cluster.admin_sql(f"SELECT count(*) FROM {COPY_TABLE}", database=DATABASE))

    def prepare_tpcb(self) -> None:
        """What pgbench does before a TPC-B run unless -n, done here the same for all."""
        assert self.cluster is not None
        self.cluster.admin_sql(
            "VACUUM pgbench_branches;\nVACUUM pgbench_tellers;\nTRUNCATE pgbench_history;",
            database=DATABASE,
        )
