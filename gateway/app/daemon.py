"""The daemon: state-directory set-up, and running the service with its control API.

``init_home`` creates the state directory, the master key (0600), the store,
the first admin (optionally with a password, argon2id-hashed) and a ``local``
token for it on this host (the store keeps its SHA-256; the token itself goes
to the user's client config, 0600, as this gateway's profile). ``run`` serves
until SIGTERM/SIGINT, then shuts down in order: stop the control API, tell live
clients why (FATAL), record the sessions' ends, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import structlog
import uvicorn

from gateway.app import web
from gateway.app.api import create_app
from gateway.app.gateway import Gateway
from gateway.app.workers import WorkerPool
from gateway.audit.journal import JOURNAL_DIR
from gateway.audit.sink import AuditSink
from gateway.config import (
    MASTER_KEY_FILE,
    SECRET_FILE_MODE,
    STORE_FILE,
    GatewaySettings,
    Profile,
    load_settings,
    save_profile,
    save_settings,
    store_url,
)
from gateway.credentials import keyring, pki
from gateway.credentials.rotation import ROTATION_STEPS
from gateway.credentials.secretbox import SecretBox, generate_master_key
from gateway.errors import AlreadyExists, ConfigError, NotFound
from gateway.identity.hashing import hash_password, new_token, token_digest
from gateway.identity.principals import ALL_PROJECTS, PrincipalKind, Role
from gateway.identity.service import TokenKind
from gateway.net import peercred
from gateway.net.acceptor import LISTEN_BACKLOG
from gateway.net.tls import ensure_local_certificate, server_context
from gateway.net.tunnel import TunnelEndpoint
from gateway.store import Store

log = structlog.get_logger(__name__)
STATE_DIR_MODE = 0o700


@dataclass(frozen=True)
class InitResult:
    home: Path
    client_config: Path
    api_url: str


def api_url(settings: GatewaySettings, *, tls: bool | None = None) -> str:
    host = settings.api_host
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if (settings.api_tls if tls is None else tls) else "http"
    return f"{scheme}://{host}:{settings.api_port}"


#: an API bound to every address is advertised under the host's name
_ANY_ADDRESS = frozenset({"0.0.0.0", "::"})  # noqa: S104 (compared, never bound)


def advertised_url(settings: GatewaySettings, *, tls: bool) -> str:
    """The control API URL CLIs are told to reach this gateway at: the
    ``advertise_url`` setting, else the first public host's (or the API's
    address) with the API's port."""
    if settings.advertise_url:
        return settings.advertise_url.rstrip("/")
    host = settings.public_hosts[0] if settings.public_hosts else settings.api_host
    if host in _ANY_ADDRESS:  # bound to every address: name the host instead
        host = socket.getfqdn()
    return api_url(settings.model_copy(update={"api_host": host}), tls=tls)


def default_admin_name() -> str:
    """The OS user running this, as a pam user name (lower case)."""
    return getpass.getuser().lower()


def init_home(
    home: Path,
    *,
    api_port: int,
    api_host: str = "127.0.0.1",
    force: bool = False,
    admin: str | None = None,
    password: str | None = None,
    public_hosts: tuple[str, ...] = (),
    tunnel_listen: tuple[str, int] | None = None,
) -> InitResult:
    """Create a state directory, its gateway CA and first admin (default: the OS
    user); with ``force``, keep key, CA, store and users but issue a new local
    token (and a server certificate for ``public_hosts``)."""
    home.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    os.chmod(home, STATE_DIR_MODE)
    settings_path = home / "gateway.json"
    if settings_path.exists() and not force:
        raise AlreadyExists(
            f"{home} is already initialised",
            hint="use --force to issue a new API token (keys and data are kept)",
        )
    key_path = home / MASTER_KEY_FILE
    if not keyring.has_keys(home):
        # Only for a new state directory: one whose first key was retired
        # (master key rotation) keeps its ring.
        generate_master_key(key_path)
    update: dict[str, object] = {"public_hosts": list(public_hosts)}
    if tunnel_listen is not None:
        update |= {"tunnel_host": tunnel_listen[0], "tunnel_port": tunnel_listen[1]}
    if settings_path.exists():
        settings = load_settings(home).model_copy(
            update={"api_token_sha256": None, "api_host": api_host, "api_port": api_port, **update}
        )
    else:
        settings = GatewaySettings.model_validate(
            {"api_host": api_host, "api_port": api_port} | update
        )
    # The CA key is sealed with the master key; an existing CA is kept (CLIs pin it).
    box = keyring.open_box(home)
    pki.ensure_pki(home, box, tuple(settings.public_hosts))
    name = admin or default_admin_name()
    token = new_token()
    with Store.open(
        store_url(home, settings), box, sqlite_synchronous=settings.store_sqlite_synchronous
    ) as store:
        # Sealed under the store's active master key version, whatever the
        # files said before it was known.
        keyring.write_active(home, box.active_version)
        keyring.reseal_files(home, box)
        _ensure_admin(store, name, password)
        principal_id = store.get_principal(name).id
        # A new local token replaces the old one: a copy of the old config stops working.
        store.revoke_tokens_of(principal_id, kind=TokenKind.LOCAL)
        store.add_token(
            principal_id, kind=TokenKind.LOCAL, digest=token_digest(token), expires_at=None
        )
    save_settings(home, settings)
    url = api_url(settings)
    ca_pem = pki.load_ca_certificate(home).decode() if settings.api_tls else None
    path = save_profile(
        Profile(
            api_url=url, token=token, user=name, gateway_id=settings.gateway_id, ca_cert=ca_pem
        ),
        replace_other_gateway=force,
    )
    return InitResult(home=home, client_config=path, api_url=url)


def _ensure_admin(store: Store, name: str, password: str | None) -> None:
    """*name* as an admin of every project (made if missing; its password set if given)."""
    hashed = None if password is None else hash_password(password)
    try:
        info = store.get_principal(name)
    except NotFound:
        store.add_principal(
            name, kind=PrincipalKind.USER, roles={ALL_PROJECTS: Role.ADMIN}, password_hash=hashed
        )
        return
    if info.roles.get(ALL_PROJECTS) != Role.ADMIN.value:
        raise ConfigError(f"user '{name}' exists and is not an admin of every project")
    if info.disabled_at is not None:
        # Its new local token would never authenticate: say so instead.
        raise ConfigError(
            f"user '{name}' is disabled",
            hint="make another first admin with `pam gateway init --force --admin NAME`",
        )
    if hashed is not None:
        store.set_password_hash(name, hashed)


def adopt_legacy_token(store: Store, settings: GatewaySettings, home: Path) -> None:
    """A state directory from before users: its API token becomes the local
    token of a first admin named after the OS user, so its CLI keeps working."""
    digest = settings.api_token_sha256
    if digest is None:
        return
    if not store.list_principals():
        name = default_admin_name()
        _ensure_admin(store, name, None)
        store.add_token(
            store.get_principal(name).id, kind=TokenKind.LOCAL, digest=digest, expires_at=None
        )
        log.warning("legacy_api_token_adopted", admin=name)
    save_settings(home, settings.model_copy(update={"api_token_sha256": None}))


#: Tests of rotation only. ``..._EXIT_AT=STEP``: the daemon exits at once (as
#: if killed) when a rotation reaches STEP (gateway.credentials.rotation's
#: RotationStep). ``..._PAUSE_AT=STEP``: the rotation waits there until the file
#: ROTATION_RESUME_FILE appears in the state directory (it is then removed).
ROTATION_EXIT_ENV = "PAM_TEST_ROTATION_EXIT_AT"
ROTATION_PAUSE_ENV = "PAM_TEST_ROTATION_PAUSE_AT"
ROTATION_RESUME_FILE = "rotation-resume"
#: the exit status of ROTATION_EXIT_ENV, so a test can tell it from a crash
ROTATION_EXIT_STATUS = 75
_PAUSE_LIMIT_SECONDS = 300.0


def _test_step(env: str) -> str | None:
    wanted = os.environ.get(env)
    if not wanted:
        return None
    if wanted not in ROTATION_STEPS:
        raise ConfigError(f"{env} must be one of {', '.join(sorted(ROTATION_STEPS))}")
    log.warning("rotation_test_hook_armed", env=env, step=wanted)
    return wanted


def rotation_step_hook(home: Path) -> Callable[[str], Awaitable[None]] | None:
    """The hook the test variables ask for, or None (always, in real use)."""
    exit_at, pause_at = _test_step(ROTATION_EXIT_ENV), _test_step(ROTATION_PAUSE_ENV)
    if exit_at is None and pause_at is None:
        return None
    resume = home / ROTATION_RESUME_FILE

    async def at_step(step: str) -> None:
        if step == exit_at:
            os._exit(ROTATION_EXIT_STATUS)
        if step == pause_at:
            log.warning("rotation_paused", step=step)
            async with asyncio.timeout(_PAUSE_LIMIT_SECONDS):
                while not resume.exists():
                    await asyncio.sleep(0.05)
            resume.unlink()

    return at_step


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot bind the control API on {host}:{port}: {exc.strerror}",
            hint="is another `pam gateway run` already running? (see api_port in gateway.json)",
        ) from None
    # uvicorn listens again with its own backlog (below); both are the grants'.
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def make_state_files_private(home: Path, settings: GatewaySettings) -> None:
    """Set the SQLite store's files back to 0600 when others can reach them.

    New stores are created 0600; one from an older pam, or chmod-ed since, holds
    the audit trail's SQL and parameters and the sealed passwords, so the daemon
    repairs it (its own files) and logs what it changed.
    """
    if settings.store_url:
        return  # a PostgreSQL store, or a path the operator chose and owns
    for path in (home / STORE_FILE, *(home / f"{STORE_FILE}{s}" for s in ("-wal", "-shm"))):
        try:
            was = path.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if not was & 0o077:
            continue
        try:
            path.chmod(SECRET_FILE_MODE)
        except OSError as exc:
            raise ConfigError(
                f"{path} is open to other users (mode {was:04o}) and pam cannot make it"
                f" private: {exc.strerror or exc}",
                hint=f"its owner can run `chmod 600 {path}`",
            ) from None
        log.warning("state_file_made_private", path=str(path), was_mode=f"{was:04o}")


def _load_ca(home: Path, box: SecretBox) -> pki.GatewayPki | None:
    if not (home / pki.CA_CERT_FILE).exists():
        # A state directory from before the CA: the local path works as ever.
        log.warning(
            "tunnel_off_no_ca", hint="run `pam gateway init --force` to create the gateway CA"
        )
        return None
    return pki.load_pki(home, box)


async def _start_tunnel(
    home: Path,
    box: SecretBox,
    settings: GatewaySettings,
    service: Gateway,
    ca: pki.GatewayPki,
    pool: WorkerPool | None,
) -> TunnelEndpoint:
    tunnel = TunnelEndpoint(
        tls=pki.tunnel_server_context(pki.load_server_identity(home, box), ca.ca_pem),
        admit=service.grants.tunnel_door,
        host=settings.tunnel_host,
        port=settings.tunnel_port,
        startup_timeout=settings.client_startup_timeout_seconds,
        on_refusal=service.refusals.refused,
        relays=pool,
    )
    try:
        service.tunnel_port = await tunnel.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot bind the tunnel on {settings.tunnel_host}:{settings.tunnel_port}:"
            f" {exc.strerror or exc}",
            hint="pick another --tunnel-listen (see tunnel_port in gateway.json)",
        ) from None
    return tunnel


async def _start_workers(
    home: Path, settings: GatewaySettings, service: Gateway, log_format: str, log_level: str
) -> WorkerPool:
    """Start the relay workers and make every grant's door (and the tunnel, once
    it starts) hand connections to them. A grant of an ephemeral account has its
    role's target sent with each connection: it lives only in this process's memory."""
    pool = WorkerPool(
        home,
        settings.workers,
        log_format=log_format,
        log_level=log_level,
        metrics=service.metrics,
        grant_target=service.credentials.grant_target,
        admit_tunnel=service.grants.tunnel_door,
    )
    await pool.start()
    service.grants.relays = pool
    service.on_secrets_refreshed = pool.refresh_secrets
    service.readiness.more.append(pool.readiness)
    return pool


async def run(
    home: Path,
    *,
    log_format: str = "console",
    log_level: str = "info",
    tunnel_listen: tuple[str, int] | None = None,
    api_listen: tuple[str, int] | None = None,
    workers: int | None = None,
) -> None:
    settings = load_settings(home)
    if workers is not None:
        settings = settings.model_copy(update={"workers": workers})
    if tunnel_listen is not None:
        settings = settings.model_copy(
            update={"tunnel_host": tunnel_listen[0], "tunnel_port": tunnel_listen[1]}
        )
    if api_listen is not None:
        settings = settings.model_copy(
            update={"api_host": api_listen[0], "api_port": api_listen[1]}
        )
    box = keyring.open_box(home)
    make_state_files_private(home, settings)
    store = Store.open(
        store_url(home, settings), box, sqlite_synchronous=settings.store_sqlite_synchronous
    )
    keyring.refresh(home, box, store, settings.gateway_id)
    adopt_legacy_token(store, settings, home)
    cert, key = ensure_local_certificate(home)
    ca = _load_ca(home, box)
    sink = (
        AuditSink(home, log_format=log_format, log_level=log_level)
        if settings.audit_enabled and settings.audit_writer_process
        else None
    )
    service = Gateway(
        store,
        settings,
        client_tls_context=server_context(cert, key),
        audit_sink=sink,
        journal_dir=home / JOURNAL_DIR,
        pki=ca,
        rotation_step_hook=rotation_step_hook(home),
    )
    tunnel: TunnelEndpoint | None = None
    pool: WorkerPool | None = None
    sock = _bind(settings.api_host, settings.api_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Each presence renewal re-reads the key ring and follows the store's active
    # master key version (master key rotation, docs/operations.md).
    service.presence.after_renewal = functools.partial(
        service.db, keyring.refresh, home, box, store, settings.gateway_id
    )
    try:
        await service.start()
        if settings.workers > 1:
            pool = await _start_workers(home, settings, service, log_format, log_level)
        if ca is not None:
            tunnel = await _start_tunnel(home, box, settings, service, ca, pool)
        tls = settings.api_tls and ca is not None
        # Where CLIs can reach this gateway, so `pam login` tells them (failover).
        await service.db(
            service.store.register_gateway,
            settings.gateway_id,
            advertised_url(
                settings.model_copy(update={"api_port": sock.getsockname()[1]}), tls=tls
            ),
        )
        app = create_app(service)
        web.mount(app, service)  # the web console, under /ui/ (docs/web.md)
        config = uvicorn.Config(
            app,
            log_level="warning",
            # our handler (gateway.app.logging), not uvicorn's plain-text one
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            backlog=LISTEN_BACKLOG,
        )
        config.load()
        # uvicorn takes TLS keys only as files; ours stay in memory (pki._load_chain).
        if tls:
            config.ssl = pki.api_server_context(pki.load_server_identity(home, box))
        elif settings.api_tls:
            log.warning("control_api_plain_http", reason="no gateway CA in the state directory")
        server = _EmbeddedServer(config)
        api_task = asyncio.create_task(server.serve(sockets=[sock]), name="control-api")
        log.info(
            "gateway_ready",
            api=api_url(settings, tls=tls),
            tunnel_port=service.tunnel_port,
            home=str(home),
            pid=os.getpid(),
            worker_pids=pool.pids if pool is not None else None,
        )
        if not peercred.is_available():
            log.warning(
                "owner_check_unavailable",
                reason="no /proc/net/tcp: a grant's TCP port accepts every local OS user",
            )
        stop_task = asyncio.create_task(stop.wait(), name="stop-signal")
        done, _ = await asyncio.wait({api_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        log.info("gateway_stopping")
        server.should_exit = True
        # The console's event streams and runs in flight end now, so its
        # requests do not hold up the control API's graceful stop.
        await service.stopping()
        stop_task.cancel()
        await asyncio.gather(api_task, stop_task, return_exceptions=True)
        if api_task in done and (exc := api_task.exception()) is not None:
            log.error("control_api_failed", error=repr(exc))
        if tunnel is not None:
            await tunnel.close()  # stop accepting; live tunnelled connections are the grants'
        await service.shutdown()
    finally:
        if pool is not None:
            # After the grants' shutdown ended (and drained) their connections.
            await pool.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        sock.close()
        store.close()
    log.info("gateway_stopped")
