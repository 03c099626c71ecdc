"""The control API's own models: what goes over HTTP, in both directions.

The API answers with these, never with the store's records, so a column added
to a table is not a change of the public API. Each ``*Out`` model is built from
a record with ``from_attributes`` and lists the fields the API promises; a field
it does not list does not leave the daemon. Passwords travel only inward
(``SecretStr``) and are never part of a response.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from gateway.identity.principals import ALL_PROJECTS, Role
from gateway.net.upstream import SslMode


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)

    @classmethod
    def of(cls, record: Any) -> Self:
        return cls.model_validate(record, from_attributes=True)


# --- requests ---------------------------------------------------------------------


class ResourceIn(BaseModel):
    name: str
    host: str
    port: int = 5432
    database: str
    ssl_mode: SslMode = "verify-full"
    ca_cert: str | None = None
    project: str = "default"


class AccountIn(BaseModel):
    name: str
    username: str
    password: SecretStr
    #: sign in upstream with it first and refuse one that does not work
    verify: bool = True
    #: rotate it right away: pam generates its password and nobody knows it
    managed: bool = False


class RotateIn(BaseModel):
    password: SecretStr
    #: sign in upstream with it first and refuse one that does not work
    verify: bool = True


class ScheduleIn(BaseModel):
    """An account's rotation schedule: every this many seconds, or null for none."""

    every_seconds: int | None = Field(default=None, gt=0)


class RotationRoleIn(BaseModel):
    """The role that changes a resource's accounts' passwords."""

    username: str = Field(min_length=1, max_length=255)
    password: SecretStr
    verify: bool = True
    #: who gets what a grant's own role owned (REASSIGN OWNED); None: the rotation role
    reassign_to: str | None = Field(default=None, min_length=1, max_length=63)


class EphemeralAccountIn(BaseModel):
    """An account with no password: each grant signs in as a role of its own."""

    name: str
    #: the role each grant's role is made a member of (what the person may do)
    template_role: str = Field(min_length=1, max_length=63)
    #: drop the grant's role this long after the grant (None: at its end)
    cleanup_after_seconds: int | None = Field(default=None, gt=0)
    #: sign in as the rotation role first and check that it could make one
    verify: bool = True


class AccessIn(BaseModel):
    #: all three may be left out when opening an approved request (``request_id``)
    resource: str | None = Field(default=None, min_length=1, max_length=255)
    account: str | None = Field(default=None, min_length=1, max_length=255)
    duration_seconds: int | None = Field(default=None, gt=0)
    port: int | None = None
    reason: str | None = Field(default=None, max_length=2000)
    #: the host name the CLI reports (recorded as reported, not verified)
    client_host: str | None = Field(default=None, max_length=255)
    #: serve a Unix socket in this directory (absolute path) instead of a TCP port
    socket_dir: str | None = Field(default=None, min_length=1, max_length=4096)
    #: from a CLI on another host: a PEM CSR for its in-memory key (tunnel grant)
    csr: str | None = Field(default=None, max_length=16 * 1024)
    #: open this approved access request (what was asked is the request's)
    request_id: str | None = Field(default=None, min_length=6, max_length=32)
    #: skip the approval a policy asks for, where it allows break-glass
    break_glass: bool = False
    #: a second-factor code, where the policy asks for one (once per grant)
    otp: SecretStr | None = Field(default=None, max_length=16)


class ApproveIn(BaseModel):
    comment: str | None = Field(default=None, max_length=2000)
    #: a second-factor code, where the project asks for one to approve
    otp: SecretStr | None = Field(default=None, max_length=16)


class DenyIn(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


class LoginIn(BaseModel):
    user: str = Field(min_length=1, max_length=63)
    password: SecretStr
    #: the second-factor code of a user who enrolled one
    otp: SecretStr | None = Field(default=None, max_length=16)


class UserIn(BaseModel):
    name: str
    role: Role
    project: str = ALL_PROJECTS
    groups: list[str] = Field(default_factory=list)
    password: SecretStr | None = None


class PasswordIn(BaseModel):
    password: SecretStr


class MachineTokenIn(BaseModel):
    name: str
    role: Role = Role.MEMBER
    project: str = ALL_PROJECTS
    ttl_seconds: int = Field(gt=0, le=366 * 86400)


class PolicyIn(BaseModel):
    name: str
    project: str = "default"
    subjects: list[str] = Field(min_length=1)
    resource: str = Field(min_length=1, max_length=255)
    account: str = Field(min_length=1, max_length=255)
    max_duration_seconds: int = Field(gt=0)
    require_reason: bool = False
    approvals_required: int = Field(default=0, ge=0)
    approvers: list[str] = Field(default_factory=list, max_length=100)
    break_glass: bool = False
    require_mfa: bool = False
    idle_timeout_seconds: int | None = Field(default=None, gt=0)


class MfaEnrollIn(BaseModel):
    #: a current code of the active second factor, when replacing it
    code: SecretStr | None = Field(default=None, max_length=16)


class MfaCodeIn(BaseModel):
    code: SecretStr = Field(max_length=16)


class ProjectSettingsIn(BaseModel):
    approval_mfa: bool


class RevokeIn(BaseModel):
    reason: str | None = Field(default=None, max_length=500)


class ExtendIn(BaseModel):
    #: how much later the grant expires (its whole length stays within the
    #: policy's and the gateway's maximum)
    by_seconds: int = Field(gt=0, le=366 * 86400)


class AccessEndIn(BaseModel):
    detail: str | None = Field(default=None, max_length=500)


class WebhookIn(BaseModel):
    url: str = Field(min_length=1, max_length=2048)
    #: event names from the catalogue (gateway.notify.events), or ["*"]
    events: list[str] = Field(min_length=1, max_length=64)
    project: str = "default"


# --- responses --------------------------------------------------------------------


class ResourceOut(_Out):
    id: str
    name: str
    host: str
    port: int
    database: str
    ssl_mode: str
    ca_cert: str | None
    created_at: datetime
    project: str
    rotation_username: str | None
    reassign_to: str | None = None


class AccountOut(_Out):
    id: str
    resource_id: str
    resource_name: str
    name: str
    username: str
    created_at: datetime
    password_updated_at: datetime
    managed: bool
    rotation_pending: bool
    last_rotation_at: datetime | None
    last_rotation_outcome: str | None
    #: the schedule (``pam account rotate --every``): None when off
    rotation_interval_seconds: int | None = None
    next_rotation_at: datetime | None = None
    #: scheduled attempts failed in a row (retried with backoff)
    rotation_failures: int = 0
    #: an ephemeral account's template role, and how long after a grant its
    #: role is dropped (None: at the grant's end)
    template_role: str | None = None
    cleanup_after_seconds: int | None = None


class RotationOut(_Out):
    """One rotation (or stored password): who started it, when, how it ended."""

    ok: bool
    resource: str
    account: str
    rotation_id: str
    #: rotated, stored, failed, rolled_back; unsettled (not recorded yet)
    outcome: str
    #: self, rotator; None for a typed password
    via: str | None
    method: str
    started_by: str
    started_at: datetime
    ended_at: datetime
    detail: str | None
    hint: str | None
    #: the gateway that ran it; its number in the rotation record (what
    #: ``pam audit verify`` names)
    gateway_id: str | None = None
    record: int | None = None


class GrantRoleOut(_Out):
    """A database role pam made for a grant and has not dropped yet."""

    role: str
    resource: str
    account: str
    session_id: str
    created_at: datetime
    #: when its grant ended (None: live)
    session_ended_at: datetime | None
    disabled_at: datetime | None
    drop_after: datetime | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None


class AccountAddOut(AccountOut):
    #: the rotation right after adding a managed account
    rotation: RotationOut | None = None


class SessionOut(_Out):
    id: str
    requester: str
    resource_name: str
    account_name: str
    database: str
    username: str
    listen_host: str
    listen_port: int | None
    started_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    end_detail: str | None
    duration_seconds: float | None
    principal_id: str | None = None
    token_id: str | None = None
    project: str | None = None
    policy_name: str | None = None
    reason: str | None = None
    api_client_addr: str | None = None
    reported_host: str | None = None
    request_id: str | None = None


class AccessOut(SessionOut):
    """A new grant; a tunnel grant's also carries what the CLI's forwarder needs."""

    #: the client certificate issued for the CSR (PEM), expiring with the grant
    certificate: str | None = None
    #: the gateway CA (PEM) the tunnel's server certificate chains to
    ca_cert_pem: str | None = None
    tunnel_port: int | None = None
    #: how long before expiry live connections are warned (seconds, longest first)
    expiry_notice_seconds: list[int] = Field(default_factory=list)


class CertificateOut(BaseModel):
    """A tunnel grant's current client certificate (re-issued by an extension),
    and the answering gateway's tunnel port (where a CLI that failed over goes)."""

    certificate: str
    tunnel_port: int | None = None


class ApprovalOut(_Out):
    by: str
    at: datetime
    comment: str | None


class RequestOut(_Out):
    """An access request (gateway.access.requests) as the API shows it."""

    id: str
    project: str
    requester: str
    resource: str
    account: str
    duration_seconds: int
    reason: str | None
    policy_name: str
    approvals_required: int
    #: names and @groups; empty: the project's admins
    approvers: tuple[str, ...]
    break_glass: bool
    state: str
    created_at: datetime
    #: a pending request not decided by then expires
    expires_at: datetime
    approvals: tuple[ApprovalOut, ...]
    approved_at: datetime | None
    #: an approved request not opened by then expires
    use_by: datetime | None
    decided_by: str | None
    decision_note: str | None
    #: the grant it opened; for an extension, the grant it extends
    session_id: str | None
    #: an extension of a live grant by ``duration_seconds``, applied once approved
    extends: bool
    #: whether the caller may approve or deny it now
    can_decide: bool = False


class AccessPendingOut(BaseModel):
    """``POST /v1/access`` when a policy asks for approval: the request to wait on."""

    request: RequestOut


class TrailRecordOut(_Out):
    """A record of the access trail (what happened to a request)."""

    seq: int
    request_id: str
    kind: str
    actor: str
    at: datetime
    state: str
    detail: dict[str, Any]


class ConnectionOut(_Out):
    id: str
    session_id: str
    client_addr: str
    application_name: str | None
    backend_pid: int | None
    started_at: datetime
    ended_at: datetime | None
    bytes_from_client: int
    bytes_from_server: int
    end_reason: str | None
    error_sqlstate: str | None
    error_message: str | None
    duration_seconds: float | None


class ParameterOut(_Out):
    index: int
    type_oid: int | None
    format: str
    value: str | None
    truncated: bool


class AuditRecordOut(_Out):
    session_id: str
    connection_id: str | None
    seq: int
    kind: str
    occurred_at: datetime
    recorded_at: datetime
    protocol: str | None
    sql: str | None
    statement_name: str | None
    portal_name: str | None
    parameters: tuple[ParameterOut, ...] | None
    command_tag: str | None
    rows: int | None
    status: str | None
    sqlstate: str | None
    error_message: str | None
    duration_ms: float | None
    copy_direction: str | None
    copy_bytes: int | None
    detail: dict[str, str | int | float | None] | None
    prev_hash: str
    hash: str
    resource_name: str
    account_name: str
    requester: str


class SessionDetail(BaseModel):
    session: SessionOut
    connections: list[ConnectionOut]
    live_connections: int
    statements: int


class AuditPageOut(BaseModel):
    """One page of a session's trail (``kind`` ``statement``: its statements only).

    ``page`` is ``None`` for a page read by ``cursor``; ``next_cursor`` reads the
    following page at the same cost, ``None`` on the last page.
    """

    session_id: str
    kind: str | None
    total: int
    page: int | None
    pages: int
    page_size: int
    records: list[AuditRecordOut]
    next_cursor: str | None


class ProblemOut(_Out):
    session_id: str
    seq: int | None
    problem: str
    detail: str


class AuditVerifyOut(BaseModel):
    """A chain check; ``sessions_checked`` is 1 for one session, else every session's."""

    ok: bool
    session: str | None
    problems: list[ProblemOut]
    sessions_checked: int


class TokenOut(BaseModel):
    """A token, the one time it is shown."""

    token: str
    token_id: str
    user: str
    expires_at: datetime | None


class PrincipalOut(_Out):
    id: str
    name: str
    kind: str
    roles: dict[str, str]
    groups: tuple[str, ...]
    has_password: bool
    created_at: datetime
    disabled_at: datetime | None
    mfa_enabled: bool = False


class WhoamiOut(BaseModel):
    id: str
    name: str
    kind: str
    roles: dict[str, str]
    groups: list[str]
    token_id: str | None
    mfa_enabled: bool = False


class MfaEnrolmentOut(BaseModel):
    """A pending second factor: the one time its secret is shown."""

    secret: str
    uri: str
    issuer: str
    account: str


class MfaStatusOut(BaseModel):
    user: str
    enabled: bool
    enabled_at: datetime | None
    pending: bool
    reset_by: str | None
    reset_at: datetime | None


class ProjectOut(_Out):
    project: str
    approval_mfa: bool
    updated_at: datetime | None
    updated_by: str | None


class PolicyOut(_Out):
    name: str
    project: str
    subjects: tuple[str, ...]
    resource_glob: str
    account_glob: str
    max_duration_seconds: int
    require_reason: bool
    approvals_required: int
    approvers: tuple[str, ...]
    break_glass: bool
    require_mfa: bool
    idle_timeout_seconds: int | None


class Health(BaseModel):
    status: str
    version: str
    server_time: datetime
    #: which gateway this is (clients keep one profile per gateway)
    gateway_id: str


class RefusalOut(_Out):
    """A refused API call or grant connection, or a summary of a flood of them."""

    first_at: datetime
    last_at: datetime
    #: ``api``, ``listener`` or ``tunnel``
    place: str
    session_id: str | None
    source: str
    who: str | None
    reason: str
    message: str
    count: int


# --- single sign-on (OpenID Connect) ------------------------------------------------


class SsoConfigIn(BaseModel):
    issuer: str = Field(min_length=1, max_length=2000)
    client_id: str = Field(min_length=1, max_length=255)
    #: None keeps the stored secret (a change of the other settings only)
    client_secret: SecretStr | None = Field(default=None, max_length=4096)
    groups_claim: str = Field(default="groups", min_length=1, max_length=255)
    scopes: str = Field(default="openid profile email", min_length=1, max_length=1000)
    redirect_base: str | None = Field(default=None, max_length=2000)


class SsoConfigOut(BaseModel):
    """The provider's registration; the client secret is never part of it."""

    issuer: str
    client_id: str
    groups_claim: str
    scopes: str
    redirect_base: str | None
    #: the callback to register at the provider (None: every address CLIs use)
    redirect_uri: str | None
    updated_at: datetime


class SsoGroupIn(BaseModel):
    claim_value: str = Field(min_length=1, max_length=255)
    group: str = Field(min_length=1, max_length=64)
    project: str | None = None


class SsoGroupOut(BaseModel):
    claim_value: str
    group: str
    project: str | None


class SsoStartIn(BaseModel):
    device: bool = False


class SsoStartOut(BaseModel):
    """A sign-in begun: the handle to poll with (shown once), and the URL to open
    or the code to enter at ``verification_uri``."""

    handle: str
    expires_at: datetime
    interval: float
    authorization_url: str | None
    user_code: str | None
    verification_uri: str | None
    verification_uri_complete: str | None


class SsoPollIn(BaseModel):
    handle: SecretStr = Field(min_length=1, max_length=200)


class SsoPollOut(BaseModel):
    """``pending``, ``done`` (the token, once), ``failed`` or ``expired`` (why)."""

    status: str
    token: str | None = None
    token_id: str | None = None
    user: str | None = None
    expires_at: datetime | None = None
    groups: list[str] = Field(default_factory=list)
    message: str | None = None
    hint: str | None = None


class WebhookOut(_Out):
    """A webhook as listed: never its secret."""

    id: str
    project: str
    url: str
    events: tuple[str, ...]
    created_at: datetime
    created_by: str | None


class WebhookCreatedOut(WebhookOut):
    """A new webhook, with its signing secret: the one time it is shown."""

    secret: str


class DeliveryOut(_Out):
    """One event for one webhook: ``pending``, ``delivered`` or ``failed``."""

    id: str
    webhook_id: str
    event: str
    project: str
    occurred_at: datetime
    state: str
    attempts: int
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
