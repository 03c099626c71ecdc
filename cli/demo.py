"""`pam demo`: the whole path on a throwaway PostgreSQL, torn down on Ctrl+C.

Starts a temporary PostgreSQL (TLS with a generated CA, scram-sha-256), a
gateway daemon on a temporary state directory (its own client config, so the
user's is untouched), registers the server as resource ``demo`` with account
``app``, opens access and waits. Ctrl+C ends the session, stops the daemon and
the server, and removes every temporary file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from cli.access import hold_access
from cli.client import ApiClient, ApiError
from cli.render import console
from gateway.app.daemon import init_home
from gateway.config import ClientConfig, load_client_config
from gateway.testing.net import free_port
from gateway.testing.pgcluster import TempCluster, find_pg_bin_dir

DEMO_RESOURCE = "demo"
DEMO_ACCOUNT = "app"
DEMO_ROLE = "app_user"
DEMO_DATABASE = "appdb"
DAEMON_START_TIMEOUT = 30.0


def run_demo(duration_seconds: int) -> int:
    find_pg_bin_dir()  # fails early, with the install hint, when PostgreSQL is missing
    work = Path(tempfile.mkdtemp(prefix="pam-demo-"))
    home = work / "home"
    cluster = TempCluster()
    daemon: subprocess.Popen[bytes] | None = None
    previous_config = os.environ.get("PAM_CONFIG")
    # SIGTERM during set-up must tear down like Ctrl+C does.
    signal.signal(signal.SIGTERM, _interrupt)
    os.environ["PAM_CONFIG"] = str(work / "client.json")
    try:
        console.print("Starting a throwaway PostgreSQL (TLS, scram-sha-256)...")
        password = _prepare_cluster(cluster)
        init_home(home, api_port=free_port())
        log_path = work / "gateway.log"
        daemon = _start_daemon(home, log_path)
        with ApiClient(load_client_config(), timeout=10) as client:
            _wait_for_daemon(client, daemon, log_path)
            console.print(f"Gateway daemon running (pid {daemon.pid}, log {log_path}).")
            _register(client, cluster, password)
            del password
            console.print("Try: SELECT * FROM greetings;")
            return hold_access(
                client,
                resource=DEMO_RESOURCE,
                account=DEMO_ACCOUNT,
                duration_seconds=duration_seconds,
                port=None,
            )
    finally:
        # A second Ctrl+C or SIGTERM must not leave a server behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_daemon(daemon)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
        if previous_config is None:
            os.environ.pop("PAM_CONFIG", None)
        else:
            os.environ["PAM_CONFIG"] = previous_config
        console.print("Demo torn down: daemon and PostgreSQL stopped, temporary files removed.")


def _prepare_cluster(cluster: TempCluster) -> str:
    """Start the cluster with the demo's role, database and table; returns the
    role's password (random, never printed)."""
    cluster.start()
    password = secrets.token_urlsafe(18)
    cluster.create_role(DEMO_ROLE, password)
    cluster.create_database(DEMO_DATABASE, owner=DEMO_ROLE)
    cluster.admin_sql(
        "CREATE TABLE greetings (id int PRIMARY KEY, text text NOT NULL);"
        " INSERT INTO greetings VALUES (1, 'hello from pam');"
        f" ALTER TABLE greetings OWNER TO {DEMO_ROLE};",
        database=DEMO_DATABASE,
    )
    return password


def _start_daemon(home: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", "gateway", "run", "--home", str(home)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            # Its own process group: a terminal's Ctrl+C goes to the demo,
            # which ends the session first and then stops the daemon in order.
            start_new_session=True,
        )


def _register(client: ApiClient, cluster: TempCluster, password: str) -> None:
    client.add_resource(
        DEMO_RESOURCE,
        host=cluster.host,
        port=cluster.port,
        database=DEMO_DATABASE,
        ssl_mode="verify-full",
        ca_cert=cluster.ca_cert_path.read_text(),
    )
    client.add_account(DEMO_RESOURCE, DEMO_ACCOUNT, username=DEMO_ROLE, password=password)
    console.print(
        f"Registered resource {DEMO_RESOURCE!r} (PostgreSQL {cluster.server_version} on"
        f" {cluster.host}:{cluster.port}, verify-full) and account {DEMO_ACCOUNT!r}."
    )


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_for_daemon(client: ApiClient, daemon: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while True:
        if daemon.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ApiError(f"the gateway daemon exited during start-up: {tail.strip()}")
        try:
            client.health()
            return
        except ApiError:
            if time.monotonic() > deadline:
                # The client's own hint ("is `pam gateway run` running?") is not
                # the next step here: the demo started that daemon itself.
                raise ApiError(
                    f"the demo's gateway daemon did not answer within {DAEMON_START_TIMEOUT:g}s",
                    hint=f"its log is {log_path}",
                ) from None
            time.sleep(0.2)


def _stop_daemon(daemon: subprocess.Popen[bytes] | None) -> None:
    if daemon is None or daemon.poll() is not None:
        return
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=15)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


__all__ = ["ClientConfig", "run_demo"]
