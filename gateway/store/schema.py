"""Table definitions of the state store (SQLAlchemy Core).

Role: the one description of the tables that :class:`gateway.store.Store` queries.
The tables are *created* by the alembic migrations in ``migrations/versions``, not
by ``metadata.create_all``; a unit test checks that the migrated database and this
module agree.

Invariants:

* Primary keys are 32-character uuid4 hex strings generated in Python, so ids are
  the same shape on every backend and never reveal row counts or creation order.
* Timestamps go through :class:`UtcTimestamp`: ``timestamptz`` on PostgreSQL and a
  fixed-width ISO-8601 UTC string elsewhere (SQLite has no date type). Both keep
  microseconds, round-trip exactly and sort chronologically.
* Passwords exist only as ``accounts.password_ciphertext`` (and, during a
  rotation, ``accounts.pending_ciphertext``) and ``resources.rotation_ciphertext``,
  sealed by :class:`gateway.credentials.secretbox.SecretBox` with their row's id
  (and purpose) as associated data; second-factor secrets only as
  ``mfa_factors.*_ciphertext``, sealed the same way.
* Sessions copy names (resource, account) and connection facts (database,
  username) instead of referencing rows, so the audit trail outlives the
  resources and accounts it mentions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = [
    "HASH_LENGTH",
    "ID_LENGTH",
    "ISO_TIMESTAMP_LENGTH",
    "NAME_LENGTH",
    "VERSION_TABLE",
    "UtcTimestamp",
    "access_event_head",
    "access_events",
    "access_requests",
    "accounts",
    "audit_batches",
    "audit_events",
    "connections",
    "ephemeral_roles",
    "leases",
    "metadata",
    "mfa_factors",
    "policies",
    "principal_groups",
    "principal_identities",
    "principals",
    "project_settings",
    "refusals",
    "resources",
    "role_bindings",
    "rotation_head",
    "rotations",
    "sessions",
    "sso_group_mappings",
    "sso_providers",
    "tokens",
    "webhook_deliveries",
    "webhooks",
]

#: uuid4().hex
ID_LENGTH: Final = 32
#: Matches ``models.NAME_PATTERN``.
NAME_LENGTH: Final = 63
#: Hex SHA-256 (audit record hashes and session seals).
HASH_LENGTH: Final = 64
#: ``2024-01-02T03:04:05.678901+00:00``: always this long for years 1000-9999.
ISO_TIMESTAMP_LENGTH: Final = 32

# Deterministic constraint names make future migrations (including SQLite's
# copy-and-move "batch" mode) able to find and alter constraints by name.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcTimestamp(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime, stored natively where the backend can.

    Binding a naive datetime is a programming error and raises ``ValueError``:
    guessing its zone is how audit trails end up an hour off.
    """

    impl = String(ISO_TIMESTAMP_LENGTH)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(DateTime(timezone=True))
        # Strings compare the same as the instants they name only because every
        # value is UTC with microseconds, hence fixed width (see process_bind_param).
        return dialect.type_descriptor(String(ISO_TIMESTAMP_LENGTH))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | str | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        if dialect.name == "postgresql":
            return value
        return value.isoformat(timespec="microseconds")

    def process_result_value(self, value: object, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            # psycopg returns timestamptz in the session's TimeZone setting.
            return value.astimezone(UTC)
        return datetime.fromisoformat(str(value)).astimezone(UTC)


resources = Table(
    "resources",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("name", String(NAME_LENGTH), nullable=False),
    Column("host", Text, nullable=False),
    Column("port", Integer, nullable=False),
    Column("database", Text, nullable=False),
    Column("ssl_mode", String(16), nullable=False),
    Column("ca_cert", Text, nullable=True),
    Column("created_at", UtcTimestamp, nullable=False),
    # Accounts and policies are scoped by their resource's project.
    Column("project", String(NAME_LENGTH), nullable=False, server_default="default"),
    # The role that changes its accounts' passwords (revision 0014); its password
    # sealed with the resource id as associated data. None: accounts rotate themselves.
    Column("rotation_username", Text, nullable=True),
    Column("rotation_ciphertext", LargeBinary, nullable=True),
    # Revision 0016: who gets what a grant's own role owned (REASSIGN OWNED);
    # None: the rotation role.
    Column("reassign_to", Text, nullable=True),
    UniqueConstraint("name"),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    # Deliberately not ON DELETE CASCADE: removing a resource deletes its accounts
    # explicitly, after checking for active sessions, in the same transaction.
    Column("resource_id", String(ID_LENGTH), ForeignKey("resources.id"), nullable=False),
    Column("name", String(NAME_LENGTH), nullable=False),
    Column("username", Text, nullable=False),
    # NULL for an ephemeral account (revision 0016): it has no password.
    Column("password_ciphertext", LargeBinary, nullable=True),
    Column("created_at", UtcTimestamp, nullable=False),
    Column("password_updated_at", UtcTimestamp, nullable=False),
    # Revision 0014: a managed account's password is generated by pam and known
    # to nobody; a rotation in flight keeps its new password here (sealed) from
    # before the ALTER ROLE until it is promoted or rolled back.
    Column("managed", Integer, nullable=False, server_default="0"),
    Column("pending_ciphertext", LargeBinary, nullable=True),
    Column("pending_rotation_id", String(ID_LENGTH), nullable=True),
    Column("pending_started_at", UtcTimestamp, nullable=True),
    Column("pending_started_by", Text, nullable=True),
    Column("pending_via", String(16), nullable=True),
    # Revision 0015: a rotation schedule (None: none) with its next due time and
    # the scheduled attempts failed in a row (the backoff's count), and the
    # gateway that started the rotation in flight (who may recover it).
    Column("rotation_interval_seconds", Integer, nullable=True),
    Column("next_rotation_at", UtcTimestamp, nullable=True),
    Column("rotation_failures", Integer, nullable=False, server_default="0"),
    Column("pending_gateway_id", Text, nullable=True),
    # Revision 0016: an ephemeral account's grants each sign in as a role of
    # their own, made in this template role; dropped this long after the grant
    # (NULL: at its end).
    Column("template_role", Text, nullable=True),
    Column("cleanup_after_seconds", Integer, nullable=True),
    UniqueConstraint("resource_id", "name"),
    Index(None, "next_rotation_at"),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("requester", Text, nullable=False),
    Column("resource_name", String(NAME_LENGTH), nullable=False),
    Column("account_name", String(NAME_LENGTH), nullable=False),
    Column("database", Text, nullable=False),
    Column("username", Text, nullable=False),
    Column("listen_host", Text, nullable=False),
    Column("listen_port", Integer, nullable=True),
    Column("started_at", UtcTimestamp, nullable=False),
    Column("expires_at", UtcTimestamp, nullable=False),
    Column("ended_at", UtcTimestamp, nullable=True),
    Column("end_reason", String(32), nullable=True),
    Column("end_detail", Text, nullable=True),
    # Set when the session ends (see gateway.audit.chain): the audit trail's final
    # length and head hash, and an HMAC over both that detects truncation.
    Column("audit_count", Integer, nullable=True),
    Column("audit_head", String(HASH_LENGTH), nullable=True),
    Column("audit_seal", String(HASH_LENGTH), nullable=True),
    # Who asked (revision 0005): the authenticated principal (``requester`` is
    # its name), the token it used, the policy that allowed it and the reason
    # given, the API client's address and the host name the CLI reported.
    Column("principal_id", String(ID_LENGTH), nullable=True),
    Column("token_id", String(ID_LENGTH), nullable=True),
    Column("project", String(NAME_LENGTH), nullable=True),
    Column("policy_name", String(NAME_LENGTH), nullable=True),
    Column("reason", Text, nullable=True),
    Column("api_client_addr", Text, nullable=True),
    Column("reported_host", Text, nullable=True),
    # Seals over the row's fields (revision 0007, gateway.store.sealing).
    Column("start_seal", Text, nullable=True),
    Column("end_seal", Text, nullable=True),
    # The access request it was opened from (revision 0010), if any.
    Column("request_id", String(ID_LENGTH), nullable=True),
    # The gateway that opened it and relays its connections (revision 0017);
    # NULL for sessions from before several gateways could share a store.
    Column("gateway_id", Text, nullable=True),
    # Revision 0018 (failover): the gateway holding it now (moves when another
    # takes the grant over; crash recovery goes by it), a tunnel grant's client
    # public key (PEM), and the allowing policy's idle timeout.
    Column("holder_id", Text, nullable=True),
    Column("client_public_key", Text, nullable=True),
    Column("idle_timeout_seconds", Integer, nullable=True),
    Column("idle_policy", Text, nullable=True),
    Index(None, "started_at"),
    Index(None, "ended_at"),
    Index(None, "resource_name", "account_name"),
    Index(None, "gateway_id"),
    Index(None, "holder_id"),
)

#: People and automation (revision 0005). A user may have an argon2id password
#: hash; a machine principal has only tokens. Disabling keeps the row (sessions
#: name it) and revokes its tokens.
principals = Table(
    "principals",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("name", String(NAME_LENGTH), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("password_hash", Text, nullable=True),
    Column("created_at", UtcTimestamp, nullable=False),
    Column("disabled_at", UtcTimestamp, nullable=True),
    UniqueConstraint("name"),
)

principal_groups = Table(
    "principal_groups",
    metadata,
    Column("principal_id", String(ID_LENGTH), ForeignKey("principals.id"), primary_key=True),
    Column("group_name", String(NAME_LENGTH), primary_key=True),
    #: ``manual`` (an admin's) or ``sso`` (the last sign-in's; revision 0011)
    Column("source", String(8), nullable=False, server_default="manual"),
)

#: One role per principal and project; project ``*`` is every project.
role_bindings = Table(
    "role_bindings",
    metadata,
    Column("principal_id", String(ID_LENGTH), ForeignKey("principals.id"), primary_key=True),
    Column("project", String(NAME_LENGTH), primary_key=True),
    Column("role", String(16), nullable=False),
    #: ``manual`` (an admin's) or ``sso`` (the last sign-in's; revision 0011)
    Column("source", String(8), nullable=False, server_default="manual"),
)

#: API tokens, kept as SHA-256 only. ``kind``: ``session`` (pam login, short
#: lived), ``machine`` (pam token create), ``local`` (written by gateway init
#: for this host's client configuration; accepted from loopback only).
tokens = Table(
    "tokens",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("principal_id", String(ID_LENGTH), ForeignKey("principals.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("digest", String(HASH_LENGTH), nullable=False),
    Column("created_at", UtcTimestamp, nullable=False),
    Column("expires_at", UtcTimestamp, nullable=True),
    Column("revoked_at", UtcTimestamp, nullable=True),
    UniqueConstraint("digest"),
    Index(None, "principal_id"),
)

policies = Table(
    "policies",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("name", String(NAME_LENGTH), nullable=False),
    Column("project", String(NAME_LENGTH), nullable=False),
    #: JSON list of principal names and ``@group``s
    Column("subjects", Text, nullable=False),
    Column("resource_glob", Text, nullable=False),
    Column("account_glob", Text, nullable=False),
    Column("max_duration_seconds", Integer, nullable=False),
    Column("require_reason", Integer, nullable=False),
    Column("created_at", UtcTimestamp, nullable=False),
    # revision 0008: approval, break-glass, second factor, idle timeout
    Column("approvals_required", Integer, nullable=False, server_default="0"),
    #: JSON list of principal names and ``@group``s; empty: the project's admins
    Column("approvers", Text, nullable=False, server_default="[]"),
    Column("break_glass", Integer, nullable=False, server_default="0"),
    Column("require_mfa", Integer, nullable=False, server_default="0"),
    Column("idle_timeout_seconds", Integer, nullable=True),
    UniqueConstraint("name"),
    Index(None, "project"),
)

#: A user's second factor (revision 0013, gateway.identity.mfa): the TOTP
#: secret sealed like account passwords (associated data ``pam/mfa/`` + the
#: principal's id), active or waiting for its first code; the time step of the
#: last accepted code (replays are refused) and the times of recent wrong codes
#: (JSON list of epoch seconds; the rate limit), shared by every gateway on the
#: store; who last reset it.
mfa_factors = Table(
    "mfa_factors",
    metadata,
    Column("principal_id", String(ID_LENGTH), ForeignKey("principals.id"), primary_key=True),
    Column("secret_ciphertext", LargeBinary, nullable=True),
    Column("pending_ciphertext", LargeBinary, nullable=True),
    Column("enabled_at", UtcTimestamp, nullable=True),
    Column("last_step", BigInteger, nullable=True),
    Column("failures", Text, nullable=False, server_default="[]"),
    Column("updated_at", UtcTimestamp, nullable=False),
    Column("reset_by", String(NAME_LENGTH), nullable=True),
    Column("reset_at", UtcTimestamp, nullable=True),
)

#: What a project asks beyond its policies (revision 0013); a project with no
#: row has the defaults.
project_settings = Table(
    "project_settings",
    metadata,
    Column("project", String(NAME_LENGTH), primary_key=True),
    Column("approval_mfa", Integer, nullable=False, server_default="0"),
    Column("updated_at", UtcTimestamp, nullable=False),
    Column("updated_by", String(NAME_LENGTH), nullable=True),
)

connections = Table(
    "connections",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("session_id", String(ID_LENGTH), ForeignKey("sessions.id"), nullable=False),
    Column("client_addr", Text, nullable=False),
    Column("application_name", Text, nullable=True),
    Column("backend_pid", Integer, nullable=True),
    Column("started_at", UtcTimestamp, nullable=False),
    Column("ended_at", UtcTimestamp, nullable=True),
    Column("bytes_from_client", BigInteger, nullable=False),
    Column("bytes_from_server", BigInteger, nullable=False),
    Column("end_reason", String(32), nullable=True),
    Column("error_sqlstate", String(5), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("start_seal", Text, nullable=True),
    Column("end_seal", Text, nullable=True),
    Index(None, "session_id", "started_at"),
    Index(None, "ended_at"),
)

#: The statement-level audit trail: append-only (the Store never updates or
#: deletes a row, and triggers refuse it), hash-chained per session by ``seq``,
#: ``prev_hash`` and ``hash`` (see gateway.audit.chain). ``id`` increases with
#: insertion, which is how verification notices a record moved to another seq.
audit_events = Table(
    "audit_events",
    metadata,
    # SQLite only auto-assigns an INTEGER PRIMARY KEY (the rowid alias).
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("session_id", String(ID_LENGTH), ForeignKey("sessions.id"), nullable=False),
    Column("connection_id", String(ID_LENGTH), nullable=True),
    Column("seq", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("occurred_at", UtcTimestamp, nullable=False),
    Column("recorded_at", UtcTimestamp, nullable=False),
    Column("protocol", String(16), nullable=True),
    Column("sql", Text, nullable=True),
    Column("statement_name", Text, nullable=True),
    Column("portal_name", Text, nullable=True),
    # JSON text (a list of parameter objects), not a JSON type: the exact text is
    # what the hash chain was computed from, on every backend.
    Column("parameters", Text, nullable=True),
    Column("command_tag", Text, nullable=True),
    Column("rows", BigInteger, nullable=True),
    Column("status", String(16), nullable=True),
    Column("sqlstate", String(5), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("duration_ms", Float, nullable=True),
    Column("copy_direction", String(3), nullable=True),
    Column("copy_bytes", BigInteger, nullable=True),
    Column("detail", Text, nullable=True),
    Column("prev_hash", String(HASH_LENGTH), nullable=False),
    Column("hash", String(HASH_LENGTH), nullable=False),
    # Which encoding ``hash`` was computed over (gateway.audit.chain).
    Column("chain_version", SmallInteger, nullable=False, server_default="1"),
    # Also the index for "a session's records in seq order".
    UniqueConstraint("session_id", "seq"),
    Index(None, "occurred_at"),
)

#: The audit trail since chain version 3 (gateway.audit.batch): one row per
#: sealed batch of a session's consecutive records. Append-only like
#: ``audit_events`` (triggers refuse UPDATE and DELETE). ``records`` holds the
#: encoded records, ``digests`` one keyed digest per record, ``hash`` the batch's
#: MAC that the next batch chains to; the other columns are derived from the
#: records for reading (seq range, time range in microseconds since the epoch,
#: the kinds present as bits, the statement count) and verify checks them.
audit_batches = Table(
    "audit_batches",
    metadata,
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("session_id", String(ID_LENGTH), ForeignKey("sessions.id"), nullable=False),
    Column("first_seq", Integer, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("min_at", BigInteger, nullable=False),
    Column("max_at", BigInteger, nullable=False),
    Column("kinds", Integer, nullable=False),
    Column("statement_count", Integer, nullable=False),
    Column("records", LargeBinary, nullable=False),
    Column("digests", LargeBinary, nullable=False),
    Column("prev_hash", String(HASH_LENGTH), nullable=False),
    Column("hash", String(HASH_LENGTH), nullable=False),
    Column("chain_version", SmallInteger, nullable=False),
    Column("recorded_at", UtcTimestamp, nullable=False),
    # Also the index for "a session's batches in seq order".
    UniqueConstraint("session_id", "first_seq"),
    # Search reads newest first and stops early.
    Index(None, "max_at"),
)

#: Refused API calls and grant connections (gateway.audit.refusals): one row per
#: refusal or per (source, reason) summary of an interval, with its count.
#: Append-only (triggers refuse UPDATE and DELETE).
refusals = Table(
    "refusals",
    metadata,
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("first_at", UtcTimestamp, nullable=False),
    Column("last_at", UtcTimestamp, nullable=False),
    Column("place", String(16), nullable=False),
    Column("session_id", String(ID_LENGTH), nullable=True),
    Column("source_addr", Text, nullable=False),
    Column("who", Text, nullable=True),
    Column("reason", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("count", Integer, nullable=False),
    Column("recorded_at", UtcTimestamp, nullable=False),
    Index(None, "last_at"),
)

#: The OpenID Connect provider of single sign-on (revision 0011): one row, id
#: ``oidc``. The client secret is sealed with the master key, the row id as
#: associated data.
sso_providers = Table(
    "sso_providers",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("issuer", Text, nullable=False),
    Column("client_id", Text, nullable=False),
    Column("client_secret_ciphertext", LargeBinary, nullable=False),
    Column("groups_claim", String(255), nullable=False),
    #: space-separated, as OAuth sends them
    Column("scopes", Text, nullable=False),
    Column("redirect_base", Text, nullable=True),
    Column("updated_at", UtcTimestamp, nullable=False),
)

#: A value of the groups claim -> a pam group, and the project (if any) whose
#: ``member`` role its holders get at sign-in.
sso_group_mappings = Table(
    "sso_group_mappings",
    metadata,
    Column("claim_value", String(255), primary_key=True),
    Column("group_name", String(NAME_LENGTH), nullable=False),
    Column("project", String(NAME_LENGTH), nullable=True),
    Column("created_at", UtcTimestamp, nullable=False),
)

#: Which identity provider subject a principal is: (issuer, subject) is unique,
#: and a sign-in finds its principal by it, never by name.
principal_identities = Table(
    "principal_identities",
    metadata,
    Column("principal_id", String(ID_LENGTH), ForeignKey("principals.id"), primary_key=True),
    Column("issuer", Text, nullable=False),
    Column("subject", String(255), nullable=False),
    Column("created_at", UtcTimestamp, nullable=False),
    Column("last_sign_in_at", UtcTimestamp, nullable=False),
    UniqueConstraint("issuer", "subject"),
)

#: Webhooks per project (revision 0012, gateway.notify). ``events`` is a JSON list
#: of event names (or ``["*"]``); the signing secret exists only sealed, with
#: ``b"pam/webhook/" + id`` as associated data.
webhooks = Table(
    "webhooks",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("project", String(NAME_LENGTH), nullable=False),
    Column("url", Text, nullable=False),
    Column("events", Text, nullable=False),
    Column("secret_ciphertext", LargeBinary, nullable=False),
    Column("created_at", UtcTimestamp, nullable=False),
    Column("created_by", Text, nullable=True),
    Index(None, "project"),
)

#: The webhook outbox: one row per event and webhook, ``pending`` until an
#: attempt is answered 2xx (``delivered``) or the attempts run out (``failed``).
#: The event's ``data`` is kept as JSON text; the body is built from the row.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    # Deleted with its webhook, explicitly, in the same transaction.
    Column("webhook_id", String(ID_LENGTH), ForeignKey("webhooks.id"), nullable=False),
    Column("event", String(32), nullable=False),
    Column("project", String(NAME_LENGTH), nullable=False),
    Column("occurred_at", UtcTimestamp, nullable=False),
    Column("data", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_attempt_at", UtcTimestamp, nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("next_attempt_at", UtcTimestamp, nullable=True),
    Column("delivered_at", UtcTimestamp, nullable=True),
    Index(None, "state", "next_attempt_at"),
    Index(None, "webhook_id", "occurred_at"),
)

#: Credential rotations and stored passwords (revision 0014): one row per attempt,
#: written when it ends, never the password. Append-only (triggers refuse UPDATE
#: and DELETE). Names are copied, so the record outlives the account.
rotations = Table(
    "rotations",
    metadata,
    Column(
        "id",
        BigInteger().with_variant(Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("rotation_id", String(ID_LENGTH), nullable=False),
    Column("account_id", String(ID_LENGTH), nullable=False),
    Column("resource_name", String(NAME_LENGTH), nullable=False),
    Column("account_name", String(NAME_LENGTH), nullable=False),
    Column("username", Text, nullable=False),
    #: ``generated`` (pam made the password) or ``typed`` (an admin gave it)
    Column("method", String(16), nullable=False),
    #: who changed it upstream: ``self``, ``rotator``; None for a typed password
    Column("via", String(16), nullable=True),
    Column("started_by", Text, nullable=False),
    Column("started_at", UtcTimestamp, nullable=False),
    Column("ended_at", UtcTimestamp, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("detail", Text, nullable=True),
    # Revision 0015: the gateway that started it, and the record's place in one
    # keyed hash chain over every rotation (gateway.store.rotations); None in
    # records written before that revision.
    Column("gateway_id", Text, nullable=True),
    Column("seq", Integer, nullable=True),
    Column("prev_hash", String(HASH_LENGTH), nullable=True),
    Column("hash", String(HASH_LENGTH), nullable=True),
    Index(None, "account_id", "id"),
    Index(None, "seq", unique=True),
)

#: The rotation record's length and last hash, sealed (one row, id 1; revision


def _sealed_head(name: str) -> Table:
    """The one-row table (id 1) of a keyed chain's length, last hash and seal."""
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("count", Integer, nullable=False),
        Column("head", String(HASH_LENGTH), nullable=False),
        Column("seal", String(HASH_LENGTH), nullable=True),
    )


#: 0015): a record cut off the end shows. Appends lock this row.
rotation_head = _sealed_head("rotation_head")

#: Leases (revision 0015, gateway.store.leases): a name held by one gateway
#: (``holder``: its gateway id) until ``expires_at`` unless renewed. The rotation
#: scheduler's lease, and each gateway's presence.
leases = Table(
    "leases",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("holder", Text, nullable=False),
    Column("acquired_at", UtcTimestamp, nullable=False),
    Column("expires_at", UtcTimestamp, nullable=False),
    # The holder's last renewal (revision 0017): where crash recovery ends the
    # sessions of a gateway whose presence lease lapsed.
    Column("renewed_at", UtcTimestamp, nullable=True),
)

#: The gateways of the fleet (revision 0018): each one's advertised control API
#: URL, written at its start; ``pam login`` learns the fleet here.
gateways = Table(
    "gateways",
    metadata,
    Column("id", Text, primary_key=True),
    Column("api_url", Text, nullable=False),
    Column("started_at", UtcTimestamp, nullable=False),
)

#: Alembic's bookkeeping table. Prefixed so the store can share a PostgreSQL
#: database with another application that also uses alembic.
VERSION_TABLE: Final = "pam_alembic_version"

#: Access requests (revision 0010, gateway.access.requests): what was asked,
#: under which policy, and where it stands. ``version`` is bumped by every
#: transition; a writer updates only over the version it read.
access_requests = Table(
    "access_requests",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("project", String(NAME_LENGTH), nullable=False),
    Column("requester_id", String(ID_LENGTH), nullable=False),
    Column("requester", Text, nullable=False),
    Column("resource_name", String(NAME_LENGTH), nullable=False),
    Column("account_name", String(NAME_LENGTH), nullable=False),
    Column("duration_seconds", Integer, nullable=False),
    Column("reason", Text, nullable=True),
    Column("policy_name", String(NAME_LENGTH), nullable=False),
    Column("approvals_required", Integer, nullable=False),
    #: JSON list of names and @groups
    Column("approvers", Text, nullable=False),
    Column("break_glass", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", UtcTimestamp, nullable=False),
    Column("expires_at", UtcTimestamp, nullable=False),
    Column("open_within_seconds", Integer, nullable=False),
    #: JSON list of {by_id, by, at, comment}
    Column("approvals", Text, nullable=False),
    Column("approved_at", UtcTimestamp, nullable=True),
    Column("use_by", UtcTimestamp, nullable=True),
    Column("decided_by", Text, nullable=True),
    Column("decision_note", Text, nullable=True),
    Column("session_id", String(ID_LENGTH), nullable=True),
    #: an extension of the grant ``session_id``, not a new grant
    Column("extends", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Index(None, "state"),
    Index(None, "requester_id"),
    Index(None, "project"),
)

#: The trail of what happened to access requests (revision 0010): one chain
#: for the whole gateway, each record an HMAC over its fields, its seq and the
#: hash before it (gateway.audit.chain.AuditChain.access_event_hash).
access_events = Table(
    "access_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("request_id", String(ID_LENGTH), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("actor", Text, nullable=False),
    Column("occurred_at", UtcTimestamp, nullable=False),
    Column("state", String(16), nullable=False),
    #: canonical JSON of the record's detail
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(HASH_LENGTH), nullable=False),
    Column("hash", String(HASH_LENGTH), nullable=False),
    Index(None, "request_id"),
)

#: The access trail's length and last hash, sealed (one row, id 1): a record
#: cut off the end shows. Appends lock this row, so gateways sharing a
#: PostgreSQL store chain one after another.
access_event_head = _sealed_head("access_event_head")

# Revision 0016: the roles pam made for grants of ephemeral accounts, written
# before each CREATE ROLE and finished when the role is dropped (or found gone,
# or found not to be pam's). No password.
ephemeral_roles = Table(
    "ephemeral_roles",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("role", Text, nullable=False),
    Column("resource_name", String(NAME_LENGTH), nullable=False),
    Column("account_name", String(NAME_LENGTH), nullable=False),
    Column("session_id", String(ID_LENGTH), nullable=False),
    Column("cleanup_after_seconds", Integer, nullable=True),
    Column("created_at", UtcTimestamp, nullable=False),
    Column("disabled_at", UtcTimestamp, nullable=True),
    Column("drop_after", UtcTimestamp, nullable=True),
    Column("dropped_at", UtcTimestamp, nullable=True),
    # dropped, gone, not_managed
    Column("outcome", String(16), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UtcTimestamp, nullable=True),
    Column("last_error", Text, nullable=True),
    Index(None, "dropped_at"),
    Index(None, "session_id"),
)

#: Master key rotation (revision 0019, gateway.store.master_keys): the fleet's
#: active master key version (one row, id 1; version 1 until the first rotation).
master_key_state = Table(
    "master_key_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("active_version", BigInteger, nullable=False),
    Column("activated_at", UtcTimestamp, nullable=True),
)

#: Which master key versions each gateway's ring holds, as it last reported
#: them (a JSON object: each version, as a string, to its key id, a public
#: fingerprint), renewed with its presence lease.
gateway_key_versions = Table(
    "gateway_key_versions",
    metadata,
    Column("gateway_id", String(128), primary_key=True),
    Column("versions", Text, nullable=False),
    Column("reported_at", UtcTimestamp, nullable=False),
)

#: The audit chain key of each earlier master key version (derived, never the
#: master key itself), sealed under the active master key (associated data
#: ``pam/audit-key/<version>``): old trails verify after their master key is
#: retired.
audit_keys = Table(
    "audit_keys",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("sealed_key", LargeBinary, nullable=False),
    Column("added_at", UtcTimestamp, nullable=False),
)
