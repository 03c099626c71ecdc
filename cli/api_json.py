"""What the control API answers, as ``TypedDict``s: the JSON as the daemon sends it.

Role: the result types of :class:`cli.client.ApiClient` (re-exported there).
Each mirrors the API's own model in ``gateway/app/api/models.py`` field by
field, in order; ``tests/unit/cli/test_client.py`` keeps the two in step.

Invariant: times stay ISO-8601 strings, as sent, so ``--json`` prints exactly
what the API answered and the renderers parse times themselves.
"""

from __future__ import annotations

from typing import Any, TypedDict


class HealthJson(TypedDict):
    status: str
    version: str
    server_time: str
    gateway_id: str


class ResourceJson(TypedDict):
    id: str
    name: str
    host: str
    port: int
    database: str
    ssl_mode: str
    ca_cert: str | None
    created_at: str
    project: str
    rotation_username: str | None
    reassign_to: str | None


class AccountJson(TypedDict):
    id: str
    resource_id: str
    resource_name: str
    name: str
    username: str
    created_at: str
    password_updated_at: str
    managed: bool
    rotation_pending: bool
    last_rotation_at: str | None
    last_rotation_outcome: str | None
    rotation_interval_seconds: int | None
    next_rotation_at: str | None
    rotation_failures: int
    template_role: str | None
    cleanup_after_seconds: int | None


class RotationJson(TypedDict):
    """One rotation or stored password (``RotationOut``); never the password."""

    ok: bool
    resource: str
    account: str
    rotation_id: str
    outcome: str
    via: str | None
    method: str
    started_by: str
    started_at: str
    ended_at: str
    detail: str | None
    hint: str | None
    gateway_id: str | None
    record: int | None


class GrantRoleJson(TypedDict):
    """A database role pam made for a grant and has not dropped yet (``GrantRoleOut``)."""

    role: str
    resource: str
    account: str
    session_id: str
    created_at: str
    session_ended_at: str | None
    disabled_at: str | None
    drop_after: str | None
    attempts: int
    next_attempt_at: str | None
    last_error: str | None


class AccountAddJson(AccountJson):
    rotation: RotationJson | None


class VerifyResultJson(TypedDict):
    """One account's outcome of ``POST /v1/resources/{name}/verify``."""

    ok: bool
    resource: str
    account: str
    address: str
    ssl_mode: str
    latency_ms: float | None
    server_version: str | None
    tls_version: str | None
    cipher: str | None
    auth_method: str | None
    error_kind: str | None
    error_sqlstate: str | None
    error: str | None
    hint: str | None


class SessionJson(TypedDict):
    id: str
    requester: str
    resource_name: str
    account_name: str
    database: str
    username: str
    listen_host: str
    listen_port: int | None
    started_at: str
    expires_at: str
    ended_at: str | None
    end_reason: str | None
    end_detail: str | None
    duration_seconds: float | None
    principal_id: str | None
    token_id: str | None
    project: str | None
    policy_name: str | None
    reason: str | None
    api_client_addr: str | None
    reported_host: str | None
    request_id: str | None


class AccessJson(SessionJson, total=False):
    """A new grant; a tunnel grant's carries its certificate, the CA and the port."""

    certificate: str | None
    ca_cert_pem: str | None
    tunnel_port: int | None
    expiry_notice_seconds: list[int]


class CertificateJson(TypedDict):
    certificate: str
    tunnel_port: int | None


class ConnectionJson(TypedDict):
    id: str
    session_id: str
    client_addr: str
    application_name: str | None
    backend_pid: int | None
    started_at: str
    ended_at: str | None
    bytes_from_client: int
    bytes_from_server: int
    end_reason: str | None
    error_sqlstate: str | None
    error_message: str | None
    duration_seconds: float | None


class SessionDetailJson(TypedDict):
    session: SessionJson
    connections: list[ConnectionJson]
    live_connections: int
    statements: int


class ParameterJson(TypedDict):
    index: int
    type_oid: int | None
    format: str
    value: str | None
    truncated: bool


class AuditRecordJson(TypedDict):
    session_id: str
    connection_id: str | None
    seq: int
    kind: str
    occurred_at: str
    recorded_at: str
    protocol: str | None
    sql: str | None
    statement_name: str | None
    portal_name: str | None
    parameters: list[ParameterJson] | None
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


class ProblemJson(TypedDict):
    session_id: str
    seq: int | None
    problem: str
    detail: str


class AuditPageJson(TypedDict):
    """A page of ``/statements`` or ``/trail``; ``next_cursor`` reads the next one."""

    session_id: str
    kind: str | None
    total: int
    page: int | None
    pages: int
    page_size: int
    records: list[AuditRecordJson]
    next_cursor: str | None


class AuditVerifyJson(TypedDict):
    ok: bool
    session: str | None
    problems: list[ProblemJson]
    sessions_checked: int


class TokenJson(TypedDict):
    token: str
    token_id: str
    user: str
    expires_at: str | None


class PrincipalJson(TypedDict):
    id: str
    name: str
    kind: str
    roles: dict[str, str]
    groups: list[str]
    has_password: bool
    created_at: str
    disabled_at: str | None
    mfa_enabled: bool


class WhoamiJson(TypedDict):
    id: str
    name: str
    kind: str
    roles: dict[str, str]
    groups: list[str]
    token_id: str | None
    mfa_enabled: bool


class MfaEnrolmentJson(TypedDict):
    """A pending second factor: its secret, shown once."""

    secret: str
    uri: str
    issuer: str
    account: str


class MfaStatusJson(TypedDict):
    user: str
    enabled: bool
    enabled_at: str | None
    pending: bool
    reset_by: str | None
    reset_at: str | None


class ProjectJson(TypedDict):
    project: str
    approval_mfa: bool
    updated_at: str | None
    updated_by: str | None


class PolicyJson(TypedDict):
    name: str
    project: str
    subjects: list[str]
    resource_glob: str
    account_glob: str
    max_duration_seconds: int
    require_reason: bool
    approvals_required: int
    approvers: list[str]
    break_glass: bool
    require_mfa: bool
    idle_timeout_seconds: int | None


class ApprovalJson(TypedDict):
    by: str
    at: str
    comment: str | None


class RequestJson(TypedDict):
    id: str
    project: str
    requester: str
    resource: str
    account: str
    duration_seconds: int
    reason: str | None
    policy_name: str
    approvals_required: int
    approvers: list[str]
    break_glass: bool
    state: str
    created_at: str
    expires_at: str
    approvals: list[ApprovalJson]
    approved_at: str | None
    use_by: str | None
    decided_by: str | None
    decision_note: str | None
    session_id: str | None
    extends: bool
    can_decide: bool


class TrailRecordJson(TypedDict):
    seq: int
    request_id: str
    kind: str
    actor: str
    at: str
    state: str
    detail: dict[str, Any]


class SsoConfigJson(TypedDict):
    issuer: str
    client_id: str
    groups_claim: str
    scopes: str
    redirect_base: str | None
    redirect_uri: str | None
    updated_at: str


class SsoGroupJson(TypedDict):
    claim_value: str
    group: str
    project: str | None


class SsoStartJson(TypedDict):
    handle: str
    expires_at: str
    interval: float
    authorization_url: str | None
    user_code: str | None
    verification_uri: str | None
    verification_uri_complete: str | None


class SsoPollJson(TypedDict):
    status: str
    token: str | None
    token_id: str | None
    user: str | None
    expires_at: str | None
    groups: list[str]
    message: str | None
    hint: str | None


class WebhookJson(TypedDict):
    id: str
    project: str
    url: str
    events: list[str]
    created_at: str
    created_by: str | None


class WebhookCreatedJson(WebhookJson):
    """A new webhook, with its secret: the one time it is shown."""

    secret: str


class DeliveryJson(TypedDict):
    id: str
    webhook_id: str
    event: str
    project: str
    occurred_at: str
    state: str
    attempts: int
    last_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: str | None
    delivered_at: str | None
