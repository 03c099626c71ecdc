"""The text the throwaway cluster hands its server: configuration files and admin SQL.

``pg_hba.conf`` (:data:`PG_HBA_CONF`), the settings file that ``postgresql.conf``
includes (:func:`render_settings`), and the statements that create the
pg_hba.conf groups, roles and databases. Nothing here touches a file or a
process; :mod:`gateway.testing.pgcluster` writes and runs what this renders.

Authentication (``pg_hba.conf``, first match wins, see "The pg_hba.conf File"
in the PostgreSQL documentation): roles whose name starts with ``md5_`` use
``md5``, ``plain_`` use cleartext ``password`` over TLS, ``plainnossl_`` use
``password`` over any TCP connection, ``gss_`` use GSSAPI; everything else uses
``scram-sha-256`` over TCP (with or without TLS) and ``trust`` over the unix
socket. PostgreSQL 15 cannot match user names by regular expression (that
arrived in 16), so the prefix rules are group rules (``+pam_hba_md5``) and a
role joins the group its name prefix selects (:func:`hba_group_for`).

Invariants: every value spliced into a configuration line or a statement is
quoted here (:func:`conf_quote`, :func:`sql_literal`, :func:`sql_ident`), and a
NUL, which neither can carry, raises :class:`ClusterError` rather than truncate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from gateway.testing.pgerrors import ClusterError

__all__ = [
    "CONF_INCLUDE_NAME",
    "HBA_GROUP_BY_PREFIX",
    "PG_HBA_CONF",
    "SUPERUSER",
    "PasswordEncryption",
    "conf_quote",
    "create_database_sql",
    "create_hba_groups_sql",
    "create_role_sql",
    "hba_group_for",
    "include_directive",
    "render_settings",
    "sql_ident",
    "sql_literal",
]

PasswordEncryption = Literal["scram-sha-256", "md5"]

SUPERUSER = "postgres"

# Name prefix -> group role that a pg_hba.conf line matches with "+group".
# "plainnossl_" is tested before "plain_" only for readability: neither is a
# prefix of the other.
HBA_GROUP_BY_PREFIX: tuple[tuple[str, str], ...] = (
    ("md5_", "pam_hba_md5"),
    ("plainnossl_", "pam_hba_plainnossl"),
    ("plain_", "pam_hba_plain"),
    # GSSAPI, a method the gateway refuses: lets tests see that refusal.
    ("gss_", "pam_hba_gss"),
)

PG_HBA_CONF = """\
# Written by gateway.testing.pgcluster; first matching line wins.
# TYPE   DATABASE  USER                 ADDRESS        METHOD
local    all       all                                 trust
hostssl  all       +pam_hba_plain       127.0.0.1/32   password
host     all       +pam_hba_plainnossl  127.0.0.1/32   password
host     all       +pam_hba_md5         127.0.0.1/32   md5
host     all       +pam_hba_gss         127.0.0.1/32   gss
hostssl  all       all                  127.0.0.1/32   scram-sha-256
host     all       all                  127.0.0.1/32   scram-sha-256
"""

#: The file in the data directory that holds our settings, included by postgresql.conf.
CONF_INCLUDE_NAME = "pam.conf"


def conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def include_directive() -> str:
    """The lines appended to ``postgresql.conf`` to read :data:`CONF_INCLUDE_NAME`."""
    # Our settings live in one included file so a port retry rewrites it whole.
    return f"\n# Added by pam's pgcluster\ninclude {conf_quote(CONF_INCLUDE_NAME)}\n"


def render_settings(
    *, host: str, port: int, socket_dir: Path, cert_path: Path, key_path: Path
) -> str:
    """The contents of :data:`CONF_INCLUDE_NAME`: one ``name = value`` line each."""
    settings: dict[str, str] = {
        "listen_addresses": conf_quote(host),
        "port": str(port),
        "unix_socket_directories": conf_quote(str(socket_dir)),
        "ssl": "on",
        "ssl_cert_file": conf_quote(str(cert_path)),
        "ssl_key_file": conf_quote(str(key_path)),
        "password_encryption": conf_quote("scram-sha-256"),
        # Durability is pointless for a cluster that is deleted at exit.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": conf_quote("128MB"),
        "max_connections": "200",
        # pg_ctl -l captures stderr; the collector would only add a process.
        "logging_collector": "off",
        "log_line_prefix": conf_quote("%m [%p] %q%u@%d "),
        # "connection authenticated: ... method=md5 (pg_hba.conf:4)" lets tests
        # and people see which pg_hba.conf line a login used.
        "log_connections": "on",
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def sql_literal(value: str) -> str:
    # standard_conforming_strings is on (the default since 9.1): only ' needs doubling.
    if "\0" in value:
        raise ClusterError("SQL string literals cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    if "\0" in name:
        raise ClusterError("SQL identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def hba_group_for(role_name: str) -> str | None:
    """The pg_hba.conf group a role joins because of its name prefix, if any."""
    for prefix, group in HBA_GROUP_BY_PREFIX:
        if role_name.startswith(prefix):
            return group
    return None


def create_hba_groups_sql() -> str:
    """Create the NOLOGIN group roles that :data:`PG_HBA_CONF` names with ``+group``."""
    return "\n".join(f"CREATE ROLE {sql_ident(group)} NOLOGIN;" for _, group in HBA_GROUP_BY_PREFIX)


def create_role_sql(
    name: str, password: str, *, method: PasswordEncryption, superuser: bool, login: bool
) -> str:
    """Create a role whose password is stored with ``method``, in its pg_hba.conf group.

    The result contains the password: run it with the password masked in errors.
    """
    ident = sql_ident(name)
    statements = [
        # password_encryption decides how CREATE ROLE ... PASSWORD stores the
        # secret ("Password Authentication" in the PostgreSQL documentation).
        f"SET password_encryption = {sql_literal(method)};",
        f"CREATE ROLE {ident} WITH {'LOGIN' if login else 'NOLOGIN'} "
        f"{'SUPERUSER' if superuser else 'NOSUPERUSER'} "
        f"PASSWORD {sql_literal(password)};",
    ]
    group = hba_group_for(name)
    if group is not None:
        statements.append(f"GRANT {sql_ident(group)} TO {ident};")
    return "\n".join(statements)


def create_database_sql(name: str, owner: str | None = None) -> str:
    sql = f"CREATE DATABASE {sql_ident(name)}"
    if owner is not None:
        sql += f" OWNER {sql_ident(owner)}"
    return sql + ";"
