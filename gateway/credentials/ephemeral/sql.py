"""A database role per grant, as names and SQL: pure, no I/O.

:mod:`~gateway.credentials.ephemeral.roles` and its janitor run these
statements over a signed-in upstream connection (as the resource's rotation
role) to make a grant's own role and, at the grant's end, to disable and drop it.

Invariants:

* A grant's role name is ``pam_<user>_<first 8 of the grant id>``: lower-case
  letters, digits and ``_`` only, at most 63 bytes (PostgreSQL's ``NAMEDATALEN``
  less one; a longer name would be cut by the server, silently), so it needs no
  quoting anywhere a person types it (``psql -U``, a URL) and two grants of one
  user never share one.
* Every name and value spliced into SQL goes through
  :func:`~gateway.credentials.statements.quote_identifier` or
  :func:`~gateway.credentials.statements.quote_literal`.
* The password never appears here: a role is created with the SCRAM-SHA-256
  *secret* of its password (``PASSWORD 'SCRAM-SHA-256$...'``), which PostgreSQL
  stores as it is.
* Nothing here touches a role that is not a direct member of the marker role;
  the callers check :data:`ROLE_STATE` first, and the statements that drop name
  only the role they checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from gateway.credentials.statements import quote_identifier, quote_literal
from gateway.errors import InvalidRequest

__all__ = [
    "DEFAULT_MARKER_ROLE",
    "MAX_ROLE_NAME_BYTES",
    "RoleState",
    "check_role_name",
    "create_role_sql",
    "disable_role_sql",
    "drop_role_sql",
    "dry_run_sql",
    "ensure_marker_sql",
    "ephemeral_role_name",
    "grant_comment",
    "is_for_grant",
    "role_state_of",
    "role_state_sql",
    "template_sql",
    "terminate_backends_sql",
    "valid_until_sql",
]

#: The role every role pam makes for a grant is a member of; pam drops no role
#: that is not (revision 0016, ``ephemeral_marker_role``).
DEFAULT_MARKER_ROLE: Final = "pam_managed"
#: PostgreSQL's NAMEDATALEN (64) less the terminating NUL.
MAX_ROLE_NAME_BYTES: Final = 63
#: How long a grant id's prefix in a role name is (as `pam sessions` shows ids).
_GRANT_ID_CHARS: Final = 8
_PREFIX: Final = "pam_"
_NOT_NAME_CHARS: Final = re.compile(r"[^a-z0-9_]+")
#: A role name pam makes, or a setting naming one: nothing that needs quoting.
_PLAIN_ROLE: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: How long pg_terminate_backend waits for each backend to exit, in milliseconds.
TERMINATE_WAIT_MS: Final = 5000


def ephemeral_role_name(requester: str, grant_id: str) -> str:
    """``pam_<user>_<first 8 of grant id>``: the requester's name lower-cased,
    every run of other characters than ``a-z0-9_`` made one ``_``, cut so the
    whole is at most :data:`MAX_ROLE_NAME_BYTES`."""
    short = grant_id[:_GRANT_ID_CHARS].lower()
    if not re.fullmatch(r"[0-9a-f]{8}", short):
        raise InvalidRequest(f"not a grant id: {grant_id!r}")
    user = _NOT_NAME_CHARS.sub("_", requester.lower()).strip("_")
    room = MAX_ROLE_NAME_BYTES - len(_PREFIX) - 1 - len(short)
    user = user[:room].rstrip("_") or "user"
    return f"{_PREFIX}{user}_{short}"


def check_role_name(what: str, name: str) -> str:
    """*name* if it is a plain role name (lower case, ``a-z0-9_``, at most 63
    bytes, not starting with a digit), else :class:`InvalidRequest`."""
    if not _PLAIN_ROLE.fullmatch(name):
        raise InvalidRequest(
            f"{what} {name!r} is not a plain role name: lower-case letters, digits and _,"
            " at most 63, not starting with a digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class RoleState:
    """A role as the server has it: whether it is a direct member of the marker
    role, and whether it is a superuser."""

    name: str
    marked: bool
    superuser: bool
    #: its COMMENT (pam writes ``pam gateway <id> grant <session id>``)
    comment: str | None = None


def role_state_sql(role: str, marker: str) -> str:
    """One row (name, marked, superuser, comment) if *role* exists, none if not."""
    return (
        "SELECT r.rolname, EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m"
        " JOIN pg_catalog.pg_roles g ON g.oid = m.roleid"
        f" WHERE m.member = r.oid AND g.rolname = {quote_literal(marker)}), r.rolsuper,"
        " pg_catalog.shobj_description(r.oid, 'pg_authid')"
        f" FROM pg_catalog.pg_roles r WHERE r.rolname = {quote_literal(role)}"
    )


def role_state_of(rows: list[list[bytes | None]]) -> RoleState | None:
    """The answer to :func:`role_state_sql` (text format: ``t``/``f``)."""
    if not rows:
        return None
    name, marked, superuser, comment = rows[0]
    return RoleState(
        name=(name or b"").decode(),
        marked=marked == b"t",
        superuser=superuser == b"t",
        comment=None if comment is None else comment.decode(errors="replace"),
    )


def template_sql(template: str) -> str:
    """One row (superuser) if *template* exists."""
    return f"SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = {quote_literal(template)}"


def ensure_marker_sql(marker: str) -> str:
    """Create the marker role (NOLOGIN) unless it exists; two grants racing to
    create it both succeed (the loser's error is swallowed)."""
    return (
        "DO $pam$ BEGIN IF NOT EXISTS"
        f" (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = {quote_literal(marker)})"
        f" THEN CREATE ROLE {quote_identifier(marker)} NOLOGIN; END IF;"
        " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;"
        " END $pam$"
    )


def _timestamp(moment: datetime) -> str:
    return quote_literal(moment.astimezone(UTC).isoformat(timespec="seconds"))


def create_role_sql(
    role: str,
    *,
    secret: str,
    valid_until: datetime,
    template: str,
    marker: str,
    comment: str,
) -> str:
    """The grant's role, able to log in with the password whose SCRAM *secret*
    this is until *valid_until*, a member of *template* (what the person may do)
    and of *marker* (pam made it), with *comment* saying whose it is. Two
    statements in one simple Query: one implicit transaction, both or neither."""
    name = quote_identifier(role)
    return (
        f"CREATE ROLE {name} LOGIN PASSWORD {quote_literal(secret)}"
        f" VALID UNTIL {_timestamp(valid_until)}"
        f" IN ROLE {quote_identifier(template)}, {quote_identifier(marker)};"
        f" COMMENT ON ROLE {name} IS {quote_literal(comment)}"
    )


def grant_comment(gateway_id: str, grant_id: str) -> str:
    """The COMMENT on a grant's role: which gateway made it, for which grant."""
    return f"pam gateway {gateway_id} grant {grant_id}"


def is_for_grant(state: RoleState, grant_id: str) -> bool:
    """Whether *state* is the role pam made for *grant_id*: marked, and its
    comment (when it still has one) names that grant."""
    return state.marked and (state.comment is None or f" grant {grant_id}" in state.comment)


def valid_until_sql(role: str, valid_until: datetime) -> str:
    """Move *role*'s ``VALID UNTIL`` (an extended grant)."""
    return f"ALTER ROLE {quote_identifier(role)} VALID UNTIL {_timestamp(valid_until)}"


def disable_role_sql(role: str) -> str:
    """No new sign-in as *role* (NOLOGIN, no password), and make the signed-in
    rotation role a member of it: ending its backends, REASSIGN OWNED and DROP
    OWNED each need the privileges of the role they act on."""
    name = quote_identifier(role)
    return f"ALTER ROLE {name} NOLOGIN PASSWORD NULL; GRANT {name} TO CURRENT_USER"


def terminate_backends_sql(role: str) -> str:
    """End every backend signed in as *role*, waiting up to
    :data:`TERMINATE_WAIT_MS` for each to exit (PostgreSQL 14 and later)."""
    return (
        f"SELECT pg_catalog.pg_terminate_backend(pid, {TERMINATE_WAIT_MS})"
        " FROM pg_catalog.pg_stat_activity"
        f" WHERE usename = {quote_literal(role)} AND pid <> pg_catalog.pg_backend_pid()"
    )


def drop_role_sql(role: str, owner: str | None) -> str:
    """Hand what *role* owns in this database to *owner* (None: the signed-in
    rotation role), drop its privileges here, then drop it: one implicit
    transaction, so a DROP ROLE refused (objects in another database) leaves it
    all as it was, to be tried again."""
    name = quote_identifier(role)
    to = "CURRENT_USER" if owner is None else quote_identifier(owner)
    return f"REASSIGN OWNED BY {name} TO {to}; DROP OWNED BY {name}; DROP ROLE {name}"


def dry_run_sql(probe: str, *, template: str, marker: str) -> str:
    """What a grant would do, undone: create the marker if missing, a NOLOGIN
    *probe* role in *template* and *marker*, made the rotation role's, then
    ROLLBACK. Any refusal shows as the statement's error."""
    name = quote_identifier(probe)
    return (
        f"BEGIN; {ensure_marker_sql(marker)};"
        f" CREATE ROLE {name} NOLOGIN IN ROLE {quote_identifier(template)},"
        f" {quote_identifier(marker)};"
        f" GRANT {name} TO CURRENT_USER; ROLLBACK"
    )
