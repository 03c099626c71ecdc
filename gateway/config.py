"""Where the gateway keeps its state, and the two configuration files.

* The **state directory** (``--home``, else ``$PAM_HOME``, else the platform's
  per-user data directory) holds ``gateway.json`` (daemon settings, with only a
  SHA-256 of the API token), ``master.key`` (mode 0600) and the SQLite store.
* The **client config** (``$PAM_CONFIG``, else ``<user config dir>/pam/config.json``,
  mode 0600) tells the CLI where the daemon's control API is and holds the token.

Invariant: secret-bearing files are created with mode 0600 from the start
(``os.open`` with the mode), never chmod-ed after the fact. A client config
found open to other users is set to 0600 with a warning when it is the
caller's own, and refused otherwise (:func:`load_client_config`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
import string
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, Field, PositiveInt, field_validator, model_validator

from gateway.errors import ConfigError

APP_NAME = "pam"
GATEWAY_FILE = "gateway.json"
MASTER_KEY_FILE = "master.key"
STORE_FILE = "pam.db"
DEFAULT_API_PORT = 7745
SECRET_FILE_MODE = 0o600
#: group and world permission bits: none may be set on a file holding a secret
_OTHERS_MAY_ACCESS = 0o077
#: What a generated password may be made of: RFC 3986's unreserved characters,
#: which need no quoting in a URL, a libpq connection string, a shell or SQL.
PASSWORD_SAFE_CHARACTERS = string.ascii_letters + string.digits + "-._~"
#: the fewest bits of entropy a generated password may carry
MIN_GENERATED_PASSWORD_BITS = 128


class FileExport(BaseModel):
    """The audit trail as JSON lines in a file, rotated by size (``path.1`` .. ``path.N``)."""

    #: absolute, so that the daemon and its audit writer process agree on it
    path: Path
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=4096)
    #: rotated files kept beside the live one
    keep: int = Field(default=5, ge=1, le=1000)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


class SyslogExport(BaseModel):
    """The audit trail to a syslog collector: RFC 5424 messages, octet-counted
    (RFC 6587) over TCP, or over TLS (RFC 5425) verified against ``ca_file``."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    #: the CA bundle the collector's certificate must chain to (TLS; default: the system's)
    ca_file: Path | None = None
    #: RFC 5424 facility (6.2.1): 16 is local0
    facility: int = Field(default=16, ge=0, le=23)
    app_name: str = Field(default="pam", pattern=r"^[!-~]{1,48}$")


class GatewaySettings(BaseModel):
    """Daemon settings, stored as ``gateway.json`` in the state directory."""

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=DEFAULT_API_PORT, ge=0, le=65535)
    #: SQLAlchemy URL; empty means the embedded SQLite file in the state directory
    store_url: str = ""
    #: SQLite store only: "normal" survives the daemon dying but may lose the last
    #: commits to a power loss; "full" fsyncs every commit (slower connection setup)
    store_sqlite_synchronous: Literal["normal", "full"] = "normal"
    #: SHA-256 (hex) of the control API token of state directories made before
    #: users existed; at start it becomes the first admin's local token
    api_token_sha256: str | None = None
    #: this gateway's id (random, made once): tells clients two gateways apart
    gateway_id: str = Field(default_factory=lambda: secrets.token_hex(8))
    #: how long a `pam login` session token lasts
    login_ttl_seconds: int = Field(default=int(timedelta(hours=12).total_seconds()), gt=0)
    #: address the access listeners bind to
    listen_host: str = "127.0.0.1"
    #: the tunnel endpoint for CLIs on other hosts (port 0: a free one at start)
    tunnel_host: str = "127.0.0.1"
    tunnel_port: int = Field(default=0, ge=0, le=65535)
    #: serve the control API over HTTPS with the gateway CA's server certificate
    #: (state directories made before the CA have none: plain HTTP, on loopback)
    api_tls: bool = True
    #: names and addresses the server certificate is issued for (loopback always)
    public_hosts: list[str] = Field(default_factory=list)
    #: the control API URL CLIs reach this gateway at, told to them at `pam login`
    #: so they can fail over to it; default: https://<first public host, else
    #: api_host>:<api_port>
    advertise_url: str | None = None
    max_grant_seconds: int = Field(default=int(timedelta(hours=12).total_seconds()), gt=0)
    #: the daemon ends a grant whose CLI has not called in for this long
    heartbeat_timeout_seconds: float = Field(default=6.0, gt=0)
    #: before a grant expires, each live connection gets a NoticeResponse this
    #: many seconds ahead (5 minutes and 1 minute)
    expiry_notice_seconds: list[PositiveInt] = Field(default_factory=lambda: [300, 60])
    upstream_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    client_startup_timeout_seconds: float = Field(default=15.0, gt=0)
    #: an access request not decided within this long expires
    request_pending_ttl_seconds: float = Field(default=3600.0, gt=0)
    #: an approved access request not opened within this long expires
    request_open_within_seconds: float = Field(default=900.0, gt=0)
    #: how often requests past their deadline are looked for
    request_sweep_seconds: float = Field(default=5.0, gt=0)
    #: refusals of one (source, reason) pair after its first are summarised per interval
    refusal_interval_seconds: float = Field(default=10.0, gt=0)
    #: record every statement (off: sessions and connections only)
    audit_enabled: bool = True
    #: what of bound parameters to record: values, types only, or nothing
    audit_parameters: Literal["values", "types", "none"] = "values"
    #: longest parameter value kept (bytes); longer ones are truncated
    audit_max_value_bytes: int = Field(default=256, ge=0)
    #: extra regular expressions masked in SQL (the first group, or the match)
    audit_redact_patterns: list[str] = Field(default_factory=list)
    #: refuse and end connections while the audit trail cannot be written
    audit_fail_closed: bool = False
    #: write the trail from a child process (off: from the daemon's store thread)
    audit_writer_process: bool = True
    #: relay processes (`pam gateway run --workers N`): 1 relays in the daemon
    #: itself; N >= 2 starts N worker processes the daemon hands connections to
    workers: int = Field(default=1, ge=1, le=64)
    #: Continuous export of the trail as it is written (never blocking the relay:
    #: each destination has a bounded queue; what overflows is dropped and counted).
    audit_export_file: FileExport | None = None
    audit_export_syslog: list[SyslogExport] = Field(default_factory=list)
    #: records each export destination may hold while it is slow or down
    audit_export_queue: int = Field(default=10_000, ge=1)
    #: webhooks (gateway.notify.retry): the wait after a failed first attempt, each
    #: further wait this many times the one before, attempts in all, and the
    #: longest one attempt may take
    webhook_retry_first_delay_seconds: float = Field(default=10.0, gt=0)
    webhook_retry_factor: float = Field(default=3.0, ge=1)
    webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    #: generated passwords (credential rotation): this many characters, each
    #: drawn uniformly from ``rotation_password_alphabet``
    rotation_password_length: int = Field(default=32, ge=16, le=128)
    #: distinct characters out of letters, digits and ``-._~``
    rotation_password_alphabet: str = string.ascii_letters + string.digits
    #: an unfinished rotation found at start that could not be settled (upstream
    #: unreachable) is tried again this often
    rotation_recovery_retry_seconds: float = Field(default=30.0, gt=0)
    #: rotation schedules (gateway.credentials.schedule): the shortest interval
    #: ``pam account rotate --every`` accepts (tests set less)
    rotation_min_interval_seconds: int = Field(default=60, ge=1)
    #: gateways sharing a store (docs/operations.md): each renews its presence
    #: lease this often, for this long; a gateway whose lease lapses is gone, and
    #: the others end its sessions (``gateway_crash``, at its last renewal)
    presence_renew_seconds: float = Field(default=5.0, gt=0)
    presence_lease_seconds: float = Field(default=15.0, gt=0)
    #: a gateway that has not renewed its presence lease (the store unreachable)
    #: for this long refuses new connections (57P03) until it renews again; in
    #: strict mode it also ends its live ones
    store_unreachable_grace_seconds: float = Field(default=15.0, gt=0)
    store_unreachable_strict: bool = False
    #: changes made through another gateway on the store (revocations,
    #: extensions, disabled users, credentials; gateway.store.changes): a
    #: PostgreSQL store announces each (LISTEN/NOTIFY, applied at once unless
    #: ``changes_listen`` is off, e.g. behind a pooler that drops LISTEN), and
    #: every gateway reads back what it holds this often, as the safety net
    changes_reconcile_seconds: float = Field(default=5.0, gt=0)
    changes_listen: bool = True
    #: how often the scheduler looks for due rotations and renews its lease
    rotation_schedule_tick_seconds: float = Field(default=5.0, gt=0)
    #: how long the scheduler's lease lasts unrenewed
    rotation_lease_seconds: float = Field(default=30.0, gt=0)
    #: a scheduled rotation that failed is tried again after this long, then each
    #: wait this many times the one before, never longer than its interval
    rotation_retry_first_delay_seconds: float = Field(default=60.0, gt=0)
    rotation_retry_factor: float = Field(default=2.0, ge=1)
    #: each next time is put off by a random share of the wait, up to this fraction
    rotation_jitter_fraction: float = Field(default=0.05, ge=0, le=0.5)
    #: a database role per grant (ephemeral accounts, docs/credentials.md): every
    #: grant role is a member of this role, and pam drops no role that is not
    ephemeral_marker_role: str = Field(default="pam_managed", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    #: a grant role's VALID UNTIL is the grant's end plus this
    ephemeral_valid_until_margin_seconds: float = Field(default=60.0, ge=0)
    #: the janitor also looks for grant roles to drop this often
    ephemeral_janitor_interval_seconds: float = Field(default=30.0, gt=0)
    #: a failed drop is tried again after this, doubling up to the maximum
    ephemeral_retry_first_delay_seconds: float = Field(default=5.0, gt=0)
    ephemeral_retry_max_delay_seconds: float = Field(default=600.0, gt=0)

    @field_validator("rotation_password_alphabet")
    @classmethod
    def _safe_alphabet(cls, value: str) -> str:
        unsafe = sorted(set(value) - set(PASSWORD_SAFE_CHARACTERS))
        if unsafe:
            raise ValueError(
                f"may hold only letters, digits and -._~ (not {''.join(unsafe)!r}):"
                " a generated password never needs quoting"
            )
        if len(set(value)) != len(value):
            raise ValueError("lists a character twice (each must be equally likely)")
        return value

    @model_validator(mode="after")
    def _lease_outlives_ticks(self) -> GatewaySettings:
        # A holder renews every tick; a lease shorter than three ticks would lapse
        # between renewals under a little load and move for no reason.
        if self.rotation_lease_seconds < 3 * self.rotation_schedule_tick_seconds:
            raise ValueError(
                "rotation_lease_seconds must be at least three rotation_schedule_tick_seconds"
            )
        if self.presence_lease_seconds < 3 * self.presence_renew_seconds:
            raise ValueError("presence_lease_seconds must be at least three presence_renew_seconds")
        return self

    @model_validator(mode="after")
    def _enough_entropy(self) -> GatewaySettings:
        bits = self.rotation_password_length * math.log2(
            max(len(self.rotation_password_alphabet), 1)
        )
        if bits < MIN_GENERATED_PASSWORD_BITS:
            raise ValueError(
                f"rotation_password_length {self.rotation_password_length} of"
                f" {len(self.rotation_password_alphabet)} characters gives {bits:.0f} bits;"
                f" generated passwords need at least {MIN_GENERATED_PASSWORD_BITS}"
            )
        return self


class Profile(BaseModel):
    """How the CLI reaches one gateway, as whom."""

    api_url: str
    token: str = Field(repr=False)
    #: who the token belongs to (for `pam whoami` without a round trip, and messages)
    user: str | None = None
    #: the gateway's own id (``gateway.json``), so a profile is never silently
    #: replaced by another gateway's at the same address
    gateway_id: str | None = None
    #: PEM of the gateway's CA, pinned for HTTPS and the tunnel
    ca_cert: str | None = None
    #: the other gateways of the same fleet (sharing its store and CA), learned
    #: at `pam login`: where the CLI fails over when ``api_url`` does not answer
    api_urls: list[str] = Field(default_factory=list)


class ClientConfig(Profile):
    """The client configuration file: the current gateway's profile at the top
    (``api_url``, ``token``, ...), every other gateway's under ``profiles``."""

    profiles: dict[str, Profile] = Field(default_factory=dict)

    @property
    def current(self) -> Profile:
        return Profile.model_validate(self.model_dump(exclude={"profiles"}))

    def with_current(self, profile: Profile) -> ClientConfig:
        """This config with *profile* current; the previous current one is kept
        under ``profiles`` unless it is for the same address."""
        others = dict(self.profiles)
        others.pop(profile.api_url, None)
        if self.api_url != profile.api_url:
            others[self.api_url] = self.current
        return ClientConfig(**profile.model_dump(), profiles=others)

    def without(self, api_url: str) -> ClientConfig | None:
        """This config with the profile for *api_url* gone (None: nothing left)."""
        others = dict(self.profiles)
        if self.api_url != api_url:
            others.pop(api_url, None)
            return self.model_copy(update={"profiles": others})
        if not others:
            return None
        url, first = next(iter(sorted(others.items())))
        del others[url]
        return ClientConfig(**first.model_dump(), profiles=others)


def default_home() -> Path:
    env = os.environ.get("PAM_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME))


def resolve_home(home: Path | str | None) -> Path:
    return Path(home).expanduser() if home else default_home()


def client_config_path() -> Path:
    env = os.environ.get("PAM_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.json"


def write_private_file(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_settings(home: Path) -> GatewaySettings:
    path = home / GATEWAY_FILE
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{home} is not a pam state directory (no {GATEWAY_FILE})",
            hint="run `pam gateway init` first, or pass --home / set PAM_HOME",
        ) from None
    try:
        return GatewaySettings.model_validate_json(raw)
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid: {exc.errors()[0]['msg']}") from None  # type: ignore[attr-defined]


def save_settings(home: Path, settings: GatewaySettings) -> None:
    write_private_file(home / GATEWAY_FILE, settings.model_dump_json(indent=2).encode())


def store_url(home: Path, settings: GatewaySettings) -> str:
    return settings.store_url or f"sqlite:///{home / STORE_FILE}"


def load_client_config(*, warn: Callable[[str], None] | None = None) -> ClientConfig:
    """Read the client config; one that others can read is repaired or refused.

    The file holds the API token. When group or world may read it (or write it,
    and so send the token elsewhere with the next command), a file of the
    user running this is set to 0600 and *warn* (default: one line on stderr) says
    so; another user's file is refused, since it is not ours to change.
    """
    path = client_config_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(
            f"no pam client configuration at {path}",
            hint="run `pam gateway init` on this machine, or set PAM_CONFIG",
        ) from None
    # Check and read the same open file, so a swap between the two is harmless.
    with os.fdopen(fd, "rb") as handle:
        _make_private(path, handle.fileno(), warn or _warn_on_stderr)
        raw = handle.read()
    try:
        return ClientConfig.model_validate(json.loads(raw))
    except ValueError:
        raise ConfigError(f"{path} is not a valid pam client configuration") from None


def _make_private(path: Path, fd: int, warn: Callable[[str], None]) -> None:
    status = os.fstat(fd)
    loose = stat.S_IMODE(status.st_mode)
    if not loose & _OTHERS_MAY_ACCESS:
        return
    if status.st_uid != os.geteuid():
        raise ConfigError(
            f"{path} holds the API token and is open to other users (mode {loose:04o})",
            hint=f"its owner can make it private with `chmod 600 {path}`",
        )
    os.fchmod(fd, SECRET_FILE_MODE)
    warn(
        f"{path} was open to other users (mode {loose:04o}); it is now 0600."
        " If someone else may have read the token, issue a new one with"
        " `pam gateway init --force`"
    )


def _warn_on_stderr(message: str) -> None:
    # Only the CLI reads the client config; one line, like its errors.
    print(f"warning: {message}", file=sys.stderr)


def save_client_config(config: ClientConfig) -> Path:
    path = client_config_path()
    write_private_file(path, config.model_dump_json(indent=2, exclude_none=True).encode())
    return path


def active_profile() -> Profile:
    """The profile the CLI uses: the client config's current one, or the one for
    ``$PAM_GATEWAY``; ``$PAM_TOKEN`` (a machine token) replaces its token, and
    with both variables set no client config is needed (``$PAM_CA_CERT``, a
    file, then pins the gateway's CA)."""
    url, token = os.environ.get("PAM_GATEWAY"), os.environ.get("PAM_TOKEN")
    ca_file = os.environ.get("PAM_CA_CERT")
    try:
        ca_pem = Path(ca_file).read_text() if ca_file else None
    except OSError as exc:
        raise ConfigError(f"cannot read PAM_CA_CERT {ca_file}: {exc.strerror}") from None
    try:
        config = load_client_config()
    except ConfigError:
        if url and token:
            return Profile(api_url=url, token=token, ca_cert=ca_pem)
        raise
    if url and url != config.api_url:
        profile = config.profiles.get(url) or Profile(api_url=url, token="")
    else:
        profile = config.current
    if ca_pem:
        profile = profile.model_copy(update={"ca_cert": ca_pem})
    return profile.model_copy(update={"token": token}) if token else profile


def save_profile(profile: Profile, *, replace_other_gateway: bool = False) -> Path:
    """Make *profile* current in the client config, keeping every other one.

    Refuses (:class:`ConfigError`) to replace a profile for the same address
    that belongs to another gateway (its ``gateway_id`` differs), unless
    *replace_other_gateway*."""
    try:
        config: ClientConfig | None = load_client_config()
    except ConfigError:
        config = None  # none yet, or unreadable: a new file
    if config is None:
        return save_client_config(ClientConfig(**profile.model_dump()))
    existing = config.current if config.api_url == profile.api_url else None
    existing = existing or config.profiles.get(profile.api_url)
    if (
        existing is not None
        and existing.gateway_id
        and profile.gateway_id
        and existing.gateway_id != profile.gateway_id
        and not replace_other_gateway
    ):
        raise ConfigError(
            f"the client configuration already has a profile for {profile.api_url}"
            " that belongs to another gateway",
            hint=f"remove it with `pam logout --gateway {profile.api_url}`, or use another"
            " --api-port",
        )
    return save_client_config(config.with_current(profile))
